"""The real model: the cached SmolLM2-135M-Instruct folder built from its PyPI package."""

from __future__ import annotations

import json
import os
import shutil

import torch

from tracer.fetch import KNOWN_ANSWER, MARKER, SMOLLM2_PACKAGE, fetch_smollm2, is_verified
from tracer.model import LanguageModel


def _greedy(model: LanguageModel, prompt: str, n_new: int) -> str:
    """Greedy continuation through the hooked forward pass (no KV cache: prompts are short)."""
    ids = model.tokenize(prompt)
    start = len(ids)
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model.run(ids, record=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt[None]])
    return model.decode(ids[start:])


def _snapshot(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.iterdir())}  # fmt: skip


def test_fetched_folder_is_complete_and_verified(smollm2_full):
    folder = fetch_smollm2(verbose=False)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "circuit_atlas_check.json"} <= (
        names
    )
    assert not folder.with_name(folder.name + ".partial").exists()
    check = json.loads((folder / "circuit_atlas_check.json").read_text())
    assert check["prompt"] == KNOWN_ANSWER[0] and check["source"] == SMOLLM2_PACKAGE
    assert KNOWN_ANSWER[1] in check["continuation"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    # Every float tensor was dequantised to fp32 and the unembedding is tied to the embedding.
    hf = smollm2_full.hf
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_known_answer(smollm2_full):
    prompt, answer = KNOWN_ANSWER
    continuation = _greedy(smollm2_full, prompt, 4)
    assert answer in continuation, continuation


def test_fetch_is_idempotent(capsys):
    folder = fetch_smollm2(verbose=False)
    before = _snapshot(folder)
    again = fetch_smollm2(verbose=True)
    assert again == folder
    assert _snapshot(folder) == before  # same files: same inodes, times and sizes
    assert capsys.readouterr().err == ""  # nothing rebuilt, nothing announced


def test_folder_copy_loads_and_matches(tmp_path, smollm2_full):
    src = fetch_smollm2(verbose=False)
    dst = tmp_path / "copy-of-smollm2"
    dst.mkdir()
    for p in src.iterdir():
        try:  # the 540 MB weights: a hard link is a full copy as far as loading is concerned
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)
    copy = LanguageModel.load(dst)
    assert copy.facts.name == str(dst) and copy.facts.n_layers == 30
    ids = copy.tokenize("Loading from a copied folder")
    with torch.no_grad():
        assert torch.equal(copy.run(ids, record=False).logits,
                           smollm2_full.run(ids, record=False).logits)  # fmt: skip
    # A copy with its check marker is a finished model folder: fetch reuses it as is.
    before = _snapshot(dst)
    assert fetch_smollm2(dst, verbose=False) == dst
    assert _snapshot(dst) == before


def test_incomplete_folders_are_not_reused(tmp_path):
    """fetch reuses a folder only when it is complete: a deleted or cut-short weights file, a
    missing tokenizer or a missing check record each mean "build again"."""
    src = fetch_smollm2(verbose=False)
    dst = tmp_path / "m"
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "model.safetensors":
            shutil.copy2(p, dst / p.name)  # small files copied: the test edits them
    size = (src / "model.safetensors").stat().st_size
    check = json.loads((dst / MARKER).read_text())
    check["weights_bytes"] = size
    (dst / MARKER).write_text(json.dumps(check))
    assert not is_verified(dst)  # no weights
    os.link(src / "model.safetensors", dst / "model.safetensors")
    assert is_verified(dst)
    (dst / "model.safetensors").unlink()  # drop the link, never write through it
    (dst / "model.safetensors").write_bytes(b"\0" * 1024)
    assert not is_verified(dst)  # cut short
    (dst / "model.safetensors").unlink()
    os.link(src / "model.safetensors", dst / "model.safetensors")
    (dst / "tokenizer.json").unlink()
    assert not is_verified(dst)
    shutil.copy2(src / "tokenizer.json", dst / "tokenizer.json")
    assert is_verified(dst)
    (dst / MARKER).unlink()
    assert not is_verified(dst)
    assert is_verified(src)
