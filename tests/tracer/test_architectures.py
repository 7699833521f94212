"""The architecture table: every row resolves on a real transformers model of its family, its
norm and attention-weight helpers reproduce the modules, Gemma's sliding-window and soft-capped
attention run unchanged through our attention function, and unknown families are refused."""

from __future__ import annotations

import pytest
import torch
from hook_reference import decoder_layers, eager_copy, independent_record
from model_fixtures import TINY_TYPES, TinyTokenizer, tiny_config

from tracer.architectures import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    architecture_for,
    frozen_norm,
    get_module,
    norm_scale,
)
from tracer.hooks import Freeze
from tracer.model import LanguageModel, ModelLoadError

TOL = {"atol": 1e-6, "rtol": 1e-5}


def _build(config, seed: int = 0) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norm gains, as in conftest's tiny models
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return LanguageModel(hf, TinyTokenizer(), name=f"tiny-{config.model_type}")


def test_table_rows_are_unique_and_resolve():
    types = [t for a in ARCHITECTURES for t in a.model_types]
    assert len(types) == len(set(types))
    for t in types:
        assert t in architecture_for(t).model_types
    # The families the tests build all have a row.
    assert set(TINY_TYPES) <= set(types)


def test_every_row_names_real_modules(tiny_model):
    arch, hf = tiny_model.arch, tiny_model.hf
    layers = get_module(hf, arch.layers)
    assert len(layers) == tiny_model.facts.n_layers == 3
    for layer in layers:
        for part in ("attn", "attn_norm", "mlp_norm", "mlp", "attn_out_norm", "mlp_out_norm"):
            path = getattr(arch, part)
            if path:
                assert isinstance(get_module(layer, path), torch.nn.Module), part
    assert get_module(hf, arch.unembed).weight.shape == (tiny_model.facts.vocab_size, 32)
    assert get_module(hf, arch.final_norm) is not None


def test_norm_helpers_reproduce_every_norm_module(tiny_model):
    """frozen_norm at the scale norm_scale reads is the module itself, for every norm."""
    arch = tiny_model.arch
    torch.manual_seed(3)
    x = torch.randn(2, 5, tiny_model.facts.d_model) * 3 + 0.5
    mods = [tiny_model.final_norm()]
    for l in range(tiny_model.facts.n_layers):
        for part in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"):
            if getattr(arch, part):
                mods.append(tiny_model.layer_module(l, part))
    for mod in mods:
        s = norm_scale(arch.norm_kind, mod, x)
        assert s.shape == (2, 5)
        with torch.no_grad():
            torch.testing.assert_close(frozen_norm(arch.norm_kind, mod, x, s), mod(x), **TOL)
        # Frozen means frozen: doubling x doubles the (centred) output at a fixed scale.
        y2 = frozen_norm(arch.norm_kind, mod, 2 * x, s)
        bias = getattr(mod, "bias", None)
        b = 0 if bias is None else bias.detach()
        torch.testing.assert_close(y2 - b, 2 * (frozen_norm(arch.norm_kind, mod, x, s) - b), **TOL)


def _value_bias(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and output biases written out by hand per family (zeros where there are none)."""
    attn = model.layer_module(layer, "attn")
    d = model.facts.d_model
    if model.facts.model_type == "gpt2":
        return attn.c_attn.bias[2 * d :].detach(), attn.c_proj.bias.detach()
    zero_v = torch.zeros(attn.v_proj.out_features)
    b_v = attn.v_proj.bias.detach() if attn.v_proj.bias is not None else zero_v
    b_o = attn.o_proj.bias.detach() if attn.o_proj.bias is not None else torch.zeros(d)
    return b_v, b_o


def test_value_output_weights_rebuild_attention_output(tiny_model):
    """With the recorded pattern, out = sum_h A_h (x W_V,h^T + b_v) W_O,h^T + b_o reproduces the
    attention module's own output: the weights attribution uses are laid out correctly (GQA
    head sharing and GPT-2's fused Conv1D included)."""
    model = tiny_model
    f = model.facts
    ids = torch.randint(3, 101, (1, 9))
    twin = eager_copy(model.hf)
    ref = independent_record(twin, ids)
    with torch.no_grad():
        run = model.run(ids)
    groups = f.n_heads // f.n_kv_heads
    for l in range(f.n_layers):
        w_v, w_o = model.value_output(l)
        assert w_v.shape == (f.n_kv_heads * f.d_head, f.d_model)
        assert w_o.shape == (f.d_model, f.n_heads * f.d_head)
        b_v, b_o = _value_bias(model, l)
        x = ref["io"][("attn_norm", l)][1][0]  # attention's input: the attn norm's output [P, d]
        v = (x @ w_v.T + b_v).view(-1, f.n_kv_heads, f.d_head)  # [P, kv, dh]
        z = torch.stack(
            [run.patterns[0, l, h] @ v[:, h // groups] for h in range(f.n_heads)], dim=1
        )  # [P, H, dh]
        out = z.reshape(len(x), -1) @ w_o.T + b_o
        torch.testing.assert_close(out, ref["io"][("attn", l)][1][0], atol=1e-5, rtol=1e-5)


# --- Gemma: sliding windows and soft-capping -----------------------------------------------------


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_window_patterns_are_the_ones_used(model_type):
    cfg = tiny_config(model_type)
    cfg.sliding_window = 3
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    model = _build(cfg)
    twin = eager_copy(model.hf)
    ids = torch.randint(3, 101, (2, 10))  # longer than the window
    with torch.no_grad():
        run = model.run(ids)
        want = twin(input_ids=ids, output_attentions=True, use_cache=False)
    torch.testing.assert_close(run.logits, want.logits, **TOL)
    torch.testing.assert_close(run.patterns, torch.stack(want.attentions, 1), **TOL)
    q = torch.arange(10)[:, None]
    k = torch.arange(10)[None, :]
    outside = (k <= q - 3) & (k <= q)  # causal but beyond the window
    for l, kind in enumerate(cfg.layer_types):
        p = run.patterns[:, l]
        if kind == "sliding_attention":
            assert torch.all(p[..., outside] == 0), f"layer {l} looked outside its window"
        else:
            assert p[..., outside].min() > 0, f"full layer {l} was windowed"
    # Freezing these patterns reproduces the model (the window lives in the frozen pattern).
    with torch.no_grad():
        frozen = model.run(ids[:1], freeze=Freeze(patterns=run.patterns[0]))
    torch.testing.assert_close(frozen.logits, run.logits[:1], atol=1e-5, rtol=0)


def test_gemma2_soft_capping_is_preserved():
    """Gemma-2 caps attention scores (tanh(s / c) * c before the softmax) and final logits. Our
    attention function calls the module's own eager function, so both caps stay in force."""
    cfg = tiny_config("gemma2")
    cfg.attn_logit_softcapping = 0.05
    cfg.final_logit_softcapping = 0.2
    cfg.query_pre_attn_scalar = 1  # unscaled scores: large enough for the cap to matter
    model = _build(cfg)
    with torch.no_grad():
        for layer in model.layers():
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    twin = eager_copy(model.hf)
    ids = torch.randint(3, 101, (1, 8))
    with torch.no_grad():
        run = model.run(ids)
        want = twin(input_ids=ids, output_attentions=True, use_cache=False)
    torch.testing.assert_close(run.logits, want.logits, **TOL)
    torch.testing.assert_close(run.patterns, torch.stack(want.attentions, 1), **TOL)
    assert run.logits.abs().max() < 0.2  # the final cap bit
    # Scores capped at +-0.05 keep every visible weight within e^(+-0.1) of uniform.
    n_visible = torch.arange(1, 9, dtype=torch.float32)[:, None]
    p = run.patterns[0]  # [L, H, q, k]
    vis = torch.ones(8, 8).tril().bool()
    ratio = (p * n_visible)[..., vis]
    assert ratio.max() <= torch.exp(torch.tensor(0.1)) + 1e-5
    assert ratio.min() >= torch.exp(torch.tensor(-0.1)) - 1e-5
    # Without the caps the same weights give other patterns and logits: the caps were in play.
    cfg2 = tiny_config("gemma2")
    cfg2.attn_logit_softcapping = None
    cfg2.final_logit_softcapping = None
    cfg2.query_pre_attn_scalar = 1
    uncapped = _build(cfg2)
    uncapped.hf.load_state_dict(model.hf.state_dict())
    with torch.no_grad():
        free = uncapped.run(ids)
    assert (free.patterns - run.patterns).abs().max() > 1e-3
    assert (free.logits - run.logits).abs().max() > 1e-2


# --- unknown families --------------------------------------------------------------------------


def _opt_config():
    from transformers import OPTConfig

    return OPTConfig(hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                     vocab_size=50, max_position_embeddings=32, word_embed_proj_dim=16)  # fmt: skip


def test_unknown_architecture_is_refused_with_the_fix():
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(_opt_config())
    with pytest.raises(UnsupportedArchitectureError) as err:
        LanguageModel(hf, TinyTokenizer())
    msg = str(err.value)
    assert "unknown architecture 'opt'" in msg
    assert "llama" in msg and "gemma2" in msg  # names what is supported
    assert "Add a row to tracer/architectures.py" in msg  # and how to add one


def test_unknown_architecture_folder_fails_before_loading_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(_opt_config()).save_pretrained(tmp_path)
    # No tokenizer in the folder: the architecture check comes first and is the error shown.
    with pytest.raises(UnsupportedArchitectureError, match="unknown architecture 'opt'"):
        LanguageModel.load(tmp_path)


def test_unrecognised_model_type_folder_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_family_xyz"}')
    with pytest.raises(ModelLoadError, match="could not load model .*no_such_family_xyz"):
        LanguageModel.load(tmp_path)


def test_mistral_row_runs_exactly():
    """The llama row also claims Mistral: its hooks read what HF computes."""
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=101,
                        max_position_embeddings=64, sliding_window=4)  # fmt: skip
    model = _build(cfg)
    twin = eager_copy(model.hf)
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        run = model.run(ids)
    ref = independent_record(twin, ids)
    torch.testing.assert_close(run.logits, ref["logits"], **TOL)
    torch.testing.assert_close(run.patterns, ref["attentions"], **TOL)
    for l in range(2):
        torch.testing.assert_close(run.sites["resid_pre"][:, l], ref["hidden_states"][l], **TOL)
        torch.testing.assert_close(run.sites["mlp_out"][:, l], ref["io"][("mlp", l)][1], **TOL)
    assert torch.all(run.patterns[..., 8, :5] == 0)  # Mistral's window of 4 is in force
    assert len(decoder_layers(twin)) == 2


def test_multimodal_gemma3_wrapper_is_refused_by_name():
    """Gemma-3 4B+ checkpoints are Gemma3ForConditionalGeneration (model type 'gemma3'), whose
    text layers sit elsewhere; the table describes the text-only model ('gemma3_text')."""
    from transformers import AutoModelForCausalLM, Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    cfg = Gemma3Config(text_config=tiny_config("gemma3_text").to_dict(),
                       vision_config=vision.to_dict(), mm_tokens_per_image=4)  # fmt: skip
    hf = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="model type 'gemma3' wraps a "
                       "'gemma3_text' language model .*load its text-only model"):  # fmt: skip
        LanguageModel(hf, TinyTokenizer())
