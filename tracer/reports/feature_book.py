"""What is known about transcoder features, for reports: top-activating contexts, an activation
histogram and the output tokens each feature's decoder promotes.

This is the one place reports read feature information from. Two sources are read:

* the feature-contexts table the transcoder training step writes beside trained weights
  (``feature_contexts.parquet``, one row per feature: ``layer``, ``feature``, ``frequency``,
  ``top_activations``, ``top_contexts`` (text with the activating token marked «like this»),
  ``hist_edges``, ``hist_counts``, ``promoted_tokens`` / ``promoted_logits``,
  ``suppressed_tokens`` / ``suppressed_logits``); pass the file or the transcoder folder;
* a plain dict (or a JSON file holding one) in this shape::

    {"features": [
        {"layer": 3, "index": 17, "label": "",                  # label: optional human name
         "top_contexts": [{"tokens": ["The", " capital"], "activations": [0.0, 4.2]}, ...],
         "histogram": {"edges": [0.0, 0.5, ...], "counts": [120, 40, ...]},
         "promoted_tokens": [[" Austin", 0.31], [" Texas", 0.27], ...],
         "suppressed_tokens": [[" Paris", -0.2], ...]},         # optional
        ...]}

Entries may also be given as a mapping keyed ``"layer/index"`` instead of a list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONTEXTS_FILE = "feature_contexts.parquet"  # the name transcoders.contexts saves under


class FeatureInfoError(ValueError):
    """A feature-information file or dict that cannot be read."""


@dataclass
class Context:
    """One top-activating context: token strings and this feature's activation at each token
    (both [n_tokens]); the token of interest is the one with the largest activation."""

    tokens: list[str]
    activations: list[float]

    @property
    def peak(self) -> int:
        """Index of the token where the feature fires most strongly."""
        return max(range(len(self.activations)), key=self.activations.__getitem__, default=0)


@dataclass
class FeatureInfo:
    """Everything reports show about one feature (layer, index) of a transcoder.

    histogram_edges [n_bins + 1] and histogram_counts [n_bins] describe the feature's nonzero
    activations on a held-out corpus slice; promoted_tokens are (token text, logit weight)
    pairs, strongest first.
    """

    layer: int
    index: int
    top_contexts: list[Context] = field(default_factory=list)
    histogram_edges: list[float] = field(default_factory=list)
    histogram_counts: list[int] = field(default_factory=list)
    promoted_tokens: list[tuple[str, float]] = field(default_factory=list)
    suppressed_tokens: list[tuple[str, float]] = field(default_factory=list)
    label: str = ""
    frequency: float | None = None  # fraction of corpus tokens it fires on

    def short_label(self, n_tokens: int = 3) -> str:
        """A few words for a graph node: the human label, else the top promoted tokens, else the
        token at the peak of the strongest context; empty when nothing is known."""
        if self.label:
            return self.label
        if self.promoted_tokens:
            return "→ " + " ".join(_visible(t) for t, _ in self.promoted_tokens[:n_tokens])
        if self.top_contexts:
            ctx = self.top_contexts[0]
            if ctx.tokens:
                return "on " + _visible(ctx.tokens[ctx.peak])
        return ""


class FeatureBook:
    """Feature information keyed by (layer, index); missing features are simply unknown."""

    def __init__(self, infos: Iterable[FeatureInfo] = (), source: str = ""):
        self._infos = {(f.layer, f.index): f for f in infos}
        self.source = source

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return (int(key[0]), int(key[1])) in self._infos

    def get(self, layer: int, index: int) -> FeatureInfo | None:
        return self._infos.get((int(layer), int(index)))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<dict>") -> FeatureBook:
        """Read the documented dict shape (see the module docstring)."""
        if not isinstance(data, Mapping) or "features" not in data:
            raise FeatureInfoError(
                f"feature information from {source} must be a mapping with a 'features' entry "
                "(a list of per-feature records, or a mapping keyed 'layer/index')"
            )
        entries = data["features"]
        if isinstance(entries, Mapping):
            records = []
            for key, rec in entries.items():
                layer, _, index = str(key).partition("/")
                records.append({"layer": layer, "index": index, **rec})
            entries = records
        return cls((_parse_info(rec, source, i) for i, rec in enumerate(entries)), source)

    @classmethod
    def from_table(cls, table, source: str = "<table>") -> FeatureBook:
        """Read the feature-contexts table (pyarrow) written beside trained weights."""
        names = set(table.column_names)
        missing = {"layer", "feature"} - names
        if missing:
            raise FeatureInfoError(
                f"{source} is not a feature-contexts table: no column(s) {sorted(missing)}"
            )
        rows = table.to_pylist()
        return cls((_info_from_row(r) for r in rows), source)

    @classmethod
    def load(cls, path: str | Path) -> FeatureBook:
        """Read a feature-contexts Parquet file (or the transcoder folder holding one) or a JSON
        file in the documented dict shape."""
        path = Path(path)
        if path.is_dir():
            path = path / CONTEXTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"feature information file {path} does not exist")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise FeatureInfoError(f"{path} is not a readable Parquet file: {err}") from err
            return cls.from_table(table, source=str(path))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FeatureInfoError(f"{path} is not a JSON feature-information file: {err}") from err
        return cls.from_dict(data, source=str(path))


def load_features(source: FeatureBook | Mapping | str | Path | None) -> FeatureBook:
    """Whatever the caller has (nothing, a book, a dict, a path) as a :class:`FeatureBook`."""
    if source is None:
        return FeatureBook()
    if isinstance(source, FeatureBook):
        return source
    if isinstance(source, Mapping):
        return FeatureBook.from_dict(source)
    return FeatureBook.load(source)


def _parse_info(rec: Mapping, source: str, i: int) -> FeatureInfo:
    try:
        hist = rec.get("histogram") or {}
        info = FeatureInfo(
            layer=int(rec["layer"]),
            index=int(rec["index"]),
            top_contexts=[
                Context([str(t) for t in c["tokens"]], [float(a) for a in c["activations"]])
                for c in rec.get("top_contexts", [])
            ],
            histogram_edges=[float(x) for x in hist.get("edges", [])],
            histogram_counts=[int(x) for x in hist.get("counts", [])],
            promoted_tokens=[(str(t), float(w)) for t, w in rec.get("promoted_tokens", [])],
            suppressed_tokens=[(str(t), float(w)) for t, w in rec.get("suppressed_tokens", [])],
            label=str(rec.get("label", "") or ""),
            frequency=None if rec.get("frequency") is None else float(rec["frequency"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FeatureInfoError(
            f"feature record {i} in {source} is malformed ({type(err).__name__}: {err}); "
            "each needs integer 'layer' and 'index' (see tracer.reports.feature_book for the shape)"
        ) from err
    for c in info.top_contexts:
        if len(c.tokens) != len(c.activations):
            raise FeatureInfoError(
                f"feature {info.layer}/{info.index} in {source}: a context has "
                f"{len(c.tokens)} tokens but {len(c.activations)} activations"
            )
    if info.histogram_counts and len(info.histogram_edges) != len(info.histogram_counts) + 1:
        raise FeatureInfoError(
            f"feature {info.layer}/{info.index} in {source}: histogram needs one more edge "
            f"than counts (got {len(info.histogram_edges)} edges, "
            f"{len(info.histogram_counts)} counts)"
        )
    return info


def _info_from_row(r: dict) -> FeatureInfo:
    """One row of the feature-contexts table. Its contexts are text with the activating token
    marked «...» and one activation each: kept as three pieces (before, token, after) with the
    activation on the token."""
    contexts = []
    for text, act in zip(r.get("top_contexts") or [], r.get("top_activations") or [], strict=False):
        left, mark, rest = str(text).partition("«")
        token, close, right = rest.rpartition("»")
        if not mark or not close:
            left, token, right = "", str(text), ""
        pieces = [(left, 0.0), (token, float(act)), (right, 0.0)]
        kept = [(t, a) for t, a in pieces if t or a]
        contexts.append(Context([t for t, _ in kept], [a for _, a in kept]))

    def pairs(tokens, values):
        return [(str(t), float(v)) for t, v in zip(tokens or [], values or [], strict=False)]

    return FeatureInfo(
        layer=int(r["layer"]),
        index=int(r["feature"]),
        top_contexts=contexts,
        histogram_edges=[float(x) for x in r.get("hist_edges") or []],
        histogram_counts=[int(x) for x in r.get("hist_counts") or []],
        promoted_tokens=pairs(r.get("promoted_tokens"), r.get("promoted_logits")),
        suppressed_tokens=pairs(r.get("suppressed_tokens"), r.get("suppressed_logits")),
        label=str(r.get("label") or ""),
        frequency=None if r.get("frequency") is None else float(r["frequency"]),
    )


def _visible(token: str) -> str:
    """Token text with whitespace control characters made visible."""
    return token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")
