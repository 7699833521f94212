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
prompt. The classic case (Ameisen et al., 2025): on "The capital of the state containing Dallas
is", the Texas features swapped for California's should turn " Austin" into " Sacramento".

:func:`swap_supernodes` takes the two feature sets as supernodes of the two prompts' graphs
(:mod:`tracer.supernodes`); :func:`run_swap_file` runs a JSON Lines file of them and keeps each
result in the first graph's ``extra['swaps']``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tracer.graph import Graph
from tracer.interventions import FeatureEdit, intervene_batch
from tracer.replacement import PromptState, ReplacementModel
from tracer.steer import generate_batch
from tracer.supernodes import get_supernode

Feature = tuple[int, int, int]  # (layer, position, index)


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
) -> SwapResult:
    """Ablate ``from_features`` (active in ``prompt``) and insert ``to_features`` with their
    activations in ``other_prompt`` (see the module doc). Raises SwapError when a feature is
    not active in its prompt or a position does not map into ``prompt``."""
    model = rm.model
    tokens, other = model.tokenize(prompt), model.tokenize(other_prompt)
    state, other_state = rm.record(tokens), rm.record(other)
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
