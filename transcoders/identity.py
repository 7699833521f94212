"""A transcoder's identity: a readable name plus a content fingerprint.

Graphs, the store's ``(:Transcoder)`` and ``(:Feature)`` keys, graph ids and every cache key
name a transcoder by its identity string ``"<name>@<fingerprint>"``, for example
``smollm2-135m-instruct-clt-skip-256@3f9c2a7d01b4e8c6``. Two transcoders that differ in any
weight or in the config that defines what they compute never share an identity; the same
transcoder copied to another folder, converted to another format or loaded in another dtype
keeps it.

The fingerprint is a BLAKE2b digest (16 hex digits) of:

- the computational config: n_layers, d_model, n_features, kind, activation, topk, skip,
  input_site, model_name, normalisation, model_layers, empty_layers (not the readable name,
  not training metrics, not the format version: renaming or re-evaluating a transcoder does
  not change what it computes);
- every bias and threshold in full (``b_enc``, ``b_dec``, ``threshold``: [L, F] and [L, d]);
- a fixed, spread-out sample of rows of each layer's encoder (256 rows of [F, d]), decoder
  (64 rows of [F, T, d], read row-wise so a lazy decoder is never loaded whole) and skip
  matrix (64 rows of [d, d]).

It is an identity, not an integrity checksum: any retraining or fine-tuning moves every bias
and sampled row, but an edit confined to unsampled rows would go unseen. Values are rounded to
bfloat16 before hashing, so loading the same files in float32 or bfloat16 gives the same
identity (two transcoders that differ only below bfloat16 precision share one).

Cost: a few MB read per layer at most; for SmolLM2's 256-feature CLT about 10 ms.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch

from transcoders.names import is_identity  # noqa: F401  (re-exported: one rule)

FINGERPRINT_CHARS = 16
ENCODER_ROWS = 256
DECODER_ROWS = 64
SKIP_ROWS = 64
UNVERIFIED = "unverified"  # the fingerprint of a legacy store's transcoder migrated without files

# Config fields that define what a transcoder computes (the fingerprint covers these only).
COMPUTATIONAL_FIELDS = (
    "n_layers",
    "d_model",
    "n_features",
    "kind",
    "activation",
    "topk",
    "skip",
    "input_site",
    "model_name",
    "normalization",
    "model_layers",
    "empty_layers",
)
_NAME_OK = re.compile(r"[^0-9A-Za-z._+-]+")


@dataclass(frozen=True)
class TranscoderIdentity:
    """``name`` (readable, no ``@`` or ``/``) and ``fingerprint`` (16 hex digits, or
    ``"unverified"`` for a legacy transcoder whose files were not available)."""

    name: str
    fingerprint: str

    @property
    def id(self) -> str:
        """The identity string used as graph, store and cache key: ``name@fingerprint``."""
        return f"{self.name}@{self.fingerprint}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, text: str) -> TranscoderIdentity:
        """``"name@fingerprint"`` -> identity; a clear error for anything else (e.g. a bare
        model name from a store written before identities existed)."""
        name, sep, fp = str(text).rpartition("@")
        if not sep or not name or not fp:
            raise ValueError(
                f"{text!r} is not a transcoder identity (expected 'name@fingerprint'): it "
                "comes from before transcoder identities; re-trace, or migrate the store with "
                "`circuit-atlas store migrate`"
            )
        return cls(name, fp)


def clean_name(name: str) -> str:
    """A readable name safe inside keys: no ``@``, ``/`` or spaces."""
    out = _NAME_OK.sub("-", str(name)).strip("-")
    return out or "transcoder"


def default_name(cfg) -> str:
    """The readable name of a transcoder whose config names none: model, kind, skip, width
    (e.g. ``smollm2-135m-instruct-clt-skip-256``). Never the folder: a copy keeps its name."""
    model = (cfg.model_name or "model").rsplit("/", 1)[-1].lower()
    parts = [model, cfg.kind] + (["skip"] if cfg.skip else []) + [str(cfg.n_features)]
    return clean_name("-".join(parts))


def hub_name(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """The readable name of a published transcoder: its repository (``org--name``), its
    sub-folder and its revision, e.g. ``mntss--clt-gemma-2-2b-426k+1a2b3c4d5e6f`` (a commit is
    shortened to 12 hex digits). Stored graphs then say which published set they came from."""
    parts = [repo_id.replace("/", "--")]
    if subfolder:
        parts.append(subfolder.strip("/").replace("/", "--"))
    name = "--".join(parts)
    if revision:
        rev = revision[:12] if re.fullmatch(r"[0-9a-f]{40}", revision) else revision
        name += f"+{rev}"
    return clean_name(name)


def _spread(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long().unique()


def _feed(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.view(torch.int16).numpy().tobytes())


def fingerprint(clt) -> str:
    """The content fingerprint of a :class:`~transcoders.clt.CrossLayerTranscoder` (see the
    module docstring for what it covers). Reads decoder rows only, never a whole decoder."""
    cfg = clt.cfg
    h = hashlib.blake2b(digest_size=FINGERPRINT_CHARS // 2)
    conf = {k: getattr(cfg, k) for k in COMPUTATIONAL_FIELDS}
    h.update(json.dumps(conf, sort_keys=True, default=str).encode())
    for name in ("b_enc", "b_dec", "threshold"):
        _feed(h, getattr(clt, name))
    enc_rows = _spread(cfg.n_features, ENCODER_ROWS)
    dec_rows = _spread(cfg.n_features, DECODER_ROWS)
    skip_rows = _spread(cfg.d_model, SKIP_ROWS)
    for layer in range(cfg.n_layers):
        _feed(h, clt.W_enc[layer][enc_rows])
        _feed(h, clt.decoder_rows(layer, dec_rows))
        if clt.W_skip is not None:
            _feed(h, clt.W_skip[layer][skip_rows])
    return h.hexdigest()


def identity_of(clt) -> TranscoderIdentity:
    """The identity of a transcoder: its config's ``name`` (or :func:`default_name`) and its
    :func:`fingerprint` (``CrossLayerTranscoder.identity`` calls this, and keeps the result for
    a loaded transcoder)."""
    name = clean_name(clt.cfg.name) if clt.cfg.name else default_name(clt.cfg)
    return TranscoderIdentity(name, fingerprint(clt))
