"""A score of meaning for a transcoder: sparse probing of concept categories (in the style of
SAEBench), the token-level share, the dead share and firing frequencies.

The probe text is held-out prose with category members marked: the glosses and examples of
WordNet's held-out tenth of synsets (:func:`transcoders.corpora.wordnet.is_heldout`, never in the
WordNet
corpus source) and, for programming keywords, short Python snippets written for this probe.
Members come from WordNet (the lemmas below a root synset, e.g. the countries below "country"),
except the programming keywords (a fixed list). A *positive* position is the last token of a
member occurrence; the member's other tokens are ignored for that category; every other
non-BOS, non-padding position is a negative.

For each category and layer, the best single feature is chosen on one half of the probe rows
(even rows: candidates by standardised mean difference and by firing-rate difference, then the
highest AUROC among them) and its AUROC is measured on the other half (odd rows), so a
transcoder whose features carry no information scores about 0.5 however many features it has.
The *best layer* of a category is chosen on the selection half too; ``mean_best`` is the mean
over categories of the measured AUROC at each category's best layer.

Entry points: :func:`meaning_score` (transcoder, activations callable, tokenizer -> result) and
:func:`score_probe` (with a ready :class:`Probe`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from transcoders.corpora import wordnet
from transcoders.corpora.corpus import TokenizerSpec
from transcoders.training.harvest import ActivationFn

FILE_NAME = "meaning.json"
FREQ_EDGES = (1e-4, 1e-3, 1e-2, 1e-1)  # histogram bins: dead, (0,1e-4], ..., (1e-1, 1]
FREQ_BINS = ("dead", "<=0.01%", "0.01-0.1%", "0.1-1%", "1-10%", ">10%")

PYTHON_KEYWORDS = (
    "def", "return", "import", "class", "lambda", "yield", "elif", "else", "while", "try",
    "except", "finally", "raise", "assert", "pass", "continue", "break", "None", "True",
    "False", "global", "nonlocal",
)  # fmt: skip

# Python snippets for the programming-keyword category (written for this probe).
CODE_SNIPPETS = (
    "def area(radius):\n    return 3.14159 * radius ** 2",
    "import math\nprint(math.sqrt(16))",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y",
    "squares = list(map(lambda n: n * n, range(10)))",
    "def count_up(limit):\n    n = 0\n    while n < limit:\n        yield n\n        n += 1",
    "if score > 90:\n    grade = 'A'\nelif score > 80:\n    grade = 'B'\nelse:\n    grade = 'C'",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\nfinally:\n    done = True",
    "def check(age):\n    if age < 0:\n        raise ValueError('negative age')\n    return age",
    "assert len(items) > 0, 'empty list'",
    "for line in lines:\n    if not line:\n        continue\n    if line == 'end':\n        break",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def pop(self):\n"
    "        return self.items.pop()",
    "def first(items):\n    for item in items:\n        return item\n    return None",
    "import os\nimport sys\npath = os.path.join('data', 'file.txt')",
    "found = False\nfor name in names:\n    if name.startswith('a'):\n        found = True",
    "counter = 0\ndef increment():\n    global counter\n    counter += 1",
    "def outer():\n    total = 0\n    def inner():\n        nonlocal total\n        total += 1\n"
    "    inner()\n    return total",
    "key = lambda row: row['date']\nrows.sort(key=key)",
    "while True:\n    command = input('> ')\n    if command == 'quit':\n        break",
    "def noop():\n    pass",
    "class Animal:\n    pass\nclass Dog(Animal):\n    def speak(self):\n        return 'woof'",
    "try:\n    f = open('config.ini')\nexcept FileNotFoundError:\n    f = None",
    "def fib(n):\n    a, b = 0, 1\n    while a < n:\n        yield a\n        a, b = b, a + b",
    "import json\ndef load(path):\n    with open(path) as fh:\n        return json.load(fh)",
    "is_valid = x is not None and x > 0\nif is_valid:\n    print('ok')\nelse:\n    print('no')",
    "def safe_div(a, b):\n    try:\n        return a / b\n    except ZeroDivisionError:\n"
    "        return None",
    "assert isinstance(name, str)\nassert name, 'name is empty'",
    "class Config:\n    debug = False\n    verbose = True",
    "import random\nvalues = [random.random() for _ in range(5)]",
    "def parse(token):\n    if token == 'yes':\n        return True\n    elif token == 'no':\n"
    "        return False\n    raise KeyError(token)",
    "def evens(limit):\n    for n in range(limit):\n        if n % 2:\n            continue\n"
    "        yield n",
)


@dataclass(frozen=True)
class CategorySpec:
    """A concept category: WordNet roots as (lemma, sense number), or a fixed member list.

    ``capitalised``: keep only lemmas that start upper-case (proper names) or only lower-case
    (``False``); ``None`` keeps both. ``first_sense``: a lemma counts only if its most frequent
    noun sense is in the category. ``instances``: follow instance-hyponym pointers (needed for
    proper names). ``max_words``: longest lemma kept. ``domain``: the probe text it is matched
    in ('prose' = WordNet sentences, 'code' = the Python snippets)."""

    name: str
    roots: tuple[tuple[str, int], ...] = ()
    fixed: tuple[str, ...] = ()
    capitalised: bool | None = None
    first_sense: bool = True
    first_lemma_only: bool = False
    max_words: int = 2
    nouns_only: bool = True
    domain: str = "prose"


CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec("countries", (("country", 2),), capitalised=True, first_sense=False),
    CategorySpec("cities", (("city", 1),), capitalised=True),
    CategorySpec(
        "us_states",
        (("american_state", 1),),
        capitalised=True,
        first_sense=False,
        first_lemma_only=True,
    ),  # fmt: skip
    CategorySpec("languages", (("natural_language", 1),), capitalised=True, nouns_only=False),
    CategorySpec(
        "colours",
        (("chromatic_color", 1), ("achromatic_color", 1)),
        capitalised=False,
        max_words=1,
        first_lemma_only=True,
        nouns_only=False,
    ),  # fmt: skip
    CategorySpec(
        "numbers",
        (("digit", 1), ("large_integer", 1)),
        capitalised=False,
        max_words=1,
        first_lemma_only=True,
        nouns_only=False,
    ),
    CategorySpec(
        "months",
        (("gregorian_calendar_month", 1),),
        capitalised=True,
        first_sense=False,
        first_lemma_only=True,
    ),  # fmt: skip
    CategorySpec("animals", (("animal", 1),), capitalised=False),
    CategorySpec("body_parts", (("body_part", 1),), capitalised=False),
    CategorySpec("family_relations", (("relative", 1),), capitalised=False),
    CategorySpec("programming_keywords", fixed=PYTHON_KEYWORDS, domain="code"),
)
CATEGORY_NAMES = tuple(c.name for c in CATEGORIES)


class MeaningError(ValueError):
    """The probe cannot be built or scored; the message names the problem and the fix."""


# --- members and probe text ------------------------------------------------------------------


def members(spec: CategorySpec, wordnet_root: str | None = None) -> list[str]:
    """The category's member words (sorted)."""
    if spec.fixed:
        return sorted(spec.fixed)
    words = wordnet.category_members(
        spec.roots,
        wordnet_root,
        first_sense_only=spec.first_sense,
        max_words=spec.max_words,
        instances=spec.capitalised is not False,
        first_lemma_only=spec.first_lemma_only,
        nouns_only=spec.nouns_only,
    )
    if spec.capitalised is not None:
        words = [w for w in words if w[0].isupper() == spec.capitalised]
    # Abbreviations (all capitals, or ending in a full stop) are ambiguous: leave them out.
    return [w for w in words if not (w.isupper() or w.endswith(".")) and len(w) > 1]


_WORD = re.compile(r"[\w'-]+")


class MemberMatcher:
    """Finds member occurrences in text at word boundaries (words = runs of letters, digits,
    apostrophes and hyphens), longest member first. Members of a lower-case category also match
    with a capital first letter ("Red" at a sentence start)."""

    def __init__(self, words: list[str], lower_also_capitalised: bool):
        self.fold = lower_also_capitalised
        self.members = {tuple(w.split()) for w in words}
        self.max_n = max((len(m) for m in self.members), default=0)

    def _norm(self, w: str) -> str:
        return w[0].lower() + w[1:] if self.fold and w else w

    def finditer(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of member occurrences, left to right."""
        words = list(_WORD.finditer(text))
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.max_n, len(words) - i), 0, -1):
                group = words[i : i + n]
                # Multi-word members must be separated by single spaces in the text.
                if any(
                    text[a.end() : b.start()] != " " for a, b in zip(group, group[1:], strict=False)
                ):
                    continue
                key = (self._norm(group[0].group()), *(g.group() for g in group[1:]))
                if key in self.members:
                    out.append((group[0].start(), group[-1].end()))
                    i += n
                    break
            else:
                i += 1
        return out

    def search(self, text: str) -> bool:
        return bool(self.finditer(text))


@dataclass
class Probe:
    """Probe text as token rows with member positions marked.

    ``tokens`` long [S, P] (BOS first, padded with BOS after the text); ``valid`` bool [S, P]
    (False at BOS and padding); ``positive[c]`` and ``ignore[c]`` bool [S, P] per category name
    (last token of a member occurrence / its other tokens); ``members[c]`` the member words."""

    tokens: torch.Tensor
    valid: torch.Tensor
    positive: dict[str, torch.Tensor]
    ignore: dict[str, torch.Tensor]
    members: dict[str, list[str]]
    source: str

    def check(self, min_positives: int = 1) -> None:
        """Each category needs member positions in both halves (selection and measurement)."""
        for c, pos in self.positive.items():
            n_sel, n_eval = int(pos[0::2].sum()), int(pos[1::2].sum())
            if min(n_sel, n_eval) < min_positives:
                raise MeaningError(
                    f"category {c!r} has {n_sel + n_eval} held-out member positions "
                    f"({n_sel} selection, {n_eval} measurement; need {min_positives} in each) in "
                    f"the probe text ({self.source}): give text that contains its members "
                    f"(e.g. {', '.join(self.members[c][:3])}) or leave the category out"
                )


def _pick(sentences: list[str], n: int, salt: str) -> list[str]:
    """A fixed pseudo-random choice of n sentences (by hash), in their original order."""
    if len(sentences) <= n:
        return sentences
    h = [hashlib.blake2b((salt + s).encode(), digest_size=8).digest() for s in sentences]
    keep = set(np.argsort(h, kind="stable")[:n].tolist())
    return [s for i, s in enumerate(sentences) if i in keep]


def probe_sentences(
    specs: tuple[CategorySpec, ...],
    member_lists: dict[str, list[str]],
    *,
    per_category: int = 80,
    background: int = 150,
    text: list[str] | None = None,
    wordnet_root: str | None = None,
) -> tuple[list[tuple[str, str]], dict[str, MemberMatcher]]:
    """(domain, sentence) pairs for the probe and each category's member regex. Prose comes
    from ``text`` if given, else from WordNet's held-out synsets: up to ``per_category``
    sentences containing each category's members plus ``background`` containing none."""
    patterns = {
        s.name: MemberMatcher(member_lists[s.name], lower_also_capitalised=s.capitalised is False)
        for s in specs
    }
    if text is None:
        text = [
            t
            for syn in wordnet.read_synsets(wordnet_root)
            if wordnet.is_heldout(syn)
            for t in wordnet.sentences(syn)
        ]
    prose = [s for s in specs if s.domain == "prose"]
    chosen: dict[str, None] = {}
    hits = {s.name: [t for t in text if patterns[s.name].search(t)] for s in prose}
    for s in prose:
        for t in _pick(hits[s.name], per_category, s.name):
            chosen[t] = None
    if background:
        hit = {t for h in hits.values() for t in h}
        none = [t for t in text if t not in hit]
        for t in _pick(none, background, "background"):
            chosen[t] = None
    out = [("prose", t) for t in chosen]
    if any(s.domain == "code" for s in specs):
        out += [("code", c) for c in CODE_SNIPPETS]
    # Interleave so that both halves (even/odd rows) see every kind of text.
    order = np.argsort(
        [hashlib.blake2b(t.encode(), digest_size=8).digest() for _, t in out], kind="stable"
    )
    return [out[i] for i in order], patterns


def _encode_marked(
    text: str, spans: list[tuple[int, int, str]], tok: TokenizerSpec
) -> tuple[list[int], list[tuple[int, int, str]]]:
    """Token ids of ``text`` encoded piecewise at span edges (a span keeps its leading space),
    and each span as (first token, last token, category) in the ids."""
    ids: list[int] = []
    marks = []
    cur = 0
    for a, b, c in spans:
        if a > 0 and text[a - 1] == " ":
            a -= 1
        if a > cur:
            ids += tok.encode(text[cur:a])
        piece = tok.encode(text[a:b])
        if piece:
            marks.append((len(ids), len(ids) + len(piece) - 1, c))
        ids += piece
        cur = b
    if cur < len(text):
        ids += tok.encode(text[cur:])
    return ids, marks


def build_probe(
    tok: TokenizerSpec,
    *,
    categories: tuple[str, ...] | None = None,
    seq_len: int = 64,
    per_category: int = 80,
    background: int = 150,
    text: list[str] | None = None,
    wordnet_root: str | None = None,
    min_positives: int = 1,
) -> Probe:
    """The probe for ``categories`` (default: all of :data:`CATEGORIES`), tokenised with ``tok``
    and packed into rows of ``seq_len`` tokens (BOS + sentences separated by newlines, padded).
    ``text``: prose sentences to use instead of WordNet's held-out glosses."""
    specs = _specs(categories)
    member_lists = {s.name: members(s, wordnet_root) for s in specs}
    for name, m in member_lists.items():
        if not m:
            raise MeaningError(f"category {name!r} has no members: check its WordNet roots")
    sents, patterns = probe_sentences(
        specs, member_lists, per_category=per_category, background=background, text=text,
        wordnet_root=wordnet_root,
    )  # fmt: skip
    sep = tok.encode("\n")
    rows: list[tuple[list[int], list[tuple[int, int, str]]]] = []
    cur_ids, cur_marks = [tok.bos_id], []
    for domain, t in sents:
        spans = sorted(
            (a, b, s.name)
            for s in specs
            if s.domain == domain
            for a, b in patterns[s.name].finditer(t)
        )
        kept, end = [], -1
        for a, b, c in spans:  # overlapping matches of two categories: keep the first
            if a >= end:
                kept.append((a, b, c))
                end = b
        ids, marks = _encode_marked(t, kept, tok)
        ids = ids[: seq_len - 1]
        marks = [m for m in marks if m[1] < len(ids)]
        if len(cur_ids) + len(sep) + len(ids) > seq_len:
            rows.append((cur_ids, cur_marks))
            cur_ids, cur_marks = [tok.bos_id], []
        off = len(cur_ids) + (len(sep) if len(cur_ids) > 1 else 0)
        if len(cur_ids) > 1:
            cur_ids = cur_ids + sep
        cur_marks += [(a + off, b + off, c) for a, b, c in marks]
        cur_ids = cur_ids + ids
    if len(cur_ids) > 1:
        rows.append((cur_ids, cur_marks))
    S = len(rows)
    tokens = torch.full((S, seq_len), tok.bos_id, dtype=torch.long)
    valid = torch.zeros(S, seq_len, dtype=torch.bool)
    positive = {s.name: torch.zeros(S, seq_len, dtype=torch.bool) for s in specs}
    ignore = {s.name: torch.zeros(S, seq_len, dtype=torch.bool) for s in specs}
    for r, (ids, marks) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
        valid[r, 1 : len(ids)] = True
        for a, b, c in marks:
            positive[c][r, b] = True
            ignore[c][r, a:b] = True
    source = "custom text" if text is not None else "WordNet held-out glosses + Python snippets"
    probe = Probe(tokens, valid, positive, ignore, member_lists, source)
    probe.check(min_positives)
    return probe


def _specs(categories: tuple[str, ...] | None) -> tuple[CategorySpec, ...]:
    if categories is None:
        return CATEGORIES
    by_name = {c.name: c for c in CATEGORIES}
    unknown = [c for c in categories if c not in by_name]
    if unknown:
        raise MeaningError(
            f"unknown probe categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
            f"known: {', '.join(CATEGORY_NAMES)}"
        )
    return tuple(by_name[c] for c in categories)


# --- scoring ---------------------------------------------------------------------------------


@dataclass
class MeaningConfig:
    """``candidates``: features per criterion whose exact AUROC is computed when choosing the
    best feature; ``batch``: probe rows per forward pass; ``top_contexts``: contexts per feature
    for the token-level share (features firing on fewer positions are left out of it)."""

    categories: tuple[str, ...] | None = None
    candidates: int = 32
    batch: int = 16
    top_contexts: int = 8
    seq_len: int = 64
    per_category: int = 80
    background: int = 150


@dataclass
class CategoryScore:
    """One category: per layer the chosen feature, its AUROC on the selection half and its
    AUROC measured on the other half; the best layer (chosen on the selection half) and the
    measured AUROC there. The same for the F1 score of *firing* (activation > 0) as a
    member detector (``f1_*``): unlike AUROC, it is low for a dense feature that fires on
    members and on much else besides, so it tells selective features from dense ones."""

    name: str
    n_members: int
    n_positives: int  # member positions in the probe, both halves
    feature: list[int]
    auroc_selection: list[float]
    auroc: list[float]
    best_layer: int
    best_auroc: float
    f1_feature: list[int] = field(default_factory=list)
    f1_selection: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    best_f1_layer: int = 0
    best_f1: float = float("nan")


@dataclass
class LayerStats:
    """Per layer, over the probe's valid positions: firing frequency (share of positions with
    a non-zero activation) median, share of features above 10%, dead share (never fires), the
    token-level share (of features firing on at least ``top_contexts`` positions, those whose
    top contexts all have the same token) and a histogram over :data:`FREQ_BINS`."""

    layer: int
    n_features: int
    dead_share: float
    median_frequency: float
    share_above_10pct: float
    token_level_share: float
    frequency_histogram: list[int]


@dataclass
class MeaningResult:
    categories: list[CategoryScore]
    layers: list[LayerStats]
    per_layer_mean: list[float]  # mean over categories of the measured AUROC, per layer
    mean_best: float  # mean over categories of the measured AUROC at each best layer
    n_rows: int
    n_positions: int
    source: str
    transcoder: str | None = None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MeaningResult:
        d = dict(d)
        d["categories"] = [CategoryScore(**c) for c in d["categories"]]
        d["layers"] = [LayerStats(**x) for x in d["layers"]]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> dict:
        """The headline numbers (for training metrics and benchmark tables)."""
        freqs = [x.median_frequency for x in self.layers]
        return {
            "mean_best_auroc": round(self.mean_best, 4),
            "mean_best_f1": round(float(np.mean([c.best_f1 for c in self.categories])), 4),
            "best_f1": {c.name: round(c.best_f1, 4) for c in self.categories},
            "best_auroc": {c.name: round(c.best_auroc, 4) for c in self.categories},
            "best_layer": {c.name: c.best_layer for c in self.categories},
            "median_frequency": float(np.median(freqs)) if freqs else float("nan"),
            "share_above_10pct": float(np.mean([x.share_above_10pct for x in self.layers])),
            "dead_share": float(np.mean([x.dead_share for x in self.layers])),
            "token_level_share": float(np.mean([x.token_level_share for x in self.layers])),
        }

    def lines(self) -> list[str]:
        s = self.summary()
        out = [
            f"meaning score (sparse probing, {len(self.categories)} categories, "
            f"{self.n_positions:,} positions of {self.source}): mean best-layer AUROC "
            f"{self.mean_best:.3f}, mean best-layer F1 of firing {s['mean_best_f1']:.3f}",
        ]
        out += [
            f"  {c.name:<21} AUROC {c.best_auroc:.3f} at L{c.best_layer}/F{c.feature[c.best_layer]}"
            f", F1 {c.best_f1:.3f} at L{c.best_f1_layer}/F{c.f1_feature[c.best_f1_layer]} "
            f"({c.n_positives} positives, {c.n_members} members)"
            for c in self.categories
        ]
        out.append(
            f"features: median frequency {s['median_frequency']:.2%} (median over layers), "
            f"{s['share_above_10pct']:.1%} above 10%, dead {s['dead_share']:.1%}, token-level "
            f"{s['token_level_share']:.1%} (means over layers)"
        )
        return out


def auroc(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Tie-aware AUROC of each column of ``values`` [n, m] for bool ``labels`` [n] -> [m]
    (Mann-Whitney U with average ranks); NaN without both classes."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((values.shape[1],), float("nan"))
    v = values.T.contiguous().double()  # [m, n]
    srt = v.sort(dim=1).values
    lo = torch.searchsorted(srt, v, right=False)
    hi = torch.searchsorted(srt, v, right=True)
    ranks = (lo + hi + 1).double() / 2  # average 1-based rank
    r_pos = ranks[:, labels].sum(1)
    return ((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def firing_f1(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """F1 score of each column's firing (value > 0) as a detector of ``labels`` (bool [n]):
    values [n, m] -> [m]; 0 where a feature never fires or there is no positive."""
    fire = (values > 0).float()
    tp = labels.float() @ fire
    denom = labels.float().sum() + fire.sum(0)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-12), torch.zeros_like(tp))


@torch.no_grad()
def probe_inputs(activations: ActivationFn, tokens: torch.Tensor, batch: int, progress: bool):
    """Every layer's transcoder inputs at every probe position: [L, S*P, d] float16 (CPU)."""
    chunks = []
    it = range(0, len(tokens), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="meaning: probe forward", unit="batch", file=sys.stderr)
    for b in it:
        x, _ = activations(tokens[b : b + batch])
        chunks.append(x.detach().to("cpu", torch.float16))
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def score_probe(
    clt,
    activations: ActivationFn,
    probe: Probe,
    cfg: MeaningConfig | None = None,
    *,
    progress: bool = False,
    inputs: torch.Tensor | None = None,
) -> MeaningResult:
    """Score transcoder ``clt`` (a :class:`~transcoders.clt.CrossLayerTranscoder`, raw-space
    weights) on ``probe``. ``activations(tokens [B, P]) -> (inputs [L, B*P, d], outputs)`` runs
    the model (or pass the precomputed ``inputs`` [L, S*P, d]). Computed on the transcoder's
    device in float32, one layer at a time."""
    cfg = cfg or MeaningConfig()
    S, P = probe.tokens.shape
    if inputs is None:
        inputs = probe_inputs(activations, probe.tokens, cfg.batch, progress)
    L, F = clt.cfg.n_layers, clt.cfg.n_features
    valid = probe.valid.reshape(-1)
    half = (torch.arange(S) % 2).repeat_interleave(P)  # 0: selection rows, 1: measurement rows
    ids = probe.tokens.reshape(-1)[valid]
    names = list(probe.positive)
    keep = {c: valid & ~probe.ignore[c].reshape(-1) for c in names}
    rows = {c: [] for c in names}
    layers = []
    it = range(L)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="meaning: layers", unit="layer", file=sys.stderr)
    for layer in it:
        x = inputs[layer].to(clt.device, torch.float32)
        acts = clt.activate(layer, clt.pre_activations(layer, x)).float().cpu()  # [S*P, F]
        av = acts[valid]
        freq = (av > 0).float().mean(0)
        n_fire = (av > 0).sum(0)
        top = av.topk(min(cfg.top_contexts, len(av)), dim=0).indices  # [k, F]
        same = (ids[top] == ids[top[0]]).all(0)
        enough = n_fire >= cfg.top_contexts
        hist = np.histogram(freq[freq > 0].numpy(), bins=(0, *FREQ_EDGES, 1.0 + 1e-9))[0]
        layers.append(
            LayerStats(
                layer=layer,
                n_features=F,
                dead_share=float((n_fire == 0).float().mean()),
                median_frequency=float(freq.median()),
                share_above_10pct=float((freq > 0.1).float().mean()),
                token_level_share=float(same[enough].float().mean()) if enough.any() else 0.0,
                frequency_histogram=[int((n_fire == 0).sum())] + hist.astype(int).tolist(),
            )
        )
        # Selection half: every category's statistics at once ([C, F] by matrix products).
        sel_rows = valid & (half == 0)
        a_sel = acts[sel_rows]  # [n, F]
        f_sel = (a_sel > 0).float()
        y = torch.stack([probe.positive[c].reshape(-1)[sel_rows] for c in names], 1).float()
        kept = torch.stack([keep[c][sel_rows] for c in names], 1).float()  # not ignored
        n_pos = y.sum(0)[:, None]  # [C, 1]
        n_neg = kept.sum(0)[:, None] - n_pos
        pos_sum, kept_sum = y.T @ a_sel, kept.T @ a_sel  # [C, F]
        pos_fire, kept_fire = y.T @ f_sel, kept.T @ f_sel
        sd = a_sel.std(0).clamp_min(1e-8)
        smd = (pos_sum / n_pos - (kept_sum - pos_sum) / n_neg) / sd  # standardised mean diff.
        frd = pos_fire / n_pos - (kept_fire - pos_fire) / n_neg  # firing-rate difference
        f1_all = 2 * pos_fire / (n_pos + kept_fire).clamp_min(1e-12)  # firing F1 (kept rows)
        k = min(cfg.candidates, F)
        for ci, c in enumerate(names):
            y_all = probe.positive[c].reshape(-1)
            mea = keep[c] & (half == 1)
            rows_c = kept[:, ci].bool()
            cand = torch.unique(torch.cat([smd[ci].topk(k).indices, frd[ci].topk(k).indices]))
            au_sel = auroc(a_sel[:, cand][rows_c], y[rows_c, ci].bool())
            j = int(torch.nan_to_num(au_sel, nan=-1.0).argmax())
            f = int(cand[j])
            au_mea = auroc(acts[:, [f]][mea], y_all[mea])
            g = int(f1_all[ci].argmax())
            f1_mea = firing_f1(acts[:, [g]][mea], y_all[mea])
            rows[c].append((f, float(au_sel[j]), float(au_mea[0]), g, float(f1_all[ci, g]),
                            float(f1_mea[0])))  # fmt: skip
    cats = []
    for c in names:
        feat = [r[0] for r in rows[c]]
        a_sel = [r[1] for r in rows[c]]
        a_mea = [r[2] for r in rows[c]]
        f1_sel = [r[4] for r in rows[c]]
        f1_mea = [r[5] for r in rows[c]]
        best = int(np.nanargmax(a_sel))
        best_f1 = int(np.argmax(f1_sel))
        cats.append(
            CategoryScore(
                name=c,
                n_members=len(probe.members[c]),
                n_positives=int(probe.positive[c].sum()),
                feature=feat,
                auroc_selection=a_sel,
                auroc=a_mea,
                best_layer=best,
                best_auroc=a_mea[best],
                f1_feature=[r[3] for r in rows[c]],
                f1_selection=f1_sel,
                f1=f1_mea,
                best_f1_layer=best_f1,
                best_f1=f1_mea[best_f1],
            )
        )
    per_layer = [float(np.mean([c.auroc[i] for c in cats])) for i in range(L)]
    ident = getattr(clt, "identity", None)
    return MeaningResult(
        categories=cats,
        layers=layers,
        per_layer_mean=per_layer,
        mean_best=float(np.mean([c.best_auroc for c in cats])),
        n_rows=S,
        n_positions=int(valid.sum()),
        source=probe.source,
        transcoder=getattr(ident, "id", None),
        config=asdict(cfg),
    )


def meaning_score(
    clt,
    activations: ActivationFn,
    tok: TokenizerSpec,
    cfg: MeaningConfig | None = None,
    *,
    progress: bool = False,
    text: list[str] | None = None,
) -> MeaningResult:
    """The meaning score of ``clt`` on the default probe (WordNet held-out glosses + Python
    snippets) tokenised with ``tok``. ``activations`` as in :func:`score_probe`; ``text``:
    other prose sentences to probe in (a category without a member there raises
    :class:`MeaningError`)."""
    cfg = cfg or MeaningConfig()
    probe = build_probe(
        tok, categories=cfg.categories, seq_len=cfg.seq_len, per_category=cfg.per_category,
        background=cfg.background, text=text,
    )  # fmt: skip
    return score_probe(clt, activations, probe, cfg, progress=progress)


def save_meaning(result: MeaningResult, folder) -> None:
    from pathlib import Path

    path = Path(folder) / FILE_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(result.to_json())
    tmp.replace(path)


def load_meaning(folder) -> MeaningResult | None:
    """The saved result beside a transcoder's weights (``meaning.json``, or the ``meaning`` entry
    of ``training_metrics.json``), or None."""
    from pathlib import Path

    p = Path(folder)
    if (p / FILE_NAME).is_file():
        return MeaningResult.from_dict(json.loads((p / FILE_NAME).read_text()))
    tm = p / "training_metrics.json"
    if tm.is_file():
        m = json.loads(tm.read_text()).get("meaning")
        if isinstance(m, dict) and "categories" in m:
            return MeaningResult.from_dict(m)
    return None
