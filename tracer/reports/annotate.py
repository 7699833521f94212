"""What reports say about a graph's nodes: influence, display text, strongest neighbours.

Shared by the renderer, the HTML report and the Neuronpedia export so the three agree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.reports.feature_book import FeatureBook, FeatureInfo


def display_influence(graph: Graph) -> np.ndarray:
    """Per-node influence on the logits for display [n_nodes] float64, >= 0.

    Feature, error and token nodes: the influence recorded by pruning (``graph.extra
    ['influence']``, a list aligned with the nodes, or a node array ``graph.influence``), else
    computed now (:func:`tracer.prune.node_influence`), else — for a graph without logit weights
    — |activation|. Logit nodes: their logit weight (the share of the target they stand for).
    """
    values = getattr(graph, "influence", None)
    if values is None:
        values = graph.extra.get("influence")
    if values is not None:
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (graph.n_nodes,):
            raise ValueError(
                f"graph influence has shape {arr.shape} but the graph has {graph.n_nodes} nodes; "
                "it must be a list aligned with the nodes"
            )
    elif float(np.abs(graph.logit_weights).sum()) > 0:
        from tracer.prune import node_influence

        arr = node_influence(graph)
    else:
        arr = graph.activation.astype(np.float64)
    arr = np.abs(np.nan_to_num(arr))
    is_logit = graph.kind == LOGIT
    arr[is_logit] = np.abs(graph.logit_weights[is_logit])
    return arr


def influence_source(graph: Graph) -> str:
    """Where :func:`display_influence` takes its values from: "recorded", "computed" or
    "activation"."""
    if getattr(graph, "influence", None) is not None or "influence" in graph.extra:
        return "recorded"
    return "computed" if float(np.abs(graph.logit_weights).sum()) > 0 else "activation"


def visible(text: str) -> str:
    """Token text with line breaks and tabs made visible (a bare newline token would vanish)."""
    return text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")


def visible_token(text: str) -> str:
    """One token's text with its spaces shown as ``␣`` as well (``" Paris"`` -> ``"␣Paris"``),
    so tokens that differ only by a leading space look different."""
    return visible(text).replace(" ", "␣")


def vocab_text(graph: Graph, vocab_id: int, decode: Callable[[int], str] | None = None) -> str:
    """The text of vocabulary item ``vocab_id``: from the graph's own token-text table
    (``graph.extra['token_text']``, {id: text}), else a prompt token with that id, else
    ``decode``; ``#id`` when none knows it."""
    table = graph.extra.get("token_text") or {}
    text = table.get(str(vocab_id), table.get(vocab_id)) if isinstance(table, dict) else None
    if text is not None:
        return str(text)
    for tok, s in zip(graph.tokens, graph.token_strings, strict=False):
        if int(tok) == int(vocab_id):
            return s
    if decode is not None:
        return decode(int(vocab_id))
    return f"#{vocab_id}"


def node_text(
    graph: Graph,
    i: int,
    features: FeatureBook | None = None,
    decode: Callable[[int], str] | None = None,
) -> str:
    """Short display text for node ``i``: the token for token and logit nodes, the feature's
    label (:func:`auto_label`) for features, ``error`` for error nodes."""
    k = int(graph.kind[i])
    if k == TOKEN:
        return visible(graph.token_strings[int(graph.position[i])])
    if k == LOGIT:
        return visible(vocab_text(graph, int(graph.feature[i]), decode))
    if k == ERROR:
        return "error"
    info = features.get(int(graph.layer[i]), int(graph.feature[i])) if features else None
    return auto_label(info) if info else ""


# Words that recur around every kind of activation and name nothing.
_STOPWORDS = frozenset(
    "a an the of to in on at by for from with and or but is are was were be been being it its "
    "this that these those as so than then there their they them he she his her we our you your "
    "i me my not no do does did has have had will would can could may might shall should which "
    "who whom what when where how all any some such into about over after before s t".split()
)
_WORD = re.compile(r"[^\W\d_][\w'-]*|\d+", re.UNICODE)
MAX_AUTO_LABEL = 40


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in _STOPWORDS]


def auto_label(info: FeatureInfo, n_before: int = 5, n_after: int = 2) -> str:
    """A short label for a feature from what is known of it: its human label when it has one;
    else the activating token when it recurs (in quotes), the words that recur near the
    activations of its top contexts (``n_before`` words before and ``n_after`` after the
    activating token, in at least two contexts, stopwords left out), and its top promoted
    tokens (``→ ␣Paris ␣France``), joined by `` · `` and cut to 40 characters; ``on ␣tok``
    (the strongest context's token) when nothing recurs and nothing is promoted."""
    if info.label:
        return info.label
    peaks: Counter = Counter()
    near: Counter = Counter()
    weight: Counter = Counter()
    for rank, ctx in enumerate(info.top_contexts):
        if not ctx.tokens:
            continue
        p = ctx.peak
        tok = ctx.tokens[p].strip().lower()
        if tok:
            peaks[tok] += 1
        left = _words("".join(ctx.tokens[:p]))[-n_before:]
        right = _words("".join(ctx.tokens[p + 1 :]))[:n_after]
        for w in set(left + right):
            near[w] += 1
            weight[w] += 1.0 / (1 + rank)
    parts = []
    top_peak, peak_n = peaks.most_common(1)[0] if peaks else ("", 0)
    if peak_n >= 2:
        parts.append(f"“{top_peak}”")
    recurring = sorted((w for w, c in near.items() if c >= 2 and w != top_peak),
                       key=lambda w: (-near[w], -weight[w], w))[:2]  # fmt: skip
    if recurring:
        parts.append(", ".join(recurring))
    promoted = [visible_token(t) for t, _ in info.promoted_tokens[:2] if t.strip()]
    if promoted:
        parts.append("→ " + " ".join(promoted))
    if not parts and info.top_contexts and info.top_contexts[0].tokens:
        ctx = info.top_contexts[0]
        parts.append("on " + visible_token(ctx.tokens[ctx.peak]))
    text = " · ".join(parts)
    return text if len(text) <= MAX_AUTO_LABEL else text[: MAX_AUTO_LABEL - 1] + "…"


def node_heading(graph: Graph, i: int) -> str:
    """Kind and coordinates: ``L3 F17 @4``, ``error L3 @4``, ``token @4``, ``logit``."""
    k, layer, pos = int(graph.kind[i]), int(graph.layer[i]), int(graph.position[i])
    if k == FEATURE:
        return f"L{layer} F{int(graph.feature[i])} @{pos}"
    if k == ERROR:
        return f"error L{layer} @{pos}"
    if k == TOKEN:
        return f"token @{pos}"
    return f"logit @{pos}"


def neighbours(graph: Graph, top: int | None = None) -> tuple[list[list], list[list]]:
    """Per node, its incoming and outgoing edges as (other node, weight) pairs sorted by
    |weight| descending (at most ``top`` each when given). Returns (inputs, outputs), each a
    list [n_nodes] of lists."""
    inputs: list[list] = [[] for _ in range(graph.n_nodes)]
    outputs: list[list] = [[] for _ in range(graph.n_nodes)]
    order = np.argsort(-np.abs(graph.weight), kind="stable")
    for t, s, w in zip(
        graph.target[order].tolist(),
        graph.source[order].tolist(),
        graph.weight[order].tolist(),
        strict=True,
    ):
        if top is None or len(inputs[t]) < top:
            inputs[t].append((s, w))
        if top is None or len(outputs[s]) < top:
            outputs[s].append((t, w))
    return inputs, outputs


def logit_order(graph: Graph) -> np.ndarray:
    """Indices of the logit nodes, most probable first."""
    idx = np.flatnonzero(graph.kind == LOGIT)
    return idx[np.argsort(-graph.probability[idx], kind="stable")]
