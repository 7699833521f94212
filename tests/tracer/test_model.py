"""LanguageModel: facts, tokens, truncation, and clear errors for bad input (each error names the
problem and the fix, and is raised before any tensor reaches torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.model import LanguageModel, ModelLoadError, PromptError, truncate_layers


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama")


# --- facts and tokens --------------------------------------------------------------------------


def test_smollm2_facts(smollm2_full, smollm2):
    f = smollm2_full.facts
    assert (f.n_layers, f.d_model, f.vocab_size) == (30, 576, 49152)
    assert (f.n_heads, f.n_kv_heads, f.d_head, f.model_type) == (9, 3, 64, "llama")
    assert smollm2_full.arch.name == "llama"
    assert smollm2.facts.n_layers == 4 and smollm2.facts.d_model == 576


def test_tokenize_prepends_bos_once(smollm2_full):
    m = smollm2_full
    ids = m.tokenize("The capital of France is")
    assert ids.dtype == torch.long and ids[0].item() == m.bos_id
    plain = m.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert ids[1:].tolist() == plain
    assert m.tokenize(m.decode(ids)).tolist() == ids.tolist()  # BOS already there: not doubled
    assert m.tokenize("Paris", prepend_bos=False).tolist() == m.tokenizer("Paris")["input_ids"]


def test_token_id(smollm2_full):
    m = smollm2_full
    paris = m.token_id(" Paris")
    assert m.decode([paris]) == " Paris"
    assert m.token_id(paris) == paris
    assert m.token_id(np.int64(paris)) == paris
    assert m.token_id(torch.tensor(paris)) == paris


def test_truncated_model_is_the_full_models_first_layers(smollm2_full, smollm2):
    ids = smollm2_full.tokenize("Truncation keeps the first layers intact")
    with torch.no_grad():
        full = smollm2_full.run(ids)
        cut = smollm2.run(ids)
    for site in ("resid_pre", "attn_out", "mlp_in", "mlp_out"):
        assert torch.equal(cut.sites[site], full.sites[site][:, :4])
    torch.testing.assert_close(cut.patterns, full.patterns[:, :4], atol=0, rtol=0)
    # The truncated copy is independent: the full model still has its 30 layers.
    assert len(smollm2_full.layers()) == 30
    assert smollm2.hf.config.num_hidden_layers == 4


def test_truncate_tiny_gemma3_keeps_layer_types():
    model = make_tiny_model("gemma3_text")
    cut = truncate_layers(model, 2)
    assert cut.facts.n_layers == 2 and len(cut.hf.config.layer_types) == 2
    ids = torch.randint(3, 101, (1, 6))
    with torch.no_grad():
        assert torch.equal(cut.run(ids).sites["mlp_out"], model.run(ids).sites["mlp_out"][:, :2])


# --- bad input: prompts and tokens --------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n\t", None])
def test_empty_prompt(tiny, prompt):
    with pytest.raises(PromptError, match="empty prompt: give at least one non-blank character"):
        tiny.tokenize(prompt)


def test_prompt_longer_than_context(tiny):
    ctx = tiny.facts.max_positions
    assert ctx == 64
    assert len(tiny.tokenize("a" * (ctx - 1))) == ctx  # BOS + 63 fits exactly
    with pytest.raises(PromptError, match=rf"prompt is {ctx + 1} tokens .* context is {ctx}: "
                       "shorten it"):  # fmt: skip
        tiny.tokenize("a" * ctx)


def test_target_token_errors(smollm2_full):
    m = smollm2_full
    with pytest.raises(PromptError, match=r"'Parisian capital' is not one token .*splits into "
                       r"\[.*\]\); give a single token, e.g. with its leading space"):  # fmt: skip
        m.token_id("Parisian capital")
    with pytest.raises(PromptError, match="is not one token"):
        m.token_id("")
    with pytest.raises(PromptError, match=r"token id 49152 outside the vocabulary \(0..49151\)"):
        m.token_id(49152)
    with pytest.raises(PromptError, match=r"token id -1 outside the vocabulary"):
        m.token_id(-1)
    with pytest.raises(PromptError, match="a token string or an integer id, got float"):
        m.token_id(3.0)


def test_run_rejects_bad_token_tensors(tiny):
    v = tiny.facts.vocab_size
    cases = [
        (torch.tensor([1, 5, v]), rf"token id {v} outside the vocabulary .*use this model's"),
        (torch.tensor([[1, -3]]), r"token id -3 outside the vocabulary"),
        (torch.tensor([1.0, 5.0]), r"tokens must be integer ids, got dtype torch.float32"),
        (torch.zeros(1, 0, dtype=torch.long), r"tokens have shape \(1, 0\).*n_pos >= 1"),
        (torch.ones(1, 1, 3, dtype=torch.long), r"tokens have shape \(1, 1, 3\)"),
        (torch.ones(1, 65, dtype=torch.long), r"65 tokens but the model's context is 64: shorten"),
    ]
    for tokens, words in cases:
        with pytest.raises(PromptError, match=words):
            tiny.run(tokens)
    # Lists and numpy arrays of ids are accepted like tensors.
    with torch.no_grad():
        a = tiny.run([1, 5, 7]).logits
        b = tiny.run(np.array([1, 5, 7])).logits
        c = tiny.run(torch.tensor([1, 5, 7], dtype=torch.int32)).logits
    assert torch.equal(a, b) and torch.equal(a, c)


# --- bad input: transcoders and models -----------------------------------------------------------


def test_transcoder_shape_mismatch(tiny):
    f = tiny.facts
    fits = make_random_clt(f.n_layers, f.d_model)
    fits.check_model(f.n_layers, f.d_model, f.name)  # no error
    wide = make_random_clt(f.n_layers, f.d_model * 2)
    with pytest.raises(ValueError, match=rf"d_model {2 * f.d_model} but tiny-llama has "
                       rf"{f.d_model}: it was trained for another model"):  # fmt: skip
        wide.check_model(f.n_layers, f.d_model, f.name)
    deep = make_random_clt(f.n_layers + 2, f.d_model)
    with pytest.raises(ValueError, match=rf"covers {f.n_layers + 2} layers but tiny-llama has "
                       rf"{f.n_layers}: use the transcoder trained for this model"):  # fmt: skip
        deep.check_model(f.n_layers, f.d_model, f.name)


def test_missing_model_paths(tmp_path):
    for src in (tmp_path / "nope", "./no/such/model", "~/no-such-model-dir-xyz"):
        words = r"does not exist\. Give a folder with config.json and weights, a Hugging Face"
        with pytest.raises(ModelLoadError, match=words):
            LanguageModel.load(src)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a model folder: it has no config.json"):
        LanguageModel.load(tmp_path)
    with pytest.raises(ModelLoadError, match="is not a model folder"):
        LanguageModel.load(tmp_path / "model.safetensors")  # a file, not a folder


def test_truncated_weights_file(tmp_path, smollm2_full):
    """A folder whose safetensors file was cut short fails as a ModelLoadError naming it."""
    import shutil

    from tracer.fetch import fetch_smollm2

    src = fetch_smollm2()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    with open(src / "model.safetensors", "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(f.read(1 << 16))
    with pytest.raises(ModelLoadError, match="weights file is damaged or truncated .* fetch"):
        LanguageModel.load(tmp_path)


def test_hub_id_without_network_fails_fast(monkeypatch):
    import huggingface_hub.constants as hub_constants

    # HF_HUB_OFFLINE is read at import; set both so no request (or retry loop) is attempted.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        LanguageModel.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(err.value)
    assert "could not load model 'HuggingFaceTB/SmolLM2-135M-Instruct'" in msg
    assert "'smollm2'" in msg and "\n" not in msg
