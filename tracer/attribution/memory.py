"""The memory plan of one attribution: predicted peak host and device memory, before any work.

:func:`estimate_memory` is arithmetic: from the prompt's length, the model's shapes, the
transcoder's measured L0 (``cfg.training["metrics"]["l0"]``) or configured one (TopK's k, or
``l0=``) and the budget, it adds up what attribution holds at its peak, without running
anything (8,192 tokens in milliseconds). ``exact=True`` counts the active features instead with
one encoder pass (the model's forward, attention in blocks of query rows, and the transcoder's
encoders one layer at a time; no decoder is read). :func:`estimate_from_shapes` plans for a
model that is not loaded (:class:`ModelShapes`, :class:`TranscoderShapes`: plain numbers).

- the recorded prompt state (residual sites, the attention patterns where they live, see
  ``PATTERN_MEMORY_BYTES``, the last position's logits, reconstruction and errors, the active
  features) and the record pass's own transient peak;
- the active features' decoder rows (one copy of each distinct active feature's rows);
- the row store: (logits + feature budget) rows of float32 over the active features, error and
  token columns, each feature row cut to the features at its own position or before and at
  lower layers (see :mod:`~tracer.attribution.rows`), placed on the device, else in host
  memory, else in a memory-mapped file. Host pages are taken as rows are written, so the
  host share is the causal rows (``CAUSAL_SHARE``); a CUDA buffer is allocated whole, full
  width;
- the largest of: one sweep's working memory (bounded by ``sweep_memory_mb``), the influence
  re-ranking's [rows, rows] block, and assembling the graph's edges.

Peak memory grows with budget x active features (the row store), and linearly with the prompt
elsewhere once the patterns are recomputed (the additive attention masks, one byte per query x
key and kind of mask, are the one quadratic term left). The plan also suggests the largest
``max_feature_nodes`` whose peak fits the available memory, and says how long a prompt fits at
the budget asked and which part then limits it (``longest_prompt``, ``limiting_part``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field

import torch

from tracer.attribution.linear import WRITER_CHUNK_BYTES
from tracer.attribution.memory_phases import process_rss_bytes
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
# Attention patterns stay in memory (placement ``auto``) while all layers' take at most this;
# longer prompts recompute them from the frozen queries and keys (tracer.replacement).
PATTERN_MEMORY_BYTES = 512 * 2**20
# The eager attention function holds about this many score-sized tensors at once (scores, their
# softmax, the masked sum).
ATTENTION_COPIES = 3


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
    # Kinds of attention mask in one forward (Gemma-2/3: sliding and global): 1 byte each per
    # query x key while patterns are recomputed.
    n_mask_kinds: int = 1
    max_positions: int = 1 << 30
    # The largest source layer's decoder rows read at once by the record pass (elements).
    max_layer_row_elems: int = 0
    # Targets per source layer (T_i), for scaling the workload to other prompt lengths.
    n_targets: list[int] = field(default_factory=list)


@dataclass
class ModelShapes:
    """A model's shapes as plain numbers: enough to plan attribution's memory for a model that
    is not loaded (e.g. Gemma-2-2B: 26 layers, d_model 2304, 8 heads, 4 key/value heads,
    d_head 256, vocabulary 256,000, context 8,192, two kinds of attention mask).
    ``weight_itemsize``: bytes per weight (4 float32, 2 bfloat16)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    max_positions: int = 1 << 30
    weight_itemsize: int = 4
    n_mask_kinds: int = 1

    @classmethod
    def of(cls, model) -> ModelShapes:
        """The shapes of a loaded :class:`~tracer.model.LanguageModel`."""
        f = model.facts
        cfg = model.hf.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        kinds = len(set(getattr(text, "layer_types", None) or ["full_attention"]))
        return cls(
            n_layers=f.n_layers, d_model=f.d_model, n_heads=f.n_heads, n_kv_heads=f.n_kv_heads,
            d_head=f.d_head, vocab_size=f.vocab_size, max_positions=f.max_positions,
            weight_itemsize=next(model.hf.parameters()).element_size(), n_mask_kinds=kinds,
        )  # fmt: skip


@dataclass
class TranscoderShapes:
    """A transcoder's shapes as plain numbers: ``n_features`` per layer, ``l0`` (mean active
    features per layer and token) and ``n_targets`` (layers each source layer writes to:
    None for a cross-layer transcoder, layer i writing to the L - i layers from i on; 1 each
    for per-layer transcoders)."""

    n_features: int
    l0: float
    n_targets: list[int] | None = None

    def targets(self, n_layers: int) -> list[int]:
        if self.n_targets is None:
            return [n_layers - i for i in range(n_layers)]
        if len(self.n_targets) != n_layers:
            raise ValueError(f"n_targets has {len(self.n_targets)} layers, the model {n_layers}")
        return list(self.n_targets)

    @classmethod
    def of(cls, transcoder, l0: float | None = None) -> TranscoderShapes:
        """The shapes of a loaded transcoder, with ``l0`` given, else measured (its training
        metrics) or configured (TopK's k); a clear error when none is known."""
        cfg = transcoder.cfg
        return cls(
            n_features=cfg.n_features, l0=transcoder_l0(transcoder, l0),
            n_targets=[cfg.n_targets(i) for i in range(cfg.n_layers)],
        )  # fmt: skip


def transcoder_l0(transcoder, l0: float | None = None) -> float:
    """Mean active features per layer and token: ``l0`` if given, else the transcoder's
    measured L0 (``cfg.training["metrics"]["l0"]``), else its configured k (TopK)."""
    if l0 is not None:
        return float(l0)
    cfg = transcoder.cfg
    measured = ((cfg.training or {}).get("metrics") or {}).get("l0")
    if measured is not None:
        return float(measured)
    if cfg.activation == "topk" and cfg.topk:
        return float(cfg.topk)
    raise ValueError(
        "the transcoder records no L0 (training metrics) and has no configured k, so active "
        "features cannot be estimated from a token count: give the prompt instead (one encoder "
        "pass counts them: --estimate exact), or an L0 (--l0 N, l0=...)"
    )


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
    pattern_placement: str = "memory"  # memory, disk or recompute (tracer.replacement)
    pattern_bytes: int = 0  # what the patterns hold in memory (recompute: queries and keys)
    spill_bytes: int = 0  # what the plan writes to the spill folder (rows, patterns)
    available_disk_bytes: int = 0
    longest_prompt: int = 0  # the longest prompt that fits at this budget (tokens)
    limiting_part: str = ""  # the part that stops a longer prompt from fitting
    largest_part: str = ""  # the largest part of this plan's peak

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
            f"patterns    {self.pattern_placement}: {mb(self.pattern_bytes)} in memory",
            *(
                [
                    f"spill       {mb(self.spill_bytes)} to disk "
                    f"({self.available_disk_bytes / GB:.1f} GB free)"
                ]
                if self.spill_bytes
                else []
            ),
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
        if self.longest_prompt:
            out.append(
                f"longest     {self.longest_prompt:,} tokens fit at budget "
                f"{self.max_feature_nodes:,}; {self.limiting_part} limits the length"
                + (f" (largest part here: {self.largest_part})" if self.largest_part else "")
            )
        elif self.limiting_part:
            out.append(f"limit       {self.limiting_part}")
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


def disk_available_bytes(folder: str | os.PathLike | None = None) -> int:
    """Free space of ``folder`` (default: the temporary folder spills go to), in bytes."""
    import tempfile

    target = folder if folder is not None else tempfile.gettempdir()
    try:
        return int(shutil.disk_usage(target).free)
    except OSError:
        return 0


def device_available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return 0


# --- counting the workload -----------------------------------------------------------------


def _workload(model, transcoder, n_tokens: int, layer_counts, unique_counts, counted) -> Workload:
    ms = ModelShapes.of(model)
    T = [transcoder.cfg.n_targets(i) for i in range(transcoder.cfg.n_layers)]
    return _shaped_workload(ms, transcoder.cfg.n_features, T, n_tokens, layer_counts,
                            unique_counts, counted)  # fmt: skip


def _shaped_workload(ms: ModelShapes, n_features: int, T: list[int], n_tokens: int,
                     layer_counts, unique_counts, counted: str) -> Workload:  # fmt: skip
    d = ms.d_model
    return Workload(
        n_layers=ms.n_layers, d_model=d, n_heads=ms.n_heads, n_kv_heads=ms.n_kv_heads,
        d_head=ms.d_head, vocab_size=ms.vocab_size, n_features=n_features, n_tokens=n_tokens,
        n_active=int(sum(layer_counts)),
        active_targets=int(sum(c * t for c, t in zip(layer_counts, T, strict=True))),
        unique_row_elems=int(sum(u * t for u, t in zip(unique_counts, T, strict=True))) * d,
        weight_itemsize=ms.weight_itemsize, counted=counted, n_mask_kinds=ms.n_mask_kinds,
        max_positions=ms.max_positions,
        max_layer_row_elems=int(max((u * t for u, t in zip(unique_counts, T, strict=True)),
                                    default=0)) * d,
        n_targets=list(T),
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
    """Count active features with one encoder pass: the model's forward on the prompt (its
    attention in blocks of query rows, no pattern kept: memory linear in the prompt but for the
    model's own additive masks) and the transcoder's encoders one layer at a time (no decoder
    is read)."""
    from tracer.hooks import run_hooked

    site = transcoder.cfg.input_site
    ids = model._check_tokens(tokens).to(model.device)
    run = run_hooked(model.hf, model.arch, ids, record_sites=(site,),
                     qk_sink=lambda layer, rec: None, logits_to_keep=1)  # fmt: skip
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
        del acts
    return _workload(model, transcoder, len(tokens), counts, uniq, "an encoder pass")


def workload_from_shapes(
    model: ModelShapes, transcoder: TranscoderShapes, n_tokens: int, exclude_bos: bool = True,
    counted: str | None = None,
) -> Workload:  # fmt: skip
    """The workload of an ``n_tokens`` prompt from shapes alone: ``l0`` active features per
    layer and token (the start token's left out with ``exclude_bos``), each layer's distinct
    active features capped at its ``n_features``."""
    L, F = model.n_layers, transcoder.n_features
    n_pos = max(0, n_tokens - (1 if exclude_bos else 0))
    per_layer = min(float(transcoder.l0), F) * n_pos
    counts = [round(per_layer)] * L
    uniq = [min(F, round(per_layer))] * L  # at most every feature of the layer
    label = counted or f"L0 {float(transcoder.l0):.1f}"
    return _shaped_workload(model, F, transcoder.targets(L), n_tokens, counts, uniq, label)


def workload_from_l0(model, transcoder, n_tokens: int, exclude_bos: bool = True,
                     l0: float | None = None) -> Workload:  # fmt: skip
    """Active features of an ``n_tokens`` prompt from the transcoder's measured or configured
    L0 (:func:`transcoder_l0`; ``l0`` overrides it): arithmetic, nothing runs."""
    value = transcoder_l0(transcoder, l0)
    how = "given" if l0 is not None else (
        "configured" if ((transcoder.cfg.training or {}).get("metrics") or {}).get("l0") is None
        else "recorded")  # fmt: skip
    return workload_from_shapes(ModelShapes.of(model), TranscoderShapes.of(transcoder, value),
                                n_tokens, exclude_bos, f"{how} L0 {value:.1f}")  # fmt: skip


def scale_workload(w: Workload, n_tokens: int) -> Workload:
    """``w`` for a prompt of ``n_tokens`` at the same active features per token (distinct
    features per layer capped at ``n_features``): how the plan finds the longest prompt that
    fits."""
    old = max(1, w.n_tokens - 1)
    f = max(0, n_tokens - 1) / old
    T = w.n_targets or [1] * w.n_layers
    per_unique = w.unique_row_elems / max(1, sum(T) * w.d_model)  # mean distinct per layer
    uniq = min(w.n_features, round(per_unique * f))
    return Workload(**{
        **asdict(w), "n_tokens": n_tokens, "n_active": round(w.n_active * f),
        "active_targets": round(w.active_targets * f),
        "unique_row_elems": int(uniq * sum(T) * w.d_model),
        "max_layer_row_elems": int(uniq * max(T) * w.d_model),
    })  # fmt: skip


def pattern_placement(model_or_facts, n_tokens: int, requested: str = "auto",
                      itemsize: int = 4) -> str:  # fmt: skip
    """Where a prompt's attention patterns live: ``requested`` unless ``auto``, which keeps
    them in memory while all layers' take at most ``PATTERN_MEMORY_BYTES`` and recomputes them
    (linear memory) beyond. ``model_or_facts``: anything with n_layers and n_heads."""
    from tracer.replacement import PATTERN_PLACEMENTS

    if requested != "auto":
        if requested not in PATTERN_PLACEMENTS:
            raise ValueError(f"unknown attention pattern placement {requested!r}: use auto, "
                             f"{', '.join(PATTERN_PLACEMENTS)}")  # fmt: skip
        return requested
    f = getattr(model_or_facts, "facts", model_or_facts)
    size = f.n_layers * f.n_heads * n_tokens * n_tokens * itemsize
    return "memory" if size <= PATTERN_MEMORY_BYTES else "recompute"


# --- the plan --------------------------------------------------------------------------------


def _parts(w: Workload, budget: int, n_logits: int, batch_size: int, sweep_cap: int,
           cache_bytes: float, patterns: str = "memory"):  # fmt: skip
    """Bytes of each part of attribution for ``budget`` feature rows (compute dtype float32),
    with the attention patterns ``patterns`` (memory, disk or recompute)."""
    L, P, d = w.n_layers, w.n_tokens, w.d_model
    isz, c = w.weight_itemsize, 4
    H, kv, dh = w.n_heads, w.n_kv_heads, w.d_head
    n_cols = w.n_active + L * P + P
    n_rows = budget + n_logits
    # Three sites [L, P, d] (resid_pre, mlp_out, the transcoder's input) and the final
    # residual, in the weights' dtype, and a float32 copy when the weights are narrower.
    site_bytes = isz + (c if isz < c else 0)
    sites = (3 * L * P * d + P * d) * site_bytes
    pattern_all = L * H * P * P * c
    layer_pattern = H * P * P * c
    masks = w.n_mask_kinds * P * P  # boolean copies of the additive masks (recompute)
    qk = L * (H + kv) * P * dh * c + masks
    held = {"memory": pattern_all, "disk": 0, "recompute": qk}[patterns]
    spilled = pattern_all if patterns == "disk" else 0
    # Reading patterns: one block of rows (recompute runs the eager function on it: scores,
    # softmax, masked sum), or (disk) a copied block; nothing in memory.
    from tracer.replacement import PATTERN_BLOCK_BYTES

    block = min(layer_pattern, PATTERN_BLOCK_BYTES)
    pattern_read = {"memory": 0, "disk": block, "recompute": ATTENTION_COPIES * block}[patterns]
    logits = w.vocab_size * max(isz, 4)  # the last position's only
    recon_err = 2 * L * P * d * c
    feats = w.n_active * 28
    state = sites + held + logits + recon_err + feats
    # The record pass: per-layer site records stacked (sites twice), the forward's own
    # attention (whole [H, P, P] scores per layer, or blocks of query rows when recomputing)
    # beside its float additive mask, one layer's pre-activations and activations [P, F], and
    # one source layer's decoder rows with a decoding chunk.
    from tracer.hooks import ATTENTION_BLOCK_BYTES

    fmask = w.n_mask_kinds * P * P * c
    attn = ATTENTION_COPIES * (layer_pattern if patterns != "recompute" else
                               min(layer_pattern, ATTENTION_BLOCK_BYTES))  # fmt: skip
    encode = 2 * P * w.n_features * c
    from transcoders.clt import DECODE_CHUNK_BYTES

    chunk_vecs = min(DECODE_CHUNK_BYTES, w.active_targets * d * c // max(1, L))
    decode = w.max_layer_row_elems * c + 2 * chunk_vecs
    # Sites are stacked one at a time at the end of the forward (its records and the stack).
    record_peak = state + L * P * d * site_bytes + fmask + max(attn, encode, decode)
    view = 0 if isz == c else w.vocab_size * d * c
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
    sweep = max(work + add * c + pattern_read, add * ADD_BYTES)
    influence = n_rows * budget * c + 2 * chunk + 3 * n_cols * 8
    kept = budget + L * P + P
    n_edges = budget * kept * FEATURE_ROW_DENSITY + n_logits * kept
    assembly = int(n_edges * EDGE_BYTES) + 2 * chunk
    return dict(
        n_rows=n_rows, n_cols=n_cols, state=state, record_peak=record_peak, view=view,
        decoders=decoders, writers=writers, store=store, store_used=int(store_used), sweep=sweep,
        influence=influence, assembly=assembly, patterns=held, pattern_spill=spilled,
        sites=sites,
    )  # fmt: skip


# How the plan names each part (``MemoryEstimate.limiting_part``).
PART_NAMES = {
    "record_peak": "the record pass", "state": "the recorded state",
    "patterns": "the attention patterns", "decoders": "the active features' decoder rows",
    "writers": "the written vectors", "store": "the row store", "sweep": "a sweep's working memory",
    "influence": "the influence re-ranking", "assembly": "assembling the edges",
    "context": "the model's context",
}  # fmt: skip


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
    patterns: str = "auto",
    baseline_host_bytes: int | None = None,
    available_host_bytes: int | None = None,
    available_device_bytes: int | None = None,
    spill_dir: str | os.PathLike | None = None,
    available_disk_bytes: int | None = None,
    find_longest: bool = True,
) -> MemoryEstimate:
    """The memory plan for workload ``w`` and a feature budget (None: every active feature).

    available_*: memory attribution may take (default: what the machine has free now; pass a
    smaller number to plan for a limit). placement: ``auto`` puts the row store on the device
    if it fits, else in host memory, else on disk; or force ``device``, ``host``, ``disk``.
    patterns: where the attention patterns live (:func:`pattern_placement`). What spills to
    disk (rows, patterns) must fit ``available_disk_bytes`` (default: the free space of
    ``spill_dir``, else the temporary folder). ``find_longest``: also find the longest prompt
    that fits at this budget (``longest_prompt``) and the part that limits it.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    base = process_rss_bytes() if baseline_host_bytes is None else int(baseline_host_bytes)
    avail_h = host_available_bytes() if available_host_bytes is None else available_host_bytes
    avail_d = device_available_bytes(dev) if available_device_bytes is None else (
        available_device_bytes)  # fmt: skip
    avail_disk = disk_available_bytes(spill_dir) if available_disk_bytes is None else (
        available_disk_bytes)  # fmt: skip
    sweep_cap = int(sweep_memory_mb * 2**20)

    def evaluate(w: Workload, budget: int, where: str):
        pat = pattern_placement(w, w.n_tokens, patterns)
        p = _parts(w, budget, n_logits, batch_size, sweep_cap, cache_bytes, pat)
        on_dev = p["state"] + p["view"] + p["decoders"] + p["writers"]
        work_parts = {"sweep": p["sweep"], "influence": p["influence"]}
        if not cuda:
            work_parts["assembly"] = p["assembly"]
        work_name = max(work_parts, key=work_parts.get)
        # On CUDA the device buffer is allocated whole; host pages only as rows are written.
        store_dev = (p["store"] if cuda else p["store_used"]) if where == "device" else 0
        store_host = p["store_used"] if where == "host" else 0
        steady = {
            "state": p["state"] - p["patterns"], "patterns": p["patterns"], "view": p["view"],
            "decoders": p["decoders"], "writers": p["writers"],
            "store": store_dev + (0 if cuda else store_host), work_name: work_parts[work_name],
        }  # fmt: skip
        if cuda:
            dev_peak = max(p["record_peak"], on_dev + store_dev + max(p["sweep"], p["influence"]))
            host_extra = store_host + p["assembly"]
        else:
            dev_peak = 0
            host_extra = max(p["record_peak"], on_dev + store_dev + store_host + work_parts[
                work_name])  # fmt: skip
        peak = dev_peak if cuda else host_extra
        if p["record_peak"] >= sum(steady.values()):
            limiting = "record_peak"
        else:
            limiting = max(steady, key=steady.get)
        disk = p["pattern_spill"] + (p["store_used"] if where == "disk" else 0)
        return p, dev_peak, base + host_extra, host_extra, disk, limiting, pat, peak

    def fits(w: Workload, budget: int, where: str) -> bool:
        _, dev_peak, _, host_extra, disk, *_ = evaluate(w, budget, where)
        ok_h = host_extra <= SAFETY * avail_h
        return ok_h and (not cuda or dev_peak <= SAFETY * avail_d) and disk <= avail_disk

    in_memory = ("device", "host") if cuda else ("device",)

    def place(w: Workload, budget: int) -> str:
        if placement != "auto":
            return placement
        for where in in_memory:
            if fits(w, budget, where):
                return where
        return "disk"

    budget = w.n_active if max_feature_nodes is None else min(max_feature_nodes, w.n_active)
    where = place(w, budget)
    p, dev_peak, host_peak, _, disk, limiting, pat, _ = evaluate(w, budget, where)
    largest = limiting
    ok = fits(w, budget, where)
    # The largest budget that fits with the rows in memory (device or host): a binary search,
    # since every part grows with the budget.
    lo, hi = 0, w.n_active
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if any(fits(w, mid, x) for x in in_memory):
            lo = mid
        else:
            hi = mid - 1
    notes = []
    if where == "disk":
        notes.append("rows spill to a memory-mapped file on disk: slower, but the budget runs")
    if disk > avail_disk:
        notes.append(
            f"the spill folder has {avail_disk / GB:.2f} GB free but the plan spills "
            f"{disk / GB:.2f} GB there"
        )
    if pat == "recompute":
        notes.append("attention patterns are recomputed from the frozen queries and keys "
                     "(linear memory; same edges to float rounding)")  # fmt: skip
    longest = 0
    if find_longest:
        # The longest prompt that fits at this budget (rows anywhere): a binary search over
        # lengths at the same active features per token.
        def fits_at(n: int) -> bool:
            wn = scale_workload(w, n)
            b = min(budget, wn.n_active) if max_feature_nodes is not None else wn.n_active
            return any(fits(wn, b, x) for x in (*in_memory, "disk"))

        lo_n, hi_n = 1, max(1, min(w.max_positions, 1 << 20))
        if not fits_at(lo_n):
            hi_n = 0
        while lo_n < hi_n:
            mid = (lo_n + hi_n + 1) // 2
            if fits_at(mid):
                lo_n = mid
            else:
                hi_n = mid - 1
        longest = hi_n
        if longest >= w.max_positions:
            limiting = "context"
        elif longest > 0:
            wn = scale_workload(w, longest + 1)
            b = min(budget, wn.n_active) if max_feature_nodes is not None else wn.n_active
            *_, lim_n, _, _ = evaluate(wn, b, place(wn, b))
            limiting = lim_n
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
        suggested_max_feature_nodes=int(lo),
        notes=notes,
        pattern_placement=pat,
        pattern_bytes=int(p["patterns"]),
        spill_bytes=int(disk),
        available_disk_bytes=int(avail_disk),
        longest_prompt=int(longest),
        limiting_part=PART_NAMES.get(limiting, limiting),
        largest_part=PART_NAMES.get(largest, largest),
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
    exact: bool | None = None,
    l0: float | None = None,
    **plan_options,
) -> MemoryEstimate:
    """Predict the peak host and device memory of ``attribute`` before any work.

    model: a LanguageModel; transcoder: its CrossLayerTranscoder. prompt_or_n_tokens: the
    prompt (text or token ids [P]) or a number of tokens. Arithmetic (``exact=False``): the
    prompt is only tokenized, and its active features follow from the transcoder's measured or
    configured L0 (or ``l0``); nothing runs. ``exact=True``: one encoder pass counts them
    (the prompt is needed; its memory grows linearly with the prompt). ``exact=None``
    (default): arithmetic when an L0 is known, else the encoder pass. ``plan_options`` go to
    :func:`plan_memory` (available_host_bytes, placement, patterns, spill_dir, ...). The
    estimate's ``suggested_max_feature_nodes`` is the largest budget that fits what is
    available; ``longest_prompt`` the longest prompt that fits at this budget.
    """
    if isinstance(prompt_or_n_tokens, int):
        if exact:
            raise ValueError("an exact count needs the prompt, not a number of tokens")
        w = workload_from_l0(model, transcoder, prompt_or_n_tokens, exclude_bos, l0)
    else:
        tokens = prompt_or_n_tokens
        if isinstance(tokens, str):
            tokens = model.tokenize(tokens)
        if exact is None:
            try:
                transcoder_l0(transcoder, l0)
                exact = False
            except ValueError:
                exact = True
        if exact:
            w = workload_from_prompt(model, transcoder, tokens, exclude_bos)
        else:
            model._check_tokens(tokens)  # the context length and the vocabulary
            w = workload_from_l0(model, transcoder, len(tokens), exclude_bos, l0)
    dev = torch.device(device) if device is not None else model.device
    return plan_memory(
        w, max_feature_nodes, n_logits=max_n_logits, batch_size=batch_size,
        sweep_memory_mb=sweep_memory_mb, device=dev, **plan_options,
    )  # fmt: skip


def estimate_from_shapes(
    model: ModelShapes,
    transcoder: TranscoderShapes,
    n_tokens: int,
    max_feature_nodes: int | None = None,
    *,
    exclude_bos: bool = True,
    max_n_logits: int = 10,
    batch_size: int = 1024,
    sweep_memory_mb: float = 512,
    device: str = "cpu",
    **plan_options,
) -> MemoryEstimate:
    """The memory plan of an ``n_tokens`` prompt for a model and transcoder known only by their
    shapes (nothing is loaded): e.g. Gemma-2-2B with per-layer transcoders on an 80 GB GPU,

        estimate_from_shapes(ModelShapes(26, 2304, 8, 4, 256, 256_000, 8192, 4, 2),
                             TranscoderShapes(16384, l0=100, n_targets=[1] * 26), 6000, 8192,
                             device="cuda", available_device_bytes=80e9,
                             available_host_bytes=200e9, baseline_host_bytes=0)

    ``device="cuda"`` plans device memory; give ``available_device_bytes`` (and the host's)
    when planning for another machine."""
    if n_tokens > model.max_positions:
        raise ValueError(f"{n_tokens} tokens exceed the model's context ({model.max_positions})")
    w = workload_from_shapes(model, transcoder, n_tokens, exclude_bos)
    if str(device).startswith("cuda") and "available_device_bytes" not in plan_options:
        raise ValueError("planning for a GPU needs available_device_bytes (the GPU's memory)")
    return plan_memory(
        w, max_feature_nodes, n_logits=max_n_logits, batch_size=batch_size,
        sweep_memory_mb=sweep_memory_mb, device=device, **plan_options,
    )  # fmt: skip


def suggested_budget_line(est: MemoryEstimate) -> str:
    """The one line for a budget that cannot fit: what it needs above what the process holds
    now, what is available, and the budget that fits."""
    cuda = bool(est.peak_device_bytes)
    need = est.peak_device_bytes if cuda else est.peak_host_bytes - est.baseline_host_bytes
    have = est.available_device_bytes if cuda else est.available_host_bytes
    if est.spill_bytes > est.available_disk_bytes:
        return (
            f"the plan spills {est.spill_bytes / GB:.2f} GB to disk ({est.workload.n_tokens} "
            f"tokens, budget {est.max_feature_nodes:,}) but the spill folder has "
            f"{est.available_disk_bytes / GB:.2f} GB free: use --max-feature-nodes "
            f"{est.suggested_max_feature_nodes} (rows in memory) or another --spill-dir"
        )
    fix = (
        f"use --max-feature-nodes {est.suggested_max_feature_nodes} (fits) or a shorter prompt"
        if est.suggested_max_feature_nodes > 0
        else "no feature budget fits: free memory or use a shorter prompt"
    )
    if est.longest_prompt:
        fix += f" (at this budget {est.longest_prompt:,} tokens fit)"
    return (
        f"feature budget {est.max_feature_nodes:,} needs about {need / GB:.2f} GB "
        f"({est.workload.n_tokens} tokens, {est.workload.n_active:,} active features) but "
        f"{have / GB:.2f} GB is available: {fix}"
    )
