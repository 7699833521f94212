"""The attribution rows of one prompt, in one preallocated buffer, and influence over them.

Row r holds the edges into one target (a logit, or a feature's pre-activation) from every
column (source): feature columns in position-major order (see
:class:`~tracer.attribution.linear.FrozenLinearModel`), then error and token columns. Rows are
nearly dense where they can be non-zero, so dense float32 is the compact form: 4 bytes an edge.

Rows are stored *causally*: a target at position p receives nothing from features at later
positions, and in position-major order those are the tail of the feature columns. So row r
keeps only its first ``width[r]`` feature columns (the features at positions <= its own), then
all error and token columns, packed one after another in a flat buffer. On a long prompt this
roughly halves the store (a row at position p holds about p / P of the features).

The buffer is allocated once for the whole run (``n_logits + max_feature_nodes`` full-width
rows at most) where the memory plan puts it: on the compute device, in host memory, or in a
memory-mapped file on disk when the host is short too (the role of circuit-tracer's
``offload`` option). Host and disk pages are taken only as rows are written, so resident memory
follows the rows actually stored, not the worst case. Influence and the graph read the rows back
in chunks on the compute device: no re-concatenation of all rows.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

PLACEMENTS = ("device", "host", "disk")
CHUNK_BYTES = 64 * 2**20  # rows moved or scanned at once when the store is read in chunks
# Bytes a gathered chunk element costs while it is read back: the flat index (int64), the
# causal mask and the value itself.
_GATHER_BYTES = 8 + 1 + 4


class RowStore:
    """Causal rows (compute dtype, packed), their target nodes, widths and |row| sums.

    capacity: rows at most; n_cols: columns of a full row; n_feat: the leading feature columns
    (position-major) that a row may cut short (default: none, every row full width).
    node[r]: the pm column of a feature row's target, or ``-1 - k`` for logit k.
    placement: ``device`` (the compute device), ``host`` (CPU memory) or ``disk`` (a
    memory-mapped temporary file in ``spill_dir``, removed when the store is dropped).
    """

    def __init__(
        self,
        capacity: int,
        n_cols: int,
        *,
        device: torch.device,
        n_feat: int = 0,
        dtype: torch.dtype = torch.float32,
        placement: str = "device",
        spill_dir: str | os.PathLike | None = None,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown row store placement {placement!r}: use {PLACEMENTS}")
        if not 0 <= n_feat <= n_cols:
            raise ValueError(f"n_feat {n_feat} must be within 0 .. n_cols {n_cols}")
        self.capacity, self.n_cols, self.n_feat = capacity, n_cols, n_feat
        self.n_rest = n_cols - n_feat  # error and token columns: every row keeps them all
        self.device, self.dtype, self.placement = device, dtype, placement
        self._file = None
        size = capacity * n_cols  # the worst case: every row full width
        if placement == "disk":
            # An unlinked, sparse temporary file: its pages go back to the disk, not to swap,
            # only written pages take disk space, and the file disappears with the mapping.
            self._file = tempfile.TemporaryFile(dir=spill_dir, prefix="circuit-atlas-rows-")
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            mm = np.memmap(self._file, dtype=np_dtype, mode="w+", shape=(max(size, 1),))
            self.flat = torch.from_numpy(mm)
        else:
            # torch.empty: on the host, pages become resident only when a row is written.
            where = device if placement == "device" else torch.device("cpu")
            self.flat = torch.empty(max(size, 1), dtype=dtype, device=where)
        self.node = torch.empty(capacity, dtype=torch.long, device=device)
        self.width = torch.empty(capacity, dtype=torch.long, device=device)
        self.offset = torch.empty(capacity, dtype=torch.long, device=device)
        self.abs_sum = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.n = 0
        self.used = 0  # elements of ``flat`` written so far

    @property
    def nbytes(self) -> int:
        """The buffer's size: ``capacity`` full-width rows (the most it can take)."""
        return self.capacity * self.n_cols * self.flat.element_size()

    @property
    def used_bytes(self) -> int:
        """Bytes of the rows stored so far (causal widths)."""
        return self.used * self.flat.element_size()

    def add(self, nodes: torch.Tensor, fill, tolerance: float = 0.0,
            widths: torch.Tensor | None = None) -> None:  # fmt: skip
        """Append len(nodes) rows: ``fill(buf)`` writes them into ``buf`` [R, n_cols] (zero on
        entry, on the compute device). ``widths`` [R]: how many leading feature columns each
        row keeps (the columns after it must be zero; default: all ``n_feat``). Edges below
        ``tolerance`` x the row's largest |edge| are set to zero."""
        R = len(nodes)
        if self.n + R > self.capacity:
            raise ValueError(f"row store full: {self.n} + {R} rows > capacity {self.capacity}")
        if widths is None:
            widths = torch.full((R,), self.n_feat, dtype=torch.long)
        w = widths.to(torch.long).cpu()
        if len(w) != R or bool(((w < 0) | (w > self.n_feat)).any()):
            raise ValueError(f"row widths must be {R} values within 0 .. {self.n_feat}")
        buf = torch.zeros(R, self.n_cols, dtype=self.dtype, device=self.device)
        fill(buf)
        if tolerance > 0:
            cut = tolerance * buf.abs().amax(dim=1, keepdim=True)
            buf.masked_fill_(buf.abs() < cut, 0.0)
        r0, r1 = self.n, self.n + R
        self.abs_sum[r0:r1] = buf.abs().sum(dim=1, dtype=torch.float64)
        sizes = w + self.n_rest
        offsets = self.used + torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        rest = buf[:, self.n_feat :]
        packed = torch.cat(
            [part for i, wi in enumerate(w.tolist()) for part in (buf[i, :wi], rest[i])]
        )
        end = self.used + int(sizes.sum())
        self.flat[self.used : end].copy_(packed)
        self.offset[r0:r1] = offsets.to(self.device)
        self.width[r0:r1] = w.to(self.device)
        self.node[r0:r1] = nodes.to(self.device)
        self.n, self.used = r1, end

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row r as (its first ``width[r]`` feature columns, its error and token columns):
        views into the buffer (where the buffer lives)."""
        o, w = int(self.offset[r]), int(self.width[r])
        return self.flat[o : o + w], self.flat[o + w : o + w + self.n_rest]

    def _gather(self, idx: torch.Tensor, cols: torch.Tensor, is_rest: torch.Tensor):
        """Rows ``idx`` at columns ``cols`` as a dense block [len(idx), len(cols)] on the
        compute device; columns a row cut off (causally zero) read as zero."""
        w = self.width[idx][:, None]
        pos = torch.where(is_rest[None, :], w + (cols - self.n_feat)[None, :], cols[None, :])
        valid = is_rest[None, :] | (cols[None, :] < w)
        flat_idx = torch.where(valid, self.offset[idx][:, None] + pos, 0)
        block = self.flat[flat_idx.to(self.flat.device)].to(self.device)
        return block.masked_fill_(~valid, 0.0)

    def chunks(self, cols: torch.Tensor | slice | None = None, order: torch.Tensor | None = None):
        """(row indices [n] on the compute device, dense rows [n, width] on the compute device)
        over the stored rows, in storage order or in ``order``, in chunks of about CHUNK_BYTES;
        ``cols`` picks columns (a slice, or an index tensor)."""
        if cols is None:
            cols = slice(0, self.n_cols)
        if isinstance(cols, slice):
            cols = torch.arange(*cols.indices(self.n_cols), device=self.device)
        cols = cols.to(self.device, torch.long)
        is_rest = cols >= self.n_feat
        step = max(1, int(CHUNK_BYTES // max(1, len(cols) * _GATHER_BYTES)))
        for r0 in range(0, self.n, step):
            r1 = min(self.n, r0 + step)
            if order is None:
                idx = torch.arange(r0, r1, device=self.device)
            else:
                idx = order[r0:r1].to(self.device)
            yield idx, self._gather(idx, cols, is_rest)

    def influence(self, logit_weights: torch.Tensor, n_feat: int) -> torch.Tensor:
        """Estimated influence of every feature column on the logits through the rows stored
        so far: logit weights times (N + N^2 + ...) with N = |A| row-normalised. [n_feat]
        (pm column order), float64, on the compute device.

        Paths pass only through targets that have rows, so the propagation runs on the small
        [rows, rows-with-feature-targets] block of N; one pass over the store then spreads
        the total onto every column.
        """
        n, dev = self.n, self.device
        node = self.node[:n]
        s = self.abs_sum[:n].clone()
        s[s == 0] = 1.0
        is_logit = node < 0
        x = torch.zeros(n, dtype=torch.float64, device=dev)
        lw = logit_weights.to(dev, torch.float64)
        x[is_logit] = lw[-1 - node[is_logit]]
        feat_rows = (~is_logit).nonzero().squeeze(1)
        cols = node[feat_rows]
        # S[r, j] = N[r, cols[j]]: the influence a row passes to the j-th feature row's target.
        S = torch.empty(n, len(cols), dtype=torch.float32, device=dev)
        for idx, block in self.chunks(cols):
            S[idx] = block.abs() / s[idx, None].float()
        total_x = x.clone()
        for _ in range(n + 2):  # a DAG: paths are at most 2 x n_layers + 2 long
            y = S.T @ x.float()
            x = torch.zeros_like(x)
            x[feat_rows] = y.double()
            if float(x.sum()) < 1e-12:
                break
            total_x += x
        del S
        w = (total_x / s).float()
        # Spread onto the columns chunk by chunk: the packed rows are unpacked into one dense
        # block [step, n_feat] (zeros past each row's width), then one product per chunk.
        total = torch.zeros(n_feat, dtype=torch.float64, device=dev)
        step = max(1, int(CHUNK_BYTES // max(1, n_feat * 4)))
        block = torch.zeros(min(step, max(n, 1)), n_feat, dtype=self.dtype, device=dev)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            block.zero_()
            for r in range(r0, r1):
                feat, _ = self.row(r)
                block[r - r0, : len(feat)] = feat[:n_feat]
            total += (block[: r1 - r0].abs().T @ w[r0:r1]).double()
        return total

    def close(self) -> None:
        self.flat = torch.empty(0)
        if self._file is not None:
            self._file.close()
            self._file = None
