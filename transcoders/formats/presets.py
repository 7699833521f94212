"""circuit-tracer's preset names and the published transcoder repositories we know, with the
model each was trained for.

Facts from circuit-tracer's source and README (github.com/decoderesearch/circuit-tracer,
``circuit_tracer/utils/hf_utils.py`` and ``README.md``):

- presets: ``gemma`` = ``mwhanna/gemma-scope-transcoders`` (GemmaScope per-layer transcoders of
  Gemma-2-2B: a ``config.yaml`` listing ``hf://google/gemma-scope-2b-pt-transcoders/...``
  ``params.npz`` files), ``llama`` = ``mntss/transcoder-Llama-3.2-1B`` (per-layer ReLU
  transcoders of Llama-3.2-1B, ``layer_{i}.safetensors``);
- published sets: Gemma-2-2B CLTs ``mntss/clt-gemma-2-2b-426k`` and ``mntss/clt-gemma-2-2b-2.5M``,
  Llama-3.2-1B CLT ``mntss/clt-llama-3.2-1b-524k``, Qwen3 per-layer sets
  ``mwhanna/qwen3-{0.6b,1.7b,14b}-transcoders-lowl0`` and ``mwhanna/qwen3-{4b,8b}-transcoders``,
  Gemma-3 sets from Gemma Scope 2 ``mwhanna/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}/<folder>``,
  Llama-3.1-8B-Instruct TopK set ``facebook/crv-8b-instruct-transcoders`` (circuit-tracer fixes
  its k at 128, which its config.yaml does not carry).

The table names the model before anything is downloaded, so a transcoder set for another
model than ``--model`` is refused first (the weights' shapes are checked again after loading).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transcoders.formats.files import TranscoderFormatError


@dataclass(frozen=True)
class Preset:
    """A short name for a published transcoder repository."""

    name: str
    repo: str
    model: str
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "gemma",
            "mwhanna/gemma-scope-transcoders",
            "google/gemma-2-2b",
            "GemmaScope per-layer JumpReLU transcoders (params.npz), Gemma-2-2B",
        ),
        Preset(
            "llama",
            "mntss/transcoder-Llama-3.2-1B",
            "meta-llama/Llama-3.2-1B",
            "per-layer ReLU transcoders (layer_{i}.safetensors), Llama-3.2-1B",
        ),
    )  # fmt: skip
}

# Published repositories -> the model they were trained for (circuit-tracer's README).
PUBLISHED_MODELS: dict[str, str] = {
    "mwhanna/gemma-scope-transcoders": "google/gemma-2-2b",
    "mntss/gemma-scope-transcoders": "google/gemma-2-2b",
    "mntss/clt-gemma-2-2b-426k": "google/gemma-2-2b",
    "mntss/clt-gemma-2-2b-2.5M": "google/gemma-2-2b",
    "mntss/transcoder-Llama-3.2-1B": "meta-llama/Llama-3.2-1B",
    "mntss/clt-llama-3.2-1b-524k": "meta-llama/Llama-3.2-1B",
    "mwhanna/qwen3-0.6b-transcoders-lowl0": "Qwen/Qwen3-0.6B",
    "mwhanna/qwen3-1.7b-transcoders-lowl0": "Qwen/Qwen3-1.7B",
    "mwhanna/qwen3-4b-transcoders": "Qwen/Qwen3-4B",
    "mwhanna/qwen3-8b-transcoders": "Qwen/Qwen3-8B",
    "mwhanna/qwen3-14b-transcoders-lowl0": "Qwen/Qwen3-14B",
    "facebook/crv-8b-instruct-transcoders": "meta-llama/Llama-3.1-8B-Instruct",
    "mntss/clt-131k": "openai/gpt-oss-20b",
    "google/gemma-scope-2b-pt-transcoders": "google/gemma-2-2b",
}
# TopK sets whose config.yaml lacks k: circuit-tracer hard-codes it.
PUBLISHED_TOPK: dict[str, int] = {"facebook/crv-8b-instruct-transcoders": 128}
_GEMMA_SCOPE_2 = re.compile(r"^(?:mwhanna|google)/gemma-scope-2-(\d+[mb])-(pt|it)$")
_VARIANT = re.compile(r"[-_](it|instruct|chat|base|pt)$")


def preset(name: str) -> Preset | None:
    return PRESETS.get(name)


def unknown_preset(name: str) -> TranscoderFormatError:
    known = ", ".join(f"{p.name} ({p.repo})" for p in PRESETS.values())
    return TranscoderFormatError(
        f"unknown transcoder preset or path {name!r}: the presets are {known}; otherwise give a "
        "transcoder folder, a config.yaml, or a hub repository id org/name[@revision]"
    )


def published_model(repo_id: str) -> str | None:
    """The model a published repository's transcoders were trained for, when we know it
    (repository names compare case-insensitively, as the hub resolves them)."""
    known = {k.lower(): v for k, v in PUBLISHED_MODELS.items()}
    if repo_id.lower() in known:
        return known[repo_id.lower()]
    m = _GEMMA_SCOPE_2.match(repo_id.lower())
    return f"google/gemma-3-{m.group(1)}-{m.group(2)}" if m else None


def _base(name: str) -> str:
    out = name.rstrip("/").rsplit("/", 1)[-1].lower()
    while (m := _VARIANT.search(out)) is not None:
        out = out[: m.start()]
    return out


def same_model(a: str, b: str) -> bool:
    """Whether two model names are one base model (org and -it/-instruct/-pt suffixes aside:
    circuit-tracer traces instruction-tuned models with their base model's transcoders)."""
    return _base(a) == _base(b)


def check_published_model(label: str, trained_for: str | None, model_name: str | None) -> None:
    """Refuse a published set trained for another model than ``model_name``. Only hub ids
    (``org/name``) are compared: a local folder or built-in name says nothing about which model
    it holds (its shape is checked after loading)."""
    if not trained_for or not model_name or "/" not in model_name or "/" not in trained_for:
        return
    if model_name.startswith((".", "/", "~")):
        return
    if not same_model(trained_for, model_name):
        raise TranscoderFormatError(
            f"{label} holds transcoders for {trained_for}, but the model is {model_name}: pass "
            f"--model {trained_for}, or transcoders trained for {model_name}"
        )


# --- published shapes (for memory plans made before anything is downloaded) --------------------


@dataclass(frozen=True)
class PublishedShape:
    """The shape of a published set: ``n_features`` per layer, ``kind`` ``clt`` (layer i
    decodes to the L - i layers from i on) or ``plt`` (one target layer each)."""

    repo: str
    model: str
    kind: str
    n_layers: int
    d_model: int
    n_features: int
    note: str = ""

    @property
    def total_features(self) -> int:
        return self.n_layers * self.n_features

    def n_targets(self) -> list[int]:
        L = self.n_layers
        return [L - i for i in range(L)] if self.kind == "clt" else [1] * L

    def resident_bytes(self, itemsize: int) -> int:
        """What a lazy load holds in memory: encoders [L, F, d], b_enc and thresholds [L, F],
        b_dec [L, d] (decoders stay on disk; rows are read as features activate)."""
        L, F, d = self.n_layers, self.n_features, self.d_model
        return (L * F * d + 2 * L * F + L * d) * itemsize

    def decoder_bytes(self, itemsize: int) -> int:
        """What the decoders take on disk (read by rows of active features)."""
        return self.n_features * sum(self.n_targets()) * self.d_model * itemsize


# Gemma-2-2B: 26 layers, d_model 2304. The CLTs' names give their total feature counts; 426k
# is 26 x 16,384 = 425,984 and 2.5M is taken as 26 x 98,304 = 2,555,904 (the nearest per-layer
# width that is a multiple of 1,024). The GemmaScope set lists the width_16k files.
GEMMA2_2B_SETS: dict[str, PublishedShape] = {
    "gemmascope-16k": PublishedShape("mwhanna/gemma-scope-transcoders", "google/gemma-2-2b",
                                     "plt", 26, 2304, 16_384, "GemmaScope width_16k per layer"),
    "clt-426k": PublishedShape("mntss/clt-gemma-2-2b-426k", "google/gemma-2-2b", "clt", 26,
                               2304, 16_384, "426k = 26 x 16,384"),
    "clt-2.5M": PublishedShape("mntss/clt-gemma-2-2b-2.5M", "google/gemma-2-2b", "clt", 26,
                               2304, 98_304, "2.5M taken as 26 x 98,304"),
}  # fmt: skip
