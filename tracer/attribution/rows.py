"""The attribution rows of one prompt, in one preallocated buffer, and influence over them.

Row r holds the edges into one target (a logit, or a feature's pre-activation) from every
column (source): [capacity, n_cols] float32, feature columns in position-major order (see
:class:`~tracer.attribution.linear.FrozenLinearModel`). Rows are nearly dense (every earlier
source reaches a target), so dense float32 is the compact form: 4 bytes an edge.

The buffer is allocated once for the whole run (``n_logits + max_feature_nodes`` rows) where the
memory plan puts it: on the compute device, in host memory, or in a memory-mapped file on disk
when the host is short too (the role of circuit-tracer's ``offload`` option). The sweep writes
into it directly (through a device buffer when the store is elsewhere), and influence is
computed from it in chunks on the compute device: no re-concatenation of all rows.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

PLACEMENTS = ("device", "host", "disk")
CHUNK_BYTES = 64 * 2**20  # rows moved or scanned at once when the store is read in chunks


class RowStore:
    """Rows [capacity, n_cols] (compute dtype), their target nodes and |row| sums.

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
        dtype: torch.dtype = torch.float32,
        placement: str = "device",
        spill_dir: str | os.PathLike | None = None,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown row store placement {placement!r}: use {PLACEMENTS}")
        self.capacity, self.n_cols = capacity, n_cols
        self.device, self.dtype, self.placement = device, dtype, placement
        self._file = None
        if placement == "disk":
            # An unlinked temporary file: its pages go back to the disk, not to swap, and the
            # file disappears with the mapping.
            self._file = tempfile.TemporaryFile(dir=spill_dir, prefix="circuit-atlas-rows-")
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            mm = np.memmap(self._file, dtype=np_dtype, mode="w+", shape=(capacity, n_cols))
            self.rows = torch.from_numpy(mm)
        else:
            where = device if placement == "device" else torch.device("cpu")
            self.rows = torch.zeros(capacity, n_cols, dtype=dtype, device=where)
        self.node = torch.empty(capacity, dtype=torch.long, device=device)
        self.abs_sum = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def on_device(self) -> bool:
        return self.rows.device == self.device

    @property
    def nbytes(self) -> int:
        return self.capacity * self.n_cols * self.rows.element_size()

    def add(self, nodes: torch.Tensor, fill, tolerance: float = 0.0) -> None:
        """Append len(nodes) rows: ``fill(buf)`` writes them into ``buf`` [R, n_cols] (zero on
        entry, on the compute device). Edges below ``tolerance`` x the row's largest |edge|
        are set to zero."""
        R = len(nodes)
        if self.n + R > self.capacity:
            raise ValueError(f"row store full: {self.n} + {R} rows > capacity {self.capacity}")
        r0, r1 = self.n, self.n + R
        if self.on_device:
            buf = self.rows[r0:r1]
        else:
            buf = torch.zeros(R, self.n_cols, dtype=self.dtype, device=self.device)
        fill(buf)
        if tolerance > 0:
            cut = tolerance * buf.abs().amax(dim=1, keepdim=True)
            buf.masked_fill_(buf.abs() < cut, 0.0)
        self.abs_sum[r0:r1] = buf.abs().sum(dim=1, dtype=torch.float64)
        if not self.on_device:
            self.rows[r0:r1].copy_(buf)
        self.node[r0:r1] = nodes.to(self.device)
        self.n = r1

    def chunks(self, cols: torch.Tensor | slice | None = None, order: torch.Tensor | None = None):
        """(row indices [n] on the compute device, rows [n, width] on the compute device) over
        the stored rows, in storage order or in ``order``, in chunks of about CHUNK_BYTES;
        ``cols`` picks columns (a slice, or an index tensor) without copying the others."""
        if cols is None:
            cols = slice(0, self.n_cols)
        if isinstance(cols, slice):
            width = len(range(*cols.indices(self.n_cols)))
        else:
            width = len(cols)
            cols = cols.to(self.rows.device)
        step = max(1, int(CHUNK_BYTES // max(1, width * self.rows.element_size())))
        for r0 in range(0, self.n, step):
            r1 = min(self.n, r0 + step)
            if order is None:
                idx = torch.arange(r0, r1, device=self.device)
                block = self.rows[r0:r1][:, cols]  # a view, or a gather of the chosen columns
            else:
                idx = order[r0:r1].to(self.device)
                ri = idx.to(self.rows.device)
                if isinstance(cols, slice):
                    block = self.rows[ri][:, cols]
                else:  # rows and columns in one gather: no full-width copy
                    block = self.rows[ri[:, None], cols[None, :]]
            yield idx, block.to(self.device)

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
        total = torch.zeros(n_feat, dtype=torch.float64, device=dev)
        for idx, block in self.chunks(slice(0, n_feat)):
            total += (block.abs().T @ w[idx]).double()
        return total

    def close(self) -> None:
        self.rows = torch.empty(0)
        if self._file is not None:
            self._file.close()
            self._file = None
