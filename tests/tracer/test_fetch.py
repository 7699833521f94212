"""The built-in models' table and GGUF assembly, and the real default model: the cached
SmolLM2-135M-Instruct folder built from its PyPI package (Gemma-3-270M: test_gemma3.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from tracer.fetch import (
    BUILTIN_MODELS,
    GEMMA3_270M,
    KNOWN_ANSWER,
    MARKER,
    SMOLLM2,
    SMOLLM2_PACKAGE,
    assemble_gguf,
    builtin_model,
    fetch_model,
    fetch_smollm2,
    is_verified,
    manifest_sha256,
)
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


# --- the table of built-in models (no model needed) -------------------------------------------


def test_builtin_names_and_aliases():
    assert [m.name for m in BUILTIN_MODELS] == ["smollm2", "gemma3-270m"]
    assert builtin_model("SmolLM2-135M-Instruct") is SMOLLM2
    assert builtin_model("gemma-3-270m") is builtin_model("GEMMA3-270M") is GEMMA3_270M
    assert builtin_model("gpt2") is None and builtin_model("./smollm2") is None
    with pytest.raises(ValueError, match="unknown built-in model 'gpt2': choose from smollm2, "
                       "gemma3-270m"):  # fmt: skip
        fetch_model("gpt2")
    # Every package is pinned: the pinned sha256 must stay the file the packages hold.
    assert all("==" in p for m in BUILTIN_MODELS for p in m.packages)
    assert len(GEMMA3_270M.pieces) == 4 and len(GEMMA3_270M.packages) == 5


def test_manifest_lookup(tmp_path):
    listing = tmp_path / "SHA256SUMS"
    listing.write_text("ab12  other.gguf\nCD34 *model.gguf\n\n")
    assert manifest_sha256(listing, "model.gguf") == "cd34"
    assert manifest_sha256(listing, "other.gguf") == "ab12"
    assert manifest_sha256(listing, "missing.gguf") is None


def test_assemble_concatenates_in_order_and_checks_sha(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 3000, b"b" * 5, b"c" * 70_000]):
        parts.append(tmp_path / f"m.gguf.part{i:02d}")
        parts[-1].write_bytes(data)
    whole = b"".join(p.read_bytes() for p in parts)
    spec = replace(GEMMA3_270M, gguf_name="m.gguf", sha256=hashlib.sha256(whole).hexdigest())
    out = assemble_gguf(spec, parts, tmp_path / "out")
    assert out == tmp_path / "out" / "m.gguf" and out.read_bytes() == whole
    with pytest.raises(RuntimeError, match="m.gguf .* has sha256 .* expected .* corrupt"):
        assemble_gguf(spec, parts[::-1], tmp_path / "reordered")
    with pytest.raises(RuntimeError, match="corrupt"):
        assemble_gguf(spec, parts[:2], tmp_path / "short")
    # One piece is the file itself, used in place once its sha256 matches.
    single = replace(spec, sha256=hashlib.sha256(parts[0].read_bytes()).hexdigest())
    assert assemble_gguf(single, parts[:1], tmp_path / "unused") == parts[0]
    assert not (tmp_path / "unused").exists()
