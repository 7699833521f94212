"""The memory plan of one attribution: predicted peak host and device memory, before any work.

:func:`estimate_memory` counts the prompt's active features with one encoder pass (the model's
forward on the prompt and the transcoder's encoders; no decoder is read), or, given only a
number of tokens, from the transcoder's recorded L0 (``cfg.training["metrics"]["l0"]``), and adds
up what attribution holds at its peak:

- the recorded prompt state (residual sites, attention patterns, logits, pre-activations,
  reconstruction and errors) and the record pass's own transient peak;
- the active features' decoder rows (one copy of each distinct active feature's rows);
- the row store: (logits + feature budget) rows of float32 over the active features, error and
  token columns, each feature row cut to the features at its own position or before and at
  lower layers (see :mod:`~tracer.attribution.rows`), placed on the device, else in host
  memory, else in a memory-mapped file. Host pages are taken as rows are written, so the
  host share is the causal rows (``CAUSAL_SHARE``); a CUDA buffer is allocated whole, full
  width;
- the largest of: one sweep's working memory (bounded by ``sweep_memory_mb``), the influence
  re-ranking's [rows, rows] block, and assembling the graph's edges.

Peak memory grows with budget x active features (the row store), not more. The plan also
suggests the largest ``max_feature_nodes`` whose peak fits the available memory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from tracer.attribution.linear import WRITER_CHUNK_BYTES
from tracer.attribution.phases import process_rss_bytes
from tracer.attribution.rows import ADD_BYTES, CHUNK_BYTES

GB = 1e9
# The memory a plan may use: this share of what is available (the rest is headroom for the
# allocator's fragmentation and other processes).
SAFETY = 0.85
# An edge of the assembled graph: target, source (int32) and weight (float32), held about
# three times at the peak (the edge lists, their concatenation and the sparse matrix of the
# graph's scores).
EDGE_BYTES = 12 * 3
# Share of a feature row's kept columns that carry an edge: a target sees only sources at its
# own position or before and at lower layers (half x half); logit rows see all of them.
FEATURE_ROW_DENSITY = 0.25
# Share of the active features a budgeted feature row keeps in the causal row store (those at
# its position or before and at lower layers). Picked uniformly, about a quarter; measured 0.18
# on SmolLM2 at 256 tokens, budget 4,096 (scripts/bench_memory.py, case long256,
# ``feature_row_causal_share`` in benchmarks/memory.json); rounded up to plan with a margin.
CAUSAL_SHARE = 0.2


class AttributionMemoryError(RuntimeError):
    """An attribution that does not fit in memory; the message names the estimate and the
    ``--max-feature-nodes`` that fits."""


@dataclass
class Workload:
    """What one prompt asks of attribution, counted before any work.

    n_active: active features (nodes of the full graph); active_targets: sum over them of
    their target layers (T_i); unique_row_elems: sum over source layers i of (distinct active
    features of layer i) x T_i x d (the decoder rows read); counted: how n_active was found
    (``encoder pass`` or ``recorded L0``)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    n_features: int
    n_tokens: int
    n_active: int
    active_targets: int
    unique_row_elems: int
    weight_itemsize: int
    counted: str


@dataclass
class MemoryEstimate:
    """Predicted memory of one attribution (bytes). ``peak_host_bytes`` is the process's
    predicted resident peak (``baseline_host_bytes``, what the process held when estimated,
    plus attribution's host share); ``peak_device_bytes`` is the GPU peak (0 on CPU)."""

    workload: Workload
    device: str
    max_feature_nodes: int
    n_rows: int
    n_cols: int
    row_store_bytes: int  # what the rows take where they live (causal rows; CUDA: the buffer)
    row_store_buffer_bytes: int  # the buffer's full size (every row full width)
    row_store_placement: str
    state_bytes: int
    record_peak_bytes: int
    decoder_bytes: int
    writer_bytes: int
    sweep_bytes: int
    influence_bytes: int
    assembly_bytes: int
    baseline_host_bytes: int
    peak_host_bytes: int
    peak_device_bytes: int
    available_host_bytes: int
    available_device_bytes: int
    fits: bool
    suggested_max_feature_nodes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: budget, peak, where the rows live, what fits."""
        w = self.workload
        where = f"peak host {self.peak_host_bytes / GB:.2f} GB"
        if self.peak_device_bytes:
            where += f", device {self.peak_device_bytes / GB:.2f} GB"
        return (
            f"{w.n_tokens} tokens, {w.n_active:,} active features ({w.counted}), budget "
            f"{self.max_feature_nodes:,}: {where} (rows {self.row_store_bytes / GB:.2f} GB on "
            f"{self.row_store_placement}); --max-feature-nodes "
            f"{self.suggested_max_feature_nodes} fits"
        )

    def lines(self) -> list[str]:
        w = self.workload
        mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        out = [
            f"prompt      {w.n_tokens} tokens, {w.n_active:,} active features "
            f"(counted by {w.counted})",
            f"budget      {self.max_feature_nodes:,} feature rows + "
            f"{self.n_rows - self.max_feature_nodes} logit rows, {self.n_cols:,} columns",
            f"row store   {mb(self.row_store_bytes)} on {self.row_store_placement}",
            f"state       {mb(self.state_bytes)} (record pass peak {mb(self.record_peak_bytes)})",
            f"decoders    {mb(self.decoder_bytes)} (active features' rows only)",
            f"sweep       {mb(self.sweep_bytes)} working memory",
            f"influence   {mb(self.influence_bytes)}",
            f"assembly    {mb(self.assembly_bytes)}",
            f"peak host   {self.peak_host_bytes / GB:.2f} GB (process, "
            f"{self.baseline_host_bytes / GB:.2f} GB before), available "
            f"{self.available_host_bytes / GB:.2f} GB",
        ]
        if self.device != "cpu":
            out.append(
                f"peak device {self.peak_device_bytes / GB:.2f} GB on {self.device}, available "
                f"{self.available_device_bytes / GB:.2f} GB"
            )
        out.append(
            ("fits" if self.fits else "does NOT fit")
            + f"; suggested --max-feature-nodes {self.suggested_max_feature_nodes}"
        )
        return out + [f"note        {n}" for n in self.notes]


# --- what is available ---------------------------------------------------------------------


def host_available_bytes() -> int:
    """Host memory the process can still take (MemAvailable; Linux), else total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return 0


# --- counting the workload -----------------------------------------------------------------


def _workload(model, transcoder, n_tokens: int, layer_counts, unique_counts, counted) -> Workload:
    f, cfg = model.facts, transcoder.cfg
    T = [cfg.n_targets(i) for i in range(cfg.n_layers)]
    itemsize = next(model.hf.parameters()).element_size()
    return Workload(
        n_layers=f.n_layers, d_model=f.d_model, n_heads=f.n_heads, n_kv_heads=f.n_kv_heads,
        d_head=f.d_head, vocab_size=f.vocab_size, n_features=cfg.n_features, n_tokens=n_tokens,
        n_active=int(sum(layer_counts)),
        active_targets=int(sum(c * t for c, t in zip(layer_counts, T, strict=True))),
        unique_row_elems=int(sum(u * t for u, t in zip(unique_counts, T, strict=True))) * f.d_model,
        weight_itemsize=itemsize, counted=counted,
    )  # fmt: skip


def workload_from_state(rm, state) -> Workload:
    """The exact workload of a recorded prompt."""
    L = rm.model.facts.n_layers
    lay = state.feat_layer.cpu()
    counts = torch.bincount(lay, minlength=L).tolist()
    uniq = [len(torch.unique(state.feat_index.cpu()[lay == i])) for i in range(L)]
    return _workload(rm.model, rm.transcoder, state.n_pos, counts, uniq, "the recorded prompt")


@torch.no_grad()
def workload_from_prompt(model, transcoder, tokens: torch.Tensor, exclude_bos: bool = True):
    """Count active features with one encoder pass: the model's forward on the prompt and the
    transcoder's encoders (no decoder is read)."""
    site = transcoder.cfg.input_site
    run = model.run(tokens, record_sites=(site,))
    x = run.sites[site][0]  # [L, P, d]
    del run
    counts, uniq = [], []
    for l in range(model.facts.n_layers):
        xl = x[l].to(transcoder.W_enc.device, transcoder.W_enc.dtype)
        acts = transcoder.activate(l, transcoder.pre_activations(l, xl))
        if exclude_bos:
            acts[0] = 0
        counts.append(int((acts != 0).sum()))
        uniq.append(int((acts != 0).any(0).sum()))
    return _workload(model, transcoder, len(tokens), counts, uniq, "an encoder pass")


def workload_from_l0(model, transcoder, n_tokens: int, exclude_bos: bool = True) -> Workload:
    """Estimate active features from the transcoder's recorded mean L0 (per layer and token)."""
    l0 = (transcoder.cfg.training.get("metrics") or {}).get("l0")
    if l0 is None:
        raise ValueError(
            "the transcoder records no L0 (training metrics), so active features cannot be "
            "estimated from a token count: give the prompt instead (one encoder pass counts them)"
        )
    L, F = model.facts.n_layers, transcoder.cfg.n_features
    n_pos = max(0, n_tokens - (1 if exclude_bos else 0))
    per_layer = min(float(l0), F) * n_pos
    counts = [round(per_layer)] * L
    uniq = [min(F, round(per_layer))] * L  # at most every feature of the layer
    return _workload(model, transcoder, n_tokens, counts, uniq, f"recorded L0 {float(l0):.1f}")


# --- the plan --------------------------------------------------------------------------------


def _parts(w: Workload, budget: int, n_logits: int, batch_size: int, sweep_cap: int,
           cache_bytes: float):  # fmt: skip
    """Bytes of each part of attribution for ``budget`` feature rows (compute dtype float32)."""
    L, P, d, F = w.n_layers, w.n_tokens, w.d_model, w.n_features
    isz, c = w.weight_itemsize, 4
    n_cols = w.n_active + L * P + P
    n_rows = budget + n_logits
    sites = (5 * L * P * d + P * d) * isz
    patterns = L * w.n_heads * P * P * isz
    logits = P * w.vocab_size * max(isz, 4)
    pre = L * P * F * c
    recon_err = 2 * L * P * d * c
    feats = w.n_active * 28
    state = sites + patterns + logits + pre + recon_err + feats
    # The record pass: per-layer records stacked (sites and patterns twice), activations beside
    # the pre-activations, and the forward's own attention scores [H, P, P] and logits.
    record_peak = state + sites + patterns + pre + logits + 3 * w.n_heads * P * P * c
    view = 0 if isz == c else patterns * c // isz + w.vocab_size * d * c
    decoders = w.unique_row_elems * c
    writer_all = w.active_targets * d * c
    writers = writer_all if writer_all < cache_bytes else min(writer_all, 2 * WRITER_CHUNK_BYTES)
    store = n_rows * n_cols * c  # the buffer: every row full width
    n_rest = L * P + P
    store_used = (n_logits * n_cols + budget * (CAUSAL_SHARE * w.n_active + n_rest)) * c
    chunk = min(CHUNK_BYTES, store)  # rows scanned at once
    R = min(batch_size, max(n_rows, 1))
    work = min(4 * R * P * d * c, max(sweep_cap, 4 * P * d * c))
    # A sweep fills its rows full width (float32) beside its working memory, then packs them
    # into the store (ADD_BYTES an element, the working memory freed); attribution caps those
    # rows at the same working memory (at least one row).
    add = max(1, min(R, sweep_cap // (n_cols * ADD_BYTES))) * n_cols
    sweep = max(work + add * c, add * ADD_BYTES)
    influence = n_rows * budget * c + 2 * chunk + 3 * n_cols * 8
    kept = budget + L * P + P
    n_edges = budget * kept * FEATURE_ROW_DENSITY + n_logits * kept
    assembly = int(n_edges * EDGE_BYTES) + 2 * chunk
    return dict(
        n_rows=n_rows, n_cols=n_cols, state=state, record_peak=record_peak, view=view,
        decoders=decoders, writers=writers, store=store, store_used=int(store_used), sweep=sweep,
        influence=influence,
        assembly=assembly,
    )  # fmt: skip


def plan_memory(
    w: Workload,
    max_feature_nodes: int | None,
    *,
    n_logits: int = 10,
    batch_size: int = 1024,
    sweep_memory_mb: float = 512,
    cache_bytes: float = 1e9,
    device: torch.device | str = "cpu",
    placement: str = "auto",
    baseline_host_bytes: int | None = None,
    available_host_bytes: int | None = None,
    available_device_bytes: int | None = None,
) -> MemoryEstimate:
    """The memory plan for workload ``w`` and a feature budget (None: every active feature).

    available_*: memory attribution may take (default: what the machine has free now; pass a
    smaller number to plan for a limit). placement: ``auto`` puts the row store on the device
    if it fits, else in host memory, else on disk; or force ``device``, ``host``, ``disk``.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    base = process_rss_bytes() if baseline_host_bytes is None else int(baseline_host_bytes)
    avail_h = host_available_bytes() if available_host_bytes is None else available_host_bytes
    avail_d = device_available_bytes(dev) if available_device_bytes is None else (
        available_device_bytes)  # fmt: skip
    sweep_cap = int(sweep_memory_mb * 2**20)

    def evaluate(budget: int, where: str):
        p = _parts(w, budget, n_logits, batch_size, sweep_cap, cache_bytes)
        on_dev = p["state"] + p["view"] + p["decoders"] + p["writers"]
        work = max(p["sweep"], p["influence"], p["assembly"] if not cuda else 0)
        # On CUDA the device buffer is allocated whole; host pages only as rows are written.
        store_dev = (p["store"] if cuda else p["store_used"]) if where == "device" else 0
        store_host = p["store_used"] if where == "host" else 0
        if cuda:
            dev_peak = max(p["record_peak"], on_dev + store_dev + max(p["sweep"], p["influence"]))
            host_extra = store_host + p["assembly"]
        else:
            dev_peak = 0
            host_extra = max(p["record_peak"], on_dev + store_dev + store_host + work)
        return p, dev_peak, base + host_extra, host_extra

    def fits(budget: int, where: str) -> bool:
        _, dev_peak, _, host_extra = evaluate(budget, where)
        ok_h = host_extra <= SAFETY * avail_h
        return ok_h and (not cuda or dev_peak <= SAFETY * avail_d)

    def place(budget: int) -> str:
        if placement != "auto":
            return placement
        for where in ("device", "host") if cuda else ("device",):
            if fits(budget, where):
                return where
        return "disk"

    budget = w.n_active if max_feature_nodes is None else min(max_feature_nodes, w.n_active)
    where = place(budget)
    p, dev_peak, host_peak, _ = evaluate(budget, where)
    ok = fits(budget, where)
    # The largest budget that fits with the rows in memory (device or host): a binary search,
    # since every part grows with the budget.
    lo, hi = 0, w.n_active
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if any(fits(mid, x) for x in (("device", "host") if cuda else ("device",))):
            lo = mid
        else:
            hi = mid - 1
    notes = []
    if where == "disk":
        notes.append("rows spill to a memory-mapped file on disk: slower, but the budget runs")
        ok = fits(budget, "disk")
    suggested = lo
    return MemoryEstimate(
        workload=w,
        device=str(dev),
        max_feature_nodes=budget,
        n_rows=p["n_rows"],
        n_cols=p["n_cols"],
        row_store_bytes=p["store"] if cuda and where == "device" else p["store_used"],
        row_store_buffer_bytes=p["store"],
        row_store_placement="host" if where == "device" and not cuda else where,
        state_bytes=p["state"],
        record_peak_bytes=p["record_peak"],
        decoder_bytes=p["decoders"],
        writer_bytes=p["writers"],
        sweep_bytes=p["sweep"],
        influence_bytes=p["influence"],
        assembly_bytes=p["assembly"],
        baseline_host_bytes=base,
        peak_host_bytes=int(host_peak),
        peak_device_bytes=int(dev_peak),
        available_host_bytes=int(avail_h),
        available_device_bytes=int(avail_d),
        fits=ok,
        suggested_max_feature_nodes=int(suggested),
        notes=notes,
    )


def estimate_memory(
    model,
    transcoder,
    prompt_or_n_tokens: str | torch.Tensor | int,
    max_feature_nodes: int | None = None,
    *,
    exclude_bos: bool = True,
    max_n_logits: int = 10,
    batch_size: int = 1024,
    sweep_memory_mb: float = 512,
    device=None,
    **plan_options,
) -> MemoryEstimate:
    """Predict the peak host and device memory of ``attribute`` before any work.

    model: a LanguageModel; transcoder: its CrossLayerTranscoder. prompt_or_n_tokens: the
    prompt (text or token ids [P]: active features counted by one encoder pass) or a number of
    tokens (active features from the transcoder's recorded L0). ``plan_options`` go to
    :func:`plan_memory` (available_host_bytes, placement, ...). The estimate's
    ``suggested_max_feature_nodes`` is the largest budget that fits what is available.
    """
    if isinstance(prompt_or_n_tokens, int):
        w = workload_from_l0(model, transcoder, prompt_or_n_tokens, exclude_bos)
    else:
        tokens = prompt_or_n_tokens
        if isinstance(tokens, str):
            tokens = model.tokenize(tokens)
        w = workload_from_prompt(model, transcoder, tokens, exclude_bos)
    dev = torch.device(device) if device is not None else model.device
    return plan_memory(
        w, max_feature_nodes, n_logits=max_n_logits, batch_size=batch_size,
        sweep_memory_mb=sweep_memory_mb, device=dev, **plan_options,
    )  # fmt: skip


def suggested_budget_line(est: MemoryEstimate) -> str:
    """The one line for a budget that cannot fit: what it needs above what the process holds
    now, what is available, and the budget that fits."""
    cuda = bool(est.peak_device_bytes)
    need = est.peak_device_bytes if cuda else est.peak_host_bytes - est.baseline_host_bytes
    have = est.available_device_bytes if cuda else est.available_host_bytes
    fix = (
        f"use --max-feature-nodes {est.suggested_max_feature_nodes} (fits) or a shorter prompt"
        if est.suggested_max_feature_nodes > 0
        else "no feature budget fits: free memory or use a shorter prompt"
    )
    return (
        f"feature budget {est.max_feature_nodes:,} needs about {need / GB:.2f} GB "
        f"({est.workload.n_tokens} tokens, {est.workload.n_active:,} active features) but "
        f"{have / GB:.2f} GB is available: {fix}"
    )
