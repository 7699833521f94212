"""Swap experiments: remove one prompt's features and inject another prompt's activations.

``swap(rm, prompt, from_features, to_features, other_prompt)`` ablates ``from_features``
((layer, position, index) active in ``prompt``) and sets each of ``to_features`` ((layer,
position, index) active in ``other_prompt``) to the activation it has there, at the matching
position of ``prompt`` (positions aligned at the end: the last token of one prompt is the last
of the other, so prompts that differ in one word of the same token length line up position by
position). Everything goes through :mod:`tracer.interventions` (``FeatureEdit`` ablate / set);
the next-token distribution comes from one run in ``mode`` (default ``live``: the real model,
nothing frozen, each edit adds the decoded difference it makes, as steering does) and the
continuation from :func:`tracer.steer.generate_batch` (greedy), both beside the unedited
prompt. ``layers=(lo, hi)`` restricts both sets to the features of layers lo..hi (inclusive),
e.g. the middle layers where a concept is carried; ``watch`` names token ids whose probability
and rank (1 = most likely) are reported before and after (the other prompt's answer).
:func:`concept_positions` finds where two prompts differ and :func:`active_features` lists
every active feature at given positions (optionally of some layers). The classic case
(Ameisen et al., 2025): on "The capital of the state containing Dallas is", the Texas features
swapped for California's should turn " Austin" into " Sacramento".

:func:`swap_supernodes` takes the two feature sets as supernodes of the two prompts' graphs
(:mod:`tracer.analyses.supernodes`); :func:`run_swap_file` runs a JSON Lines file of them and keeps
each
result in the first graph's ``extra['swaps']``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tracer.analyses.supernodes import get_supernode
from tracer.graph import Graph
from tracer.interventions import FeatureEdit, intervene_batch
from tracer.replacement import PromptState, ReplacementModel
from tracer.steer import generate_batch

Feature = tuple[int, int, int]  # (layer, position, index)
LayerRange = tuple[int, int]  # (first, last) layer, inclusive


class SwapError(ValueError):
    """A swap that cannot be run: features not active where they should be, bad positions."""


@dataclass
class SwapResult:
    """One swap. removed: (layer, position, index) ablated in ``prompt``; inserted: (layer,
    position in ``prompt``, index, value) set; top_before / top_after: (token text, id,
    probability) of the most likely next tokens; continuation_*: greedy continuations."""

    prompt: str
    other_prompt: str
    mode: str
    removed: list[Feature]
    inserted: list[tuple[int, int, int, float]]
    top_before: list[tuple[str, int, float]]
    top_after: list[tuple[str, int, float]]
    continuation_before: str = ""
    continuation_after: str = ""
    label: dict = field(default_factory=dict)  # e.g. the supernodes swapped
    layers: list[int] | None = None  # [first, last] when restricted to a layer range
    watched: list[dict] = field(default_factory=list)  # token, id, p/rank before and after

    @property
    def moved(self) -> bool:
        """Whether the most likely next token changed."""
        return self.top_before[0][1] != self.top_after[0][1]

    def to_dict(self) -> dict:
        return {**asdict(self), "moved": self.moved}

    def lines(self) -> list[str]:
        def top(rows):
            return ", ".join(f"{t!r} {p:.3f}" for t, _, p in rows)

        return [
            f"prompt: {self.prompt!r}; removed {len(self.removed)} features, inserted "
            f"{len(self.inserted)} from {self.other_prompt!r} ({self.mode} mode)",
            f"before: {top(self.top_before)}",
            f"after:  {top(self.top_after)}",
            f"continuation before: {self.continuation_before!r}",
            f"continuation after:  {self.continuation_after!r}",
        ]


def _active(state: PromptState) -> dict[Feature, float]:
    return {
        (int(l), int(p), int(f)): float(v)
        for l, p, f, v in zip(
            state.feat_layer, state.feat_pos, state.feat_index, state.feat_value, strict=True
        )
    }


def _check_active(features: Sequence[Feature], active: dict, where: str, prompt: str) -> None:
    for feat in features:
        if len(feat) != 3:
            raise SwapError(f"feature {feat!r}: give (layer, position, index)")
        key = tuple(int(x) for x in feat)
        if key not in active:
            raise SwapError(
                f"feature L{key[0]}/F{key[2]}@{key[1]} is not active in the {where} prompt "
                f"{prompt!r}: name features active there (a graph's feature nodes of that "
                "prompt, or a supernode of its graph)"
            )


def parse_layers(text: str) -> LayerRange:
    """A layer range from text: ``"8-20"`` (inclusive) or one layer ``"12"``."""
    first, sep, last = str(text).strip().partition("-")
    try:
        lo, hi = int(first), int(last) if sep else int(first)
    except ValueError:
        raise SwapError(
            f"layer range {text!r}: give FIRST-LAST such as 8-20, or one layer"
        ) from None
    if lo < 0 or hi < lo:
        raise SwapError(f"layer range {text!r}: need 0 <= FIRST <= LAST")
    return lo, hi


def in_layers(features: Sequence[Feature], layers: LayerRange | None) -> list[Feature]:
    """The features (layer first) whose layer lies in ``layers`` (all when None)."""
    feats = [tuple(int(x) for x in f) for f in features]
    if layers is None:
        return feats
    lo, hi = layers
    return [f for f in feats if lo <= f[0] <= hi]


def concept_positions(model, prompt: str, other_prompt: str) -> list[int]:
    """Positions of ``prompt`` whose token differs from ``other_prompt``'s (the prompts must
    have the same number of tokens, so that their positions line up)."""
    a, b = model.tokenize(prompt), model.tokenize(other_prompt)
    if len(a) != len(b):
        raise SwapError(
            f"{prompt!r} has {len(a)} tokens and {other_prompt!r} {len(b)}: a concept swap "
            "needs prompts of the same token length (one word of the same length changed)"
        )
    return [int(p) for p in torch.nonzero(a != b).flatten()]


def active_features(
    rm: ReplacementModel,
    prompt: str,
    positions: Sequence[int],
    layers: LayerRange | None = None,
    state: PromptState | None = None,
) -> list[Feature]:
    """Every (layer, position, index) active in ``prompt`` at ``positions`` (of ``layers``)."""
    state = state if state is not None else rm.record(rm.model.tokenize(prompt))
    pos = {int(p) for p in positions}
    return in_layers([f for f in _active(state) if f[1] in pos], layers)


def _watch(p_before, p_after, ids: Sequence[int], decode) -> list[dict]:
    out = []
    for i in ids:
        i = int(i)
        row = {"token": decode([i]), "id": i}
        for name, p in (("before", p_before), ("after", p_after)):
            row[f"p_{name}"] = float(p[i])
            row[f"rank_{name}"] = int((p > p[i]).sum()) + 1
        out.append(row)
    return out


def _top(logits: torch.Tensor, decode, k: int) -> list[tuple[str, int, float]]:
    p = logits.float().softmax(-1)
    val, idx = p.topk(k)
    return [(decode([int(i)]), int(i), float(v)) for v, i in zip(val, idx, strict=True)]


def swap(
    rm: ReplacementModel,
    prompt: str,
    from_features: Sequence[Feature],
    to_features: Sequence[Feature],
    other_prompt: str,
    *,
    mode: str = "live",
    top_k: int = 5,
    max_new_tokens: int = 10,
    layers: LayerRange | None = None,
    watch: Sequence[int] = (),
    states: tuple[PromptState, PromptState] | None = None,
) -> SwapResult:
    """Ablate ``from_features`` (active in ``prompt``) and insert ``to_features`` with their
    activations in ``other_prompt`` (see the module doc); with ``layers`` only the features of
    those layers, of both sets. Raises SwapError when a feature is not active in its prompt or
    a position does not map into ``prompt``. ``states``: the two prompts' ``rm.record`` states
    when already recorded (saves two forward passes)."""
    model = rm.model
    from_features, to_features = in_layers(from_features, layers), in_layers(to_features, layers)
    tokens, other = model.tokenize(prompt), model.tokenize(other_prompt)
    state, other_state = states if states is not None else (rm.record(tokens), rm.record(other))
    _check_active(from_features, _active(state), "target", prompt)
    source = _active(other_state)
    _check_active(to_features, source, "source", other_prompt)
    shift = len(tokens) - len(other)
    mask = rm.feature_mask(len(tokens))
    items: list[FeatureEdit] = []
    removed = [tuple(int(x) for x in f) for f in from_features]
    for l, p, f in removed:
        items.append(FeatureEdit(l, f, p, "ablate"))
    inserted = []
    for feat in to_features:
        l, p, f = (int(x) for x in feat)
        q = p + shift
        if not 0 <= q < len(tokens) or not bool(mask[q]):
            raise SwapError(
                f"feature L{l}/F{f}@{p} of {other_prompt!r} maps to position {q} of {prompt!r} "
                f"(prompts aligned at their last token), which holds no features: use prompts "
                "whose features line up, or features at later positions"
            )
        v = source[(l, p, f)]
        items.append(FeatureEdit(l, f, q, "set", v))
        inserted.append((l, q, f, v))
    batch = [[], items]
    run_on = state if mode != "live" else tokens
    logits = intervene_batch(rm, run_on, batch, mode, record_sites=()).logits[:, -1]
    probs = logits.float().softmax(-1)
    gens = (
        generate_batch(rm, tokens, batch, max_new_tokens=max_new_tokens)
        if max_new_tokens > 0
        else None
    )
    return SwapResult(
        prompt=prompt,
        other_prompt=other_prompt,
        mode=mode,
        removed=removed,
        inserted=inserted,
        top_before=_top(logits[0], model.decode, top_k),
        top_after=_top(logits[1], model.decode, top_k),
        continuation_before=gens[0].text if gens else "",
        continuation_after=gens[1].text if gens else "",
        layers=list(layers) if layers is not None else None,
        watched=_watch(probs[0], probs[1], watch, model.decode),
    )


def swap_supernodes(
    rm: ReplacementModel,
    graph: Graph,
    remove: str | Sequence[str],
    other_graph: Graph,
    insert: str | Sequence[str],
    **options,
) -> SwapResult:
    """Swap supernode(s) ``remove`` of ``graph`` for supernode(s) ``insert`` of
    ``other_graph`` (ids such as ``s0``; see :func:`swap` for the options)."""
    remove = [remove] if isinstance(remove, str) else list(remove)
    insert = [insert] if isinstance(insert, str) else list(insert)
    out_f = [m for sid in remove for m in get_supernode(graph, sid).members]
    in_f = [m for sid in insert for m in get_supernode(other_graph, sid).members]
    result = swap(rm, graph.prompt, out_f, in_f, other_graph.prompt, **options)
    result.label = {
        "remove": remove,
        "insert": insert,
        "remove_names": [get_supernode(graph, s).name for s in remove],
        "insert_names": [get_supernode(other_graph, s).name for s in insert],
    }
    return result


def read_swap_file(path: str | Path) -> list[dict]:
    """A JSON Lines file of swaps, one object a line: ``graph`` (Parquet file of the prompt's
    graph), ``remove`` (supernode id or list), ``other_graph``, ``insert``; optional ``mode``,
    ``max_new_tokens``. Clear errors for a missing key or unreadable line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"swap file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise SwapError(f"{path} line {n}: not JSON ({err})") from err
        missing = [k for k in ("graph", "remove", "other_graph", "insert") if k not in rec]
        if not isinstance(rec, dict) or missing:
            raise SwapError(
                f"{path} line {n}: a swap needs 'graph', 'remove', 'other_graph' and 'insert' "
                f"(missing {missing})"
            )
        rows.append(rec)
    if not rows:
        raise SwapError(f"{path} holds no swaps")
    return rows


def run_swap_file(rm: ReplacementModel, path: str | Path, *, progress: bool = True):
    """Run every swap of a swap file; each result is appended to its graph's
    ``extra['swaps']`` and the graph file rewritten. Returns [(graph path, SwapResult)]."""
    from tqdm.auto import tqdm

    out = []
    for rec in tqdm(read_swap_file(path), desc="swaps", unit="swap", disable=not progress):
        gpath = Path(rec["graph"])
        graph, other = Graph.load(gpath), Graph.load(rec["other_graph"])
        opts = {k: rec[k] for k in ("mode", "max_new_tokens", "top_k") if k in rec}
        result = swap_supernodes(rm, graph, rec["remove"], other, rec["insert"], **opts)
        result.label["other_graph"] = str(rec["other_graph"])
        graph.extra.setdefault("swaps", []).append(result.to_dict())
        graph.save(gpath)
        out.append((gpath, result))
    return out


# --- concept swaps between two prompts of one category ------------------------------------------

VARIANT_POSITIONS = ("concept", "last", "concept+last")


@dataclass(frozen=True)
class SwapVariant:
    """Which features a concept swap exchanges: every active feature at ``positions``
    ('concept': where the prompts differ; 'last': the last position, where the answer is said;
    'concept+last': both), of ``layers`` (inclusive; None: all)."""

    positions: str = "concept"
    layers: LayerRange | None = None

    def __post_init__(self):
        if self.positions not in VARIANT_POSITIONS:
            raise SwapError(
                f"swap positions {self.positions!r}: use one of {', '.join(VARIANT_POSITIONS)}"
            )

    @property
    def name(self) -> str:
        where = {"concept": "concept position", "last": "last position"}.get(
            self.positions, "concept + last positions"
        )
        span = "all layers" if self.layers is None else f"layers {self.layers[0]}-{self.layers[1]}"
        return f"every active feature at the {where}, {span}"


def next_token(rm: ReplacementModel, state: PromptState) -> tuple[str, int, float]:
    """The model's most likely next token after a recorded prompt: (text, id, probability)."""
    return _top(state.logits[-1], rm.model.decode, 1)[0]


def concept_swaps(
    rm: ReplacementModel,
    prompt: str,
    other_prompt: str,
    variants: Sequence[SwapVariant],
    *,
    max_new_tokens: int = 4,
    mode: str = "live",
) -> dict:
    """Each variant's swap of ``prompt``'s features for ``other_prompt``'s (same token length),
    watching the other prompt's answer (its unedited top token). Returns a JSON-ready dict:
    the prompts, the concept positions, both answers and per variant the :class:`SwapResult`
    fields plus ``moved_to_other`` (the top token became the other prompt's answer) and
    ``other_answer`` (its probability and rank before and after)."""
    pos = concept_positions(rm.model, prompt, other_prompt)
    last = len(rm.model.tokenize(prompt)) - 1
    sa = rm.record(rm.model.tokenize(prompt))
    sb = rm.record(rm.model.tokenize(other_prompt))
    answer, other = next_token(rm, sa), next_token(rm, sb)
    out = {
        "prompt": prompt,
        "other_prompt": other_prompt,
        "positions": pos,
        "answer": answer,
        "other_answer": other,
        "experiments": [],
    }
    for v in variants:
        where = {"concept": pos, "last": [last], "concept+last": sorted({*pos, last})}
        at = where[v.positions]
        remove = active_features(rm, prompt, at, v.layers, state=sa)
        insert = active_features(rm, other_prompt, at, v.layers, state=sb)
        res = swap(rm, prompt, remove, insert, other_prompt, mode=mode, layers=v.layers,
                   watch=[other[1]], max_new_tokens=max_new_tokens, states=(sa, sb))  # fmt: skip
        d = res.to_dict()
        d.pop("removed"), d.pop("inserted")  # thousands of entries: their counts are kept
        out["experiments"].append({
            "what": v.name, "positions": at, "n_removed": len(res.removed),
            "n_inserted": len(res.inserted), **d,
            "moved_to_other": res.top_after[0][1] == other[1],
            "other_answer": res.watched[0],
        })  # fmt: skip
    return out
