"""Is a feature about places? An automatic, documented check of a feature's top contexts.

The rule (the issue-26 goal "top contexts about countries, cities or capitals"):

* the **place words** are the WordNet members of three categories: countries and cities (the
  categories of the meaning probe, :data:`transcoders.meaning.CATEGORIES`) and capitals (every
  lemma at or below ``capital`` sense 3, "a seat of government", instances included: national
  and state capitals), plus the common nouns of :data:`PLACE_NOUNS` (capital, city, country and
  their plurals, any case);
* a **context counts** when a place word occurs at the activating token or within
  ``window`` (3) words of it. Contexts are stored as text with the activating token marked
  (``transcoders.contexts``), not as model tokens, so the unit of distance is the word (a run
  of letters, digits, apostrophes or hyphens, as :class:`transcoders.meaning.MemberMatcher`
  reads words); the activating word is every word the marked token overlaps, and a token
  that is only punctuation or space sits between two words, each at distance 1. A
  multi-word name ("New York") counts when any of its words is in the window;
* a **feature counts** when at least half (``min_share``) of its top ``top`` (8) contexts
  count, and it has at least one context.

Proper names are matched case-sensitively ("Turkey", not "turkey"); the place nouns in any
case; a possessive ("France's") is read as the name. Known limits: a name that is also a
common word in its capitalised form ("Reading", "Mobile") counts; US states are not places by
this rule (they are neither countries nor cities).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tracer.reports.feature_book import Context, FeatureInfo

PLACE_NOUNS = ("capital", "capitals", "city", "cities", "country", "countries")
CAPITAL_ROOT = ("capital", 3)  # WordNet noun sense 3: "a seat of government"
WINDOW = 3
TOP = 8
MIN_SHARE = 0.5
_WORD = re.compile(r"[\w'-]+")


class TopicError(ValueError):
    """The place words cannot be built (WordNet missing); the message names the fix."""


@dataclass(frozen=True)
class PlaceWords:
    """Proper names (matched case-sensitively) and common nouns (any case), each a set of word
    tuples (one tuple per member, its words)."""

    names: frozenset[tuple[str, ...]]
    nouns: frozenset[tuple[str, ...]] = frozenset((w,) for w in PLACE_NOUNS)
    source: str = ""

    @classmethod
    def of(cls, names: Iterable[str], nouns: Iterable[str] = PLACE_NOUNS, source: str = ""):
        return cls(
            frozenset(tuple(n.split()) for n in names if n.strip()),
            frozenset(tuple(n.lower().split()) for n in nouns if n.strip()),
            source,
        )

    def _match(self, words: Sequence[str], i: int) -> int:
        """Length (in words) of the longest member starting at word ``i``, else 0."""
        for n in range(min(4, len(words) - i), 0, -1):
            key = tuple(words[i : i + n])
            if key in self.names or tuple(w.lower() for w in key) in self.nouns:
                return n
        return 0


@functools.lru_cache(maxsize=2)
def place_words(wordnet_root: str | None = None) -> PlaceWords:
    """The place words of the module doc from WordNet (Debian ``wordnet-base``; cached)."""
    from transcoders import meaning
    from transcoders.corpora import wordnet

    spec = {c.name: c for c in meaning.CATEGORIES}
    try:
        names = set(meaning.members(spec["countries"], wordnet_root))
        names |= set(meaning.members(spec["cities"], wordnet_root))
        caps = wordnet.category_members(
            [CAPITAL_ROOT], wordnet_root, first_sense_only=False, instances=True
        )
    except (OSError, wordnet.WordNetError) as err:
        raise TopicError(
            f"the place words need WordNet ({err}): install the Debian package wordnet-base "
            "(scripts/setup does)"
        ) from err
    names |= {w for w in caps if w[:1].isupper()}
    return PlaceWords.of(sorted(names), source="wordnet: countries, cities, capital (sense 3)")


@dataclass
class ContextTopic:
    """One context: its text with the activating token marked «...», whether it counts, and the
    place words found in its window."""

    text: str
    counts: bool
    matched: list[str] = field(default_factory=list)


@dataclass
class FeatureTopic:
    """The check of one feature: ``counts`` when ``n_counting / n_contexts >= min_share``."""

    layer: int
    index: int
    n_contexts: int
    n_counting: int
    counts: bool
    contexts: list[ContextTopic]

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "index": self.index,
            "n_contexts": self.n_contexts,
            "n_counting": self.n_counting,
            "counts": self.counts,
            "contexts": [c.__dict__ for c in self.contexts],
        }


def marked_text(ctx: Context) -> str:
    """The context's text with its activating (peak) token marked «like this»."""
    if not ctx.tokens:
        return ""
    k = ctx.peak
    return "".join(ctx.tokens[:k]) + "«" + ctx.tokens[k] + "»" + "".join(ctx.tokens[k + 1 :])


def context_topic(ctx: Context, words: PlaceWords, window: int = WINDOW) -> ContextTopic:
    """Whether a place word is at the activating token or within ``window`` words of it."""
    text = "".join(ctx.tokens)
    if not ctx.tokens:
        return ContextTopic("", False)
    k = ctx.peak
    start = sum(len(t) for t in ctx.tokens[:k])
    end = start + len(ctx.tokens[k])
    spans = list(_WORD.finditer(text))
    toks = [re.sub(r"'s?$", "", m.group()) for m in spans]  # "France's" is "France"
    hit = [i for i, m in enumerate(spans) if m.start() < end and m.end() > start]
    if hit:
        lo, hi = hit[0] - window, hit[-1] + window
    else:  # punctuation or space: between the word before and the word after
        after = next((i for i, m in enumerate(spans) if m.start() >= end), len(spans))
        lo, hi = after - window, after + window - 1
    matched, i = [], 0
    while i < len(toks):
        n = words._match(toks, i)
        if n and i <= hi and i + n - 1 >= lo:  # any word of the member inside the window
            matched.append(" ".join(toks[i : i + n]))
        i += n or 1
    return ContextTopic(marked_text(ctx), bool(matched), matched)


def feature_topic(
    info: FeatureInfo,
    words: PlaceWords,
    *,
    top: int = TOP,
    min_share: float = MIN_SHARE,
    window: int = WINDOW,
) -> FeatureTopic:
    """The module doc's rule on the first ``top`` contexts of ``info`` (strongest first)."""
    ctxs = [context_topic(c, words, window) for c in info.top_contexts[:top]]
    n = sum(c.counts for c in ctxs)
    return FeatureTopic(
        info.layer, info.index, len(ctxs), n, bool(ctxs) and n >= min_share * len(ctxs), ctxs
    )


# --- the cards of a graph's most influential features -------------------------------------------


@dataclass
class FeatureCard:
    """One feature of a graph: its summed influence over its nodes
    (:func:`influential_features`), the positions it is active at, and what the feature book knows
    (frequency, top contexts marked «...», promoted tokens) with the place-topic check."""

    layer: int
    index: int
    influence: float
    positions: list[int]
    frequency: float | None = None
    contexts: list[str] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    topic: FeatureTopic | None = None  # None: no contexts known (or no place words)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "topic"}
        d["topic"] = self.topic.to_dict() if self.topic is not None else None
        d["about_places"] = None if self.topic is None else self.topic.counts
        return d


def influential_features(graph, n: int = 10) -> list[tuple[int, int, float, list[int]]]:
    """(layer, index, influence, positions) of the ``n`` features of a graph with the largest
    influence summed over their nodes (positions), largest first (ties: layer, index). The
    influence is a pruned graph's ``extra['influence']``, or for a full graph
    :func:`tracer.prune.node_influence` (its recorded convention; circuit-tracer's by default),
    so that features pruned away still rank (a weak transcoder's circuit can hold none)."""
    import numpy as np

    from tracer.graph import FEATURE
    from tracer.prune import node_influence

    infl = graph.extra.get("influence")
    if infl is None:
        infl = node_influence(graph)
    total: dict[tuple[int, int], float] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for i in np.where(graph.kind == FEATURE)[0]:
        key = (int(graph.layer[i]), int(graph.feature[i]))
        total[key] = total.get(key, 0.0) + float(infl[i])
        where.setdefault(key, set()).add(int(graph.position[i]))
    order = sorted(total, key=lambda k: (-total[k], k))[:n]
    return [(l, f, total[(l, f)], sorted(where[(l, f)])) for l, f in order]


def feature_cards(
    graph, book, words: PlaceWords | None, *, n: int = 10, top: int = TOP, n_promoted: int = 5
) -> list[FeatureCard]:
    """Cards of the ``n`` most influential features of ``graph`` (:func:`influential_features`)
    with their information from ``book`` (a :class:`tracer.reports.feature_book.FeatureBook`, or
    None) and,
    when ``words`` is given and contexts are known, :func:`feature_topic`."""
    cards = []
    for layer, index, infl, pos in influential_features(graph, n):
        info = book.get(layer, index) if book is not None else None
        card = FeatureCard(layer, index, infl, pos)
        if info is not None:
            card.frequency = info.frequency
            card.contexts = [marked_text(c) for c in info.top_contexts[:top]]
            card.promoted = [(t, float(w)) for t, w in info.promoted_tokens[:n_promoted]]
            if words is not None and info.top_contexts:
                card.topic = feature_topic(info, words, top=top)
        cards.append(card)
    return cards
