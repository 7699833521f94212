"""WordNet as text: parse the Princeton WordNet database files (Debian ``wordnet-base``,
``/usr/share/wordnet/data.{noun,verb,adj,adv}``) into synsets with their lemmas, pointers,
definition and example sentences.

Two uses: glosses and examples as modern English prose for the training corpus
(:func:`wordnet_source`), and concept categories for the meaning probe (:func:`category_members`:
the lemmas of every hyponym or instance below a root synset, e.g. the countries below
"country, state, land").

A fixed tenth of the synsets is *held out* (:func:`is_heldout`, by a hash of the synset's offset
and part of speech): the corpus source leaves them out and the meaning probe reads its sentences
from them only, so no recipe trained on the WordNet source has seen the probe's text.

The file format is documented in ``wndb(5WN)``: one synset per line, ``offset lex_filenum
ss_type w_cnt word lex_id ... p_cnt [pointer_symbol offset pos source/target]... | gloss``; the
licence header lines start with two spaces.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
LICENCE = (
    "WordNet 3.0 licence (Princeton University; permissive, attribution): "
    "see /usr/share/doc/wordnet-base/copyright"
)
ORIGIN = "debian:wordnet-base"
HELDOUT_MOD = 10  # one synset in ten is held out for the meaning probe


class WordNetError(ValueError):
    """WordNet files missing or malformed; the message says what to do."""


@dataclass
class Synset:
    """One WordNet synset: ``offset`` (byte offset in its data file) and ``pos`` ('n', 'v', 'a',
    's', 'r') identify it; ``lemmas`` with spaces for underscores, in the file's order;
    ``pointers`` as (symbol, offset, pos); ``definition`` and ``examples`` split from the gloss."""

    offset: int
    pos: str
    lemmas: list[str]
    pointers: list[tuple[str, int, str]] = field(default_factory=list)
    definition: str = ""
    examples: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, str]:
        return (self.offset, "a" if self.pos == "s" else self.pos)


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """``'a city in France; "we went to Paris"; "..."'`` -> (definition, [examples])."""
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip()]
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return definition, examples


def parse_line(line: str) -> Synset | None:
    """One data-file line -> Synset, or None for a licence header line."""
    if not line or line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    try:
        offset, pos, n_words = int(f[0]), f[2], int(f[3], 16)
        lemmas = [re.sub(r"\(\w+\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
        k = 4 + 2 * n_words
        n_ptr = int(f[k])
        ptrs = [(f[k + 1 + 4 * j], int(f[k + 2 + 4 * j]), f[k + 3 + 4 * j]) for j in range(n_ptr)]
    except (IndexError, ValueError) as err:
        raise WordNetError(f"malformed WordNet line ({err}): {line[:80]!r}") from err
    definition, examples = split_gloss(gloss.strip())
    return Synset(offset, pos, lemmas, ptrs, definition, examples)


def _dir(root: str | os.PathLike | None) -> Path:
    d = Path(root) if root else Path(os.environ.get("CIRCUIT_ATLAS_WORDNET", WORDNET_DIR))
    if not (d / "data.noun").is_file():
        raise WordNetError(
            f"no WordNet database at {d} (data.noun missing): install the Debian package "
            "(apt-get install wordnet-base) or set CIRCUIT_ATLAS_WORDNET to a folder of data.* "
            "files"
        )
    return d


def read_synsets(
    root: str | os.PathLike | None = None, pos: Iterable[str] = "nvar"
) -> Iterator[Synset]:
    """Every synset of the given parts of speech ('n', 'v', 'a', 'r'), file by file."""
    d = _dir(root)
    for p in pos:
        with (d / f"data.{POS_FILES[p]}").open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                s = parse_line(line.rstrip("\n"))
                if s is not None:
                    yield s


@lru_cache(maxsize=2)
def _nouns(root: str) -> dict[int, Synset]:
    return {s.offset: s for s in read_synsets(root, "n")}


def nouns(root: str | os.PathLike | None = None) -> dict[int, Synset]:
    """All noun synsets by offset (parsed once per process)."""
    return _nouns(str(_dir(root)))


def senses(lemma: str, root: str | os.PathLike | None = None) -> list[int]:
    """Offsets of a noun lemma's synsets in WordNet's sense order (most frequent first), from
    ``index.noun``; [] when the lemma is not a noun."""
    key = lemma.lower().replace(" ", "_") + " "
    with (_dir(root) / "index.noun").open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(key):
                f = line.split()
                n_syn, n_ptr = int(f[2]), int(f[3])
                return [int(o) for o in f[6 + n_ptr : 6 + n_ptr + n_syn]]
    return []


@lru_cache(maxsize=2)
def _first_senses(root: str) -> dict[str, int]:
    out = {}
    with (Path(root) / "index.noun").open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" "):
                continue
            f = line.split()
            n_ptr = int(f[3])
            out[f[0]] = int(f[6 + n_ptr])
    return out


@lru_cache(maxsize=2)
def _modifiers(root: str) -> frozenset[str]:
    """Lemmas (lower case, underscores) that are also adjectives or adverbs."""
    out = set()
    for f in ("index.adj", "index.adv"):
        with (Path(root) / f).open(encoding="utf-8", errors="replace") as fh:
            out |= {line.split(" ", 1)[0] for line in fh if not line.startswith(" ")}
    return frozenset(out)


def hyponym_closure(
    offset: int, root: str | os.PathLike | None = None, *, instances: bool = True
) -> set[int]:
    """The synset and everything below it through hyponym (~) and, with ``instances``,
    instance-hyponym (~i) pointers."""
    syn = nouns(root)
    follow = ("~", "~i") if instances else ("~",)
    seen, todo = set(), [offset]
    while todo:
        o = todo.pop()
        if o in seen:
            continue
        seen.add(o)
        todo += [t for sym, t, p in syn[o].pointers if sym in follow and p == "n"]
    return seen


def category_members(
    roots: Iterable[tuple[str, int]],
    root: str | os.PathLike | None = None,
    *,
    first_sense_only: bool = True,
    max_words: int = 3,
    instances: bool = True,
    first_lemma_only: bool = False,
    nouns_only: bool = False,
) -> list[str]:
    """Lemmas of every synset at or below the roots, each root given as (lemma, sense number
    from 1). With ``first_sense_only`` a lemma counts only if its most frequent noun sense lies
    in the closure ("Turkey" the bird is not a country). ``instances``: follow instance
    pointers (proper names); ``first_lemma_only``: one lemma per synset; ``nouns_only``: leave
    out lemmas that are also adjectives or adverbs ("small", "north"). Lemmas of more than
    ``max_words`` words, with digits or with parentheses are left out; the roots' own lemmas
    too. Sorted."""
    d = str(_dir(root))
    syn = nouns(d)
    first = _first_senses(d)
    closure: set[int] = set()
    root_lemmas: set[str] = set()
    for lemma, sense in roots:
        offs = senses(lemma, d)
        if len(offs) < sense:
            raise WordNetError(f"WordNet has no sense {sense} of {lemma!r}")
        closure |= hyponym_closure(offs[sense - 1], d, instances=instances)
        root_lemmas |= {w.lower() for w in syn[offs[sense - 1]].lemmas}
    out = set()
    for o in closure:
        for w in syn[o].lemmas[:1] if first_lemma_only else syn[o].lemmas:
            if w.lower() in root_lemmas or re.search(r"[\d()]", w) or len(w.split()) > max_words:
                continue
            key = w.lower().replace(" ", "_")
            if first_sense_only and first.get(key) not in closure:
                continue
            if nouns_only and key in _modifiers(d):
                continue
            out.add(w)
    return sorted(out)


def is_heldout(s: Synset) -> bool:
    """Whether a synset belongs to the held-out tenth (fixed: a hash of offset and pos)."""
    off, pos = s.key
    h = hashlib.blake2b(f"{pos}{off:08d}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % HELDOUT_MOD == 0


def sentences(s: Synset) -> list[str]:
    """The synset as prose: "<lemma>: <definition>." (first lemma) and each example sentence."""
    out = []
    if s.definition:
        out.append(f"{s.lemmas[0]}: {s.definition}.")
    out += [e if e[-1] in ".!?" else e + "." for e in s.examples]
    return out


def wordnet_paragraphs(
    root: str | os.PathLike | None = None, *, heldout: bool = False
) -> list[str]:
    """One paragraph per synset (its gloss and examples joined), in file order: the training
    synsets, without any sentence that also belongs to a held-out synset (so the probe's text
    never reaches training), or with ``heldout=True`` the held-out synsets."""
    syns = list(read_synsets(root))
    held = {t for s in syns if is_heldout(s) for t in sentences(s)}
    if heldout:
        return [" ".join(sentences(s)) for s in syns if is_heldout(s)]
    out = []
    for s in syns:
        if not is_heldout(s):
            kept = [t for t in sentences(s) if t not in held]
            if kept:
                out.append(" ".join(kept))
    return out
