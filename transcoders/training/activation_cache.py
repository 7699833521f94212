"""An on-disk cache of MLP input/output activations: harvest once, train many passes.

Harvesting runs the model (about 185 tokens/s for SmolLM2 on a 2-core CPU) and is the costly
part of training a transcoder there; a cache makes every harvested token reusable: many passes
in one run, exact resumes without re-harvesting, and several recipes (widths, k, lr) trained
from one harvest.

A cache folder holds ``manifest.json`` and, per *token set*, two raw row-major arrays
``<set>.inputs.bin`` and ``<set>.outputs.bin`` of shape [rows, L, d] in the cache dtype, read
through ``numpy.memmap``. A token set is one token array [S, P] (rows start with BOS):
``train`` (the training sequences, harvested as a growing prefix: a later run asking for more
tokens extends it) and ``heldout-<sha>`` (one held-out array, named by its content). Sequence s
occupies rows [s * keep, (s + 1) * keep), keep = P - skip_bos; row s * keep + j is position
j + skip_bos of sequence s.

A set is harvested in *chunks* of ``chunk_sequences`` sequences. A chunk's rows are written
and fsynced before the manifest (rewritten atomically: temporary file, fsync, rename, under a
file lock, so data-parallel ranks can harvest disjoint chunks of one cache) records it as
complete with its sequence range, the sha256 of its tokens and its harvest time. A killed
harvest therefore continues from its last complete chunk, and a chunk is only ever read after
it is complete. Every use of a complete chunk checks its token hash, so a cache is never read
for other tokens.

The manifest names what the activations are of (:class:`CacheSpec`: model name and
identity, input and output sites, layers, width, skip_bos, corpus, dtype); opening a cache
with another spec is refused with a one-line :class:`CacheMismatch`.

Dtype: float16 by default. On SmolLM2-135M (16 sequences of the public corpus) the largest
magnitudes are 24,919 (``resid_mid``, start token, layers 12-28) and 24,882 (layer 11's MLP
output at the start token), 1,079 without start tokens: inside float16's range (65,504), with a
round-trip relative error of 2.1e-4 (bfloat16: 1.7e-3). A value float16 cannot hold is a clear
:class:`CacheOverflow` naming the layer, never a silent inf; ``bfloat16`` (stored as its 16 raw
bits, uint16 on disk) and ``float32`` caches are there for such models. A float32 cache returns
exactly what the harvest computed; a float16 one returns exactly the harvest rounded to float16.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from transcoders.training.harvest import ActivationFn, harvest_rows

MANIFEST = "manifest.json"
FORMAT = "circuit-atlas activation cache"
VERSION = 1
CacheDtype = Literal["float16", "bfloat16", "float32"]
# On-disk numpy dtype and the torch dtype it is viewed as.
_NP: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.int16),
    "float32": np.dtype(np.float32),
}
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
F16_MAX = 65504.0


def _advise_random(m: np.memmap) -> None:
    """Tell the kernel that ``m`` is read in random order, so it does not read ahead.

    Training reads rows (one token: L x d values, 35 KB for SmolLM2 in float16) in random order.
    With the default readahead each row fault read megabytes around it: once a 60-minute
    harvest (38 GB) outgrew the page cache, training read 0.8-1.2 GB/s from disk and its steps
    took 1.8 s instead of 0.85 s (``vmstat`` during ``scripts/bench_training.py
    --budget-minutes 60``)."""
    mm = getattr(m, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)


class CacheMismatch(ValueError):
    """The cache holds activations of another model, site, corpus or dtype than asked for."""


class CacheOverflow(ValueError):
    """An activation does not fit the cache dtype (float16 beyond 65,504)."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache's activations are of. All fields must match to reuse a cache.

    ``model_id`` identifies the weights beyond their name (e.g. a fingerprint of the model's
    folder); ``corpus`` names the token corpus (its content is checked chunk by chunk)."""

    model: str
    n_layers: int
    d_model: int
    input_site: str = "mlp_in"
    output_site: str = "mlp_out"
    skip_bos: bool = True
    model_id: str = ""
    corpus: str = ""
    dtype: CacheDtype = "float16"

    def folder_name(self) -> str:
        """A folder name keyed by every field: ``<model>-<input_site>-<hash>``."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{Path(self.model).name.lower()}-{self.input_site}-{digest[:10]}"

    def describe(self) -> str:
        return (
            f"model {self.model!r} (id {self.model_id or '-'}), {self.input_site} -> "
            f"{self.output_site}, {self.n_layers} layers x {self.d_model}, skip_bos "
            f"{self.skip_bos}, corpus {self.corpus or '-'}, {self.dtype}"
        )


def tokens_sha256(tokens: np.ndarray | torch.Tensor) -> str:
    """sha256 of token ids [S, P] as little-endian int64 (the identity of what was harvested)."""
    arr = np.ascontiguousarray(np.asarray(tokens), dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def heldout_set(tokens: np.ndarray | torch.Tensor) -> str:
    """The set name of a held-out token array: ``heldout-`` plus its content hash."""
    return "heldout-" + tokens_sha256(tokens)[:12]


class CachedActivations:
    """A read-only view of the first ``len(self)`` rows of a token set.

    ``inputs``, ``outputs``: numpy memmaps [N, L, d] in the on-disk dtype."""

    def __init__(self, inputs: np.memmap, outputs: np.memmap, dtype: CacheDtype):
        self.inputs = inputs
        self.outputs = outputs
        self.dtype = dtype

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def get(self, rows: np.ndarray | torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as float32 CPU tensors: inputs [L, n, d], outputs [L, n, d]."""
        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        return self._tensor(self.inputs[rows]), self._tensor(self.outputs[rows])

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))  # a copy: memmaps are read-only
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.float().transpose(0, 1)


class ActivationCache:
    """A cache folder for one :class:`CacheSpec` (created when missing, else checked)."""

    def __init__(self, folder: str | os.PathLike, spec: CacheSpec):
        self.folder = Path(folder).expanduser()
        self.spec = spec
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            mf = self._read()
            if mf is None:
                spec_d = asdict(spec)
                self._write({"format": FORMAT, "version": VERSION, "spec": spec_d, "sets": {}})
            else:
                check_spec(self.folder, mf, spec)

    # --- reading -----------------------------------------------------------------------------

    def manifest(self) -> dict:
        mf = self._read()
        if mf is None:
            raise CacheMismatch(f"{self.folder} has no {MANIFEST}: not an activation cache")
        return mf

    def complete_sequences(self, name: str, tokens: np.ndarray | torch.Tensor) -> int:
        """How many leading sequences of ``tokens`` set ``name`` holds (checked against the
        recorded token hashes: a mismatch is a :class:`CacheMismatch`)."""
        rec = self.manifest()["sets"].get(name)
        if rec is None:
            return 0
        self._check_shape(name, rec, tokens)
        n = 0
        for entry in _leading_chunks(rec, len(tokens)):
            self._check_chunk(name, entry, tokens)
            n = entry["sequences"][1]
        return n

    def read(self, name: str, n_sequences: int) -> CachedActivations:
        """Memory-mapped rows of sequences [0, n_sequences) of set ``name`` (all complete)."""
        rec = self.manifest()["sets"].get(name)
        have = 0
        for entry in _leading_chunks(rec or {"chunks": {}}, 1 << 62):
            have = entry["sequences"][1]
        if rec is None or have < n_sequences:
            raise ValueError(
                f"activation cache {self.folder}: set {name!r} holds {have} complete sequences, "
                f"{n_sequences} asked for (harvest them first)"
            )
        keep = rec["seq_len"] - int(self.spec.skip_bos)
        shape = (n_sequences * keep, self.spec.n_layers, self.spec.d_model)
        dt = _NP[self.spec.dtype]
        maps = [
            np.memmap(self._file(name, k), dtype=dt, mode="r", shape=shape)
            for k in ("inputs", "outputs")
        ]
        for m in maps:
            _advise_random(m)
        return CachedActivations(maps[0], maps[1], self.spec.dtype)

    def harvest_seconds(self, name: str) -> tuple[int, float]:
        """(tokens, seconds) the complete chunks of set ``name`` took to harvest."""
        rec = self.manifest()["sets"].get(name)
        if not rec:
            return 0, 0.0
        keep = rec["seq_len"] - int(self.spec.skip_bos)
        chunks = rec["chunks"].values()
        n = sum((c["sequences"][1] - c["sequences"][0]) * keep for c in chunks)
        return n, sum(c["seconds"] for c in chunks)

    # --- writing -----------------------------------------------------------------------------

    @torch.no_grad()
    def harvest(
        self,
        name: str,
        tokens: np.ndarray | torch.Tensor,
        activations: ActivationFn,
        n_sequences: int | None = None,
        *,
        chunk_sequences: int = 16,
        batch: int = 8,
        rank: int = 0,
        world: int = 1,
        on_chunk: Callable[[int, int, float], None] | None = None,
    ) -> None:
        """Make sequences [0, n_sequences) of ``tokens`` [S, P] complete in set ``name``.

        Complete chunks are checked and kept; missing ones are harvested (rank ``rank`` of
        ``world`` takes chunks c with c % world == rank), ``batch`` sequences per
        ``activations`` call. ``on_chunk(chunk, n_tokens, seconds)`` follows each chunk."""
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        S, P = tokens.shape
        n_sequences = S if n_sequences is None else min(n_sequences, S)
        with self._locked():
            mf = self.manifest()
            rec = mf["sets"].setdefault(
                name, {"seq_len": P, "chunk_sequences": chunk_sequences, "chunks": {}}
            )
            self._check_shape(name, rec, tokens)
            self._write(mf)
        c = rec["chunk_sequences"]
        keep = P - int(self.spec.skip_bos)
        for chunk in range(-(-n_sequences // c)):
            lo, hi = chunk * c, min((chunk + 1) * c, S)
            done = rec["chunks"].get(str(chunk))
            if done is not None and done["sequences"] == [lo, hi]:
                self._check_chunk(name, done, tokens)
                continue
            if chunk % world != rank:
                continue
            t0 = time.perf_counter()
            for b in range(lo, hi, batch):
                x, y = harvest_rows(activations, tokens[b : min(b + batch, hi)], self.spec.skip_bos)
                self._check_layout(x)
                row = b * keep
                for kind, t in (("inputs", x), ("outputs", y)):
                    self._write_rows(name, kind, row, self._encode(t, kind))
            for kind in ("inputs", "outputs"):
                _fsync(self._file(name, kind))
            seconds = time.perf_counter() - t0
            entry = {
                "sequences": [lo, hi],
                "sha256": tokens_sha256(tokens[lo:hi]),
                "seconds": round(seconds, 4),
            }
            with self._locked():
                mf = self.manifest()
                mf["sets"][name]["chunks"][str(chunk)] = entry
                self._write(mf)
            rec["chunks"][str(chunk)] = entry
            if on_chunk is not None:
                on_chunk(chunk, (hi - lo) * keep, seconds)

    # --- internals ---------------------------------------------------------------------------

    def _encode(self, t: torch.Tensor, kind: str) -> np.ndarray:
        """[n, L, d] activations -> the on-disk array (overflow is an error, not an inf)."""
        t = t.detach().to("cpu", torch.float32)
        if self.spec.dtype == "float16":
            over = t.abs().amax(dim=(0, 2)) > F16_MAX  # [L]
            if bool(over.any()):
                layer = int(over.nonzero()[0])
                big = float(t[:, layer].abs().max())
                raise CacheOverflow(
                    f"{kind} of layer {layer} reach {big:.4g}, beyond float16's 65504: use a "
                    "bfloat16 or float32 activation cache (TrainConfig.cache_dtype)"
                )
        out = t.to(_TORCH[self.spec.dtype]).contiguous()
        if self.spec.dtype == "bfloat16":
            out = out.view(torch.int16)
        return out.numpy()

    def _check_layout(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != (self.spec.n_layers, self.spec.d_model):
            raise CacheMismatch(
                f"activations() returned {x.shape[1]} layers x {x.shape[2]} but the cache "
                f"{self.folder} is for {self.spec.n_layers} x {self.spec.d_model}"
            )

    def _check_shape(self, name: str, rec: dict, tokens) -> None:
        P = tuple(np.shape(tokens))[1]
        if rec["seq_len"] != P:
            raise CacheMismatch(
                f"activation cache {self.folder}: set {name!r} holds sequences of "
                f"{rec['seq_len']} tokens, these are {P}: give another cache folder"
            )

    def _check_chunk(self, name: str, entry: dict, tokens) -> None:
        lo, hi = entry["sequences"]
        if tokens_sha256(np.asarray(tokens)[lo:hi]) != entry["sha256"]:
            raise CacheMismatch(
                f"activation cache {self.folder}: sequences {lo}-{hi - 1} of set {name!r} were "
                "harvested from other tokens (another corpus or split): give another cache folder"
            )

    def _file(self, name: str, kind: str) -> Path:
        return self.folder / f"{name}.{kind}.bin"

    def _write_rows(self, name: str, kind: str, row: int, arr: np.ndarray) -> None:
        fd = os.open(self._file(name, kind), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            data = memoryview(arr.reshape(-1).view(np.uint8))
            offset = row * arr[0].nbytes
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
        finally:
            os.close(fd)

    def _read(self) -> dict | None:
        p = self.folder / MANIFEST
        return json.loads(p.read_text()) if p.exists() else None

    def _write(self, mf: dict) -> None:
        p = self.folder / MANIFEST
        tmp = p.with_name(f".{MANIFEST}.tmp{os.getpid()}")
        with open(tmp, "w") as fh:
            json.dump(mf, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def check_spec(folder: Path, manifest: dict, spec: CacheSpec) -> None:
    """Refuse a cache whose manifest names another spec (one line naming what differs)."""
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatch(f"{folder} is not a version-{VERSION} activation cache")
    have = manifest["spec"]
    diff = [k for k, v in asdict(spec).items() if have.get(k) != v]
    if diff:
        got = ", ".join(f"{k} {have.get(k)!r} (this run: {getattr(spec, k)!r})" for k in diff)
        raise CacheMismatch(
            f"activation cache {folder} holds other activations: {got}; give another --cache "
            "folder (or delete this one)"
        )


def _leading_chunks(rec: dict, limit: int) -> Iterator[dict]:
    """The complete chunks of a set record from chunk 0 on, while they are contiguous and lie
    inside the first ``limit`` sequences."""
    k = 0
    while (entry := rec["chunks"].get(str(k))) is not None:
        lo, hi = entry["sequences"]
        if hi > limit:
            return
        yield entry
        if hi != lo + rec["chunk_sequences"]:
            return  # a short (last) chunk ends the set
        k += 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
