"""The attribution rows of one prompt, in one preallocated buffer, and influence over them.

Row r holds the edges into one target (a logit, or a feature's pre-activation) from every
column (source): feature columns in position-major order (see
:class:`~tracer.attribution.linear.FrozenLinearModel`), then error and token columns. Rows are
nearly dense where they can be non-zero, so dense float32 is the compact form: 4 bytes an edge.

Rows are stored *causally*: a target at layer l and position p receives nothing from features
at later positions or at layers l and above (they write after the target reads). So row r keeps
only the feature columns at positions <= its own and layers below its own
(:class:`CausalColumns`), packed, then all error and token columns. On a long prompt this keeps
well under half of the feature columns.

The buffer is allocated once for the whole run (``n_logits + max_feature_nodes`` full-width
rows at most) where the memory plan puts it: on the compute device, in host memory, or in a
memory-mapped file on disk when the host is short too (the role of circuit-tracer's
``offload`` option). Host and disk pages are taken only as rows are written, so resident memory
follows the rows actually stored, not the worst case. On disk the process lets go of the pages
as soon as it has written or read them (``madvise(MADV_DONTNEED)``: the data stays in the file
and the page cache, which the kernel may evict), so the spilled rows do not count in its
resident memory. Influence and the graph read the rows back in chunks on the compute device: no
re-concatenation of all rows.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np
import torch

PLACEMENTS = ("device", "host", "disk")
CHUNK_BYTES = 64 * 2**20  # rows moved or scanned at once when the store is read in chunks
# Bytes a gathered chunk element costs while it is read back: five int64 index temporaries,
# two masks and the value itself.
_GATHER_BYTES = 5 * 8 + 2 + 4
# Bytes an element of the rows being added costs in RowStore.add: the full-width float32 buffer
# the sweep fills, its absolute values (row sums), the keep masks (bool) and the packed copy.
ADD_BYTES = 4 + 4 + 1 + 1 + 4


class CausalColumns:
    """Which feature columns (pm order) can reach a target at (layer, position), and where each
    sits in a packed row.

    pm_pos, pm_layer [n_feat]: position and layer of each pm column (sorted by position, then
    layer, as :class:`~tracer.attribution.linear.FrozenLinearModel` numbers them). A row of a
    target at (l, p) keeps the columns with position <= p and layer < l, in pm order; a logit
    target is (n_layers, n_pos - 1): every column.
    """

    def __init__(self, pm_pos: torch.Tensor, pm_layer: torch.Tensor, n_layers: int, n_pos: int):
        dev = pm_pos.device
        self.pos, self.layer = pm_pos.long(), pm_layer.long()
        L, P = n_layers, n_pos
        counts = torch.zeros(P, L + 1, dtype=torch.long, device=dev)
        counts.index_put_((self.pos, self.layer + 1), torch.ones_like(self.pos), accumulate=True)
        below = counts.cumsum(1)  # [P, L + 1]: features at position q with layer < l
        # cum[l, q]: kept columns at positions < q for a target at layer l.
        zero = torch.zeros(L + 1, 1, dtype=torch.long, device=dev)
        self.cum = torch.cat([zero, below.T.cumsum(1)], dim=1)  # [L + 1, P + 1]
        self.pos_start = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                                    below[:, -1].cumsum(0)])  # fmt: skip  # [P + 1]
        self.rank = torch.arange(len(self.pos), device=dev) - self.pos_start[self.pos]

    def mask(self, layer: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor | None = None):
        """[n, len(cols)] bool: column kept by each target (cols default: every column)."""
        cp, cl = (self.pos, self.layer) if cols is None else (self.pos[cols], self.layer[cols])
        return (cp[None, :] <= pos.long()[:, None]) & (cl[None, :] < layer.long()[:, None])

    def index(self, layer: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[n, len(cols)]: each kept column's place in its packed row (any value where the
        column is not kept)."""
        return self.cum[layer.long()[:, None], self.pos[cols][None, :]] + self.rank[cols][None, :]


class RowStore:
    """Causal rows (compute dtype, packed), their target nodes and |row| sums.

    capacity: rows at most; n_cols: columns of a full row; n_feat: the leading feature columns
    (pm order); causal: which of them each target keeps (None: all of them, every row full).
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
        causal: CausalColumns | None = None,
        dtype: torch.dtype = torch.float32,
        placement: str = "device",
        spill_dir: str | os.PathLike | None = None,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown row store placement {placement!r}: use {PLACEMENTS}")
        if not 0 <= n_feat <= n_cols or (causal is not None and len(causal.pos) != n_feat):
            raise ValueError(f"n_feat {n_feat} must be within 0 .. n_cols {n_cols} and match "
                             "the causal columns")  # fmt: skip
        self.capacity, self.n_cols, self.n_feat = capacity, n_cols, n_feat
        self.n_rest = n_cols - n_feat  # error and token columns: every row keeps them all
        self.causal = causal
        self.device, self.dtype, self.placement = device, dtype, placement
        self._file = None
        size = max(capacity * n_cols, 1)  # the worst case: every row full width
        self._map: mmap.mmap | None = None
        if placement == "disk":
            # An unlinked, sparse temporary file: its pages go back to the disk, not to swap,
            # only written pages take disk space, and the file disappears with the mapping.
            self._file = tempfile.TemporaryFile(dir=spill_dir, prefix="circuit-atlas-rows-")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            os.ftruncate(self._file.fileno(), size * itemsize)
            self._map = mmap.mmap(self._file.fileno(), size * itemsize)
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self.flat = torch.from_numpy(np.frombuffer(self._map, dtype=np_dtype, count=size))
        else:
            # torch.empty: on the host, pages become resident only when a row is written.
            where = device if placement == "device" else torch.device("cpu")
            self.flat = torch.empty(size, dtype=dtype, device=where)
        self.node = torch.empty(capacity, dtype=torch.long, device=device)
        self.t_layer = torch.empty(capacity, dtype=torch.long, device=device)
        self.t_pos = torch.empty(capacity, dtype=torch.long, device=device)
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
        """Bytes of the rows stored so far (packed)."""
        return self.used * self.flat.element_size()

    def _kept(self, layer: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor | None = None):
        """[n, cols] bool: the feature columns each target keeps."""
        if self.causal is None:
            width = self.n_feat if cols is None else len(cols)
            return torch.ones(len(layer), width, dtype=torch.bool, device=self.device)
        return self.causal.mask(layer, pos, cols)

    def add(
        self,
        nodes: torch.Tensor,
        fill,
        tolerance: float = 0.0,
        layer: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> None:
        """Append len(nodes) rows: ``fill(buf)`` writes them into ``buf`` [R, n_cols] (zero on
        entry, on the compute device). layer, pos [R]: each row's target (a feature's layer
        and position; a logit is (n_layers, n_pos - 1)); the feature columns it cannot
        receive from must be zero in ``buf`` (needed when the store is causal). Edges below
        ``tolerance`` x the row's largest |edge| are set to zero."""
        R = len(nodes)
        if self.n + R > self.capacity:
            raise ValueError(f"row store full: {self.n} + {R} rows > capacity {self.capacity}")
        if self.causal is not None and (layer is None or pos is None):
            raise ValueError("a causal row store needs each row's target layer and position")
        dev = self.device
        layer = torch.zeros(R, dtype=torch.long) if layer is None else layer
        pos = torch.zeros(R, dtype=torch.long) if pos is None else pos
        layer, pos = layer.to(dev, torch.long), pos.to(dev, torch.long)
        buf = torch.zeros(R, self.n_cols, dtype=self.dtype, device=dev)
        fill(buf)
        if tolerance > 0:
            cut = tolerance * buf.abs().amax(dim=1, keepdim=True)
            buf.masked_fill_(buf.abs() < cut, 0.0)
        r0, r1 = self.n, self.n + R
        self.abs_sum[r0:r1] = buf.abs().sum(dim=1, dtype=torch.float64)
        kept = self._kept(layer, pos)
        widths = kept.sum(1)
        sizes = widths + self.n_rest
        offsets = self.used + torch.cumsum(sizes, 0) - sizes
        keep = torch.cat([kept, torch.ones(R, self.n_rest, dtype=torch.bool, device=dev)], 1)
        packed = buf[keep]  # row by row: its kept feature columns, then its error/token columns
        end = self.used + len(packed)
        self.flat[self.used : end].copy_(packed)
        self._release(self.used, end)
        self.offset[r0:r1], self.width[r0:r1] = offsets, widths
        self.t_layer[r0:r1], self.t_pos[r0:r1] = layer, pos
        self.node[r0:r1] = nodes.to(dev)
        self.n, self.used = r1, end

    def _release(self, start: int, end: int) -> None:
        """Disk placement: drop this process's pages of elements [start, end) of ``flat``
        (written back to the file first where dirty; read again from the page cache or the
        file when next touched). Elsewhere a no-op."""
        if self._map is None or end <= start:
            return
        isz = self.flat.element_size()
        lo = start * isz // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, lo, end * isz - lo)

    def _release_rows(self, idx: torch.Tensor) -> None:
        """Disk placement: drop the pages of rows ``idx`` (the span from the first to the end
        of the last of them)."""
        if self._map is None or len(idx) == 0:
            return
        off, width = self.offset[idx], self.width[idx] + self.n_rest
        self._release(int(off.min()), int((off + width).max()))

    def _gather(self, idx: torch.Tensor, cols: torch.Tensor, is_rest: torch.Tensor):
        """Rows ``idx`` at columns ``cols`` as a dense block [len(idx), len(cols)] on the
        compute device; columns a row does not keep (causally zero) read as zero."""
        w = self.width[idx][:, None]
        rest_at = w + (cols - self.n_feat)[None, :]
        if self.n_feat:
            fc = cols.clamp(max=self.n_feat - 1)
            lay, pos = self.t_layer[idx], self.t_pos[idx]
            kept = self._kept(lay, pos, fc)
            feat_at = fc[None, :] if self.causal is None else self.causal.index(lay, fc)
            at = torch.where(is_rest[None, :], rest_at, feat_at)
            valid = is_rest[None, :] | kept
        else:
            at, valid = rest_at, is_rest[None, :].expand(len(idx), -1)
        flat_idx = torch.where(valid, self.offset[idx][:, None] + at, 0)
        block = self.flat[flat_idx.to(self.flat.device)].to(self.device)
        self._release_rows(idx)
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
        # block [step, n_feat] (zeros where a row keeps no column), then one product per chunk.
        total = torch.zeros(n_feat, dtype=torch.float64, device=dev)
        step = max(1, int(CHUNK_BYTES // max(1, n_feat * 4)))
        block = torch.zeros(min(step, max(n, 1)), n_feat, dtype=self.dtype, device=dev)
        offsets, widths = self.offset[:n].tolist(), self.width[:n].tolist()
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            block.zero_()
            kept = self._kept(self.t_layer[r0:r1], self.t_pos[r0:r1])[:, :n_feat]
            for r in range(r0, r1):
                o = offsets[r]
                block[r - r0][kept[r - r0]] = self.flat[o : o + widths[r]].to(dev)
            self._release(offsets[r0], offsets[r1 - 1] + widths[r1 - 1] + self.n_rest)
            total += (block[: r1 - r0].abs().T @ w[r0:r1]).double()
        return total

    def close(self) -> None:
        self.flat = torch.empty(0)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of the rows is still alive: the GC unmaps it later
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
