"""Parameters of one attribution run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tracer.prune import DEFAULT_CONVENTION

# The feature budget ``circuit-atlas trace`` uses unless told otherwise (capped by the memory
# plan's suggestion when the machine cannot hold it).
DEFAULT_MAX_FEATURE_NODES = 8192
# Fields that say how to run, not what to compute: left out of the graph's parameters.
RUN_ONLY_FIELDS = ("progress", "sweep_memory_mb", "row_store", "spill_dir", "check_memory",
                   "memory_limit_gb", "fit_budget", "profile_memory", "patterns")  # fmt: skip


@dataclass
class AttributionConfig:
    """Parameters of one attribution run (saved with the graph).

    Logit targets: by default the most probable next tokens until their cumulative probability
    reaches ``desired_logit_prob``, at most ``max_n_logits``; or ``target_tokens`` (tokens as
    text or ids); or ``logit_diff`` = (token a, token b) for the direction logit(a) - logit(b).
    ``max_feature_nodes`` caps the features (highest estimated influence first); ``None`` keeps
    all. ``batch_size`` rows per influence re-ranking. ``edge_tolerance`` drops edges with
    |A[t, s]| < tolerance x max_s |A[t, s]| (0 keeps every nonzero edge: exact graphs).

    Memory (not saved with the graph): ``sweep_memory_mb`` bounds one backward sweep's working
    memory (a batch is split into sweeps over position ranges to stay under it);
    ``row_store``: where the rows live, ``auto`` (the device if they fit, else host memory,
    else a memory-mapped file in ``spill_dir``), ``device``, ``host`` or ``disk``;
    ``patterns``: where the frozen attention patterns live (:class:`~tracer.replacement.
    PatternStore`): ``memory``, ``disk`` (memory-mapped in ``spill_dir``), ``recompute`` (from
    the frozen queries and keys, in blocks: linear memory) or ``auto`` (memory while they take
    at most ``tracer.attribution.memory.PATTERN_MEMORY_BYTES``, else recompute); every choice
    gives the same edges to float rounding;
    ``check_memory``: refuse, before allocating, a budget the memory plan says cannot fit
    (:class:`~tracer.attribution.memory.AttributionMemoryError`), or with ``fit_budget`` lower
    it to the plan's suggestion (the graph's ``max_feature_nodes`` then records the budget
    used); ``memory_limit_gb``: plan for at most this much memory (default: what the machine
    has available); ``profile_memory``: measure each phase's peak memory
    (:mod:`~tracer.attribution.memory_phases`; resets the process's high-water mark) into
    ``graph.extra["memory_phases"]``.
    """

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    target_tokens: list[str | int] | None = None
    logit_diff: tuple[str | int, str | int] | None = None
    max_feature_nodes: int | None = None
    batch_size: int = 1024
    edge_tolerance: float = 0.0
    # The scoring rules of the graph's scores and of its pruning (tracer.prune: circuit-tracer
    # or atlas); the edges are the same in both.
    convention: str = DEFAULT_CONVENTION
    progress: bool = True
    sweep_memory_mb: float = 512
    row_store: str = "auto"
    spill_dir: str | None = None
    patterns: str = "auto"
    check_memory: bool = True
    memory_limit_gb: float | None = None
    fit_budget: bool = False
    profile_memory: bool = False

    def graph_params(self) -> dict:
        """The fields that determine the graph (saved in its parameters)."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_ONLY_FIELDS}
