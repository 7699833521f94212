"""Corpus: reading local files, dedupe, packing, shards + manifest, caching, the SWORD and rst
extractors, the public fetch's idempotence, and bad input."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from transcoders.corpora import corpus as C
from transcoders.corpora.corpus import CorpusError, TokenCorpus, TokenizerSpec


def char_tok(vocab: int = 300) -> TokenizerSpec:
    """One character = one token (id = code point + 3, so 0..2 stay special)."""
    return TokenizerSpec(
        encode=lambda s: [ord(c) + 3 for c in s], bos_id=1, name="chars", vocab_size=vocab
    )


def decode(ids) -> str:
    return "".join(chr(i - 3) for i in ids)


def test_read_local_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("First  para\nstill first.\n\nSecond para.\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "From json."}) + "\n\n" + json.dumps({"other": 1}) + "\n"
    )
    pq.write_table(pa.table({"text": ["From parquet.\n\nTwo."]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    src = C.read_local(tmp_path)
    assert src.paragraphs == [
        "First para still first.",
        "Second para.",
        "From json.",
        "From parquet.",
        "Two.",
    ]


def test_corpus_path_without_text_is_a_clear_error(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    with pytest.raises(CorpusError, match="no text found"):
        C.read_local(tmp_path)
    with pytest.raises(CorpusError, match="does not exist"):
        C.read_local(tmp_path / "missing")


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match="no 'text' column"):
        C.read_local(tmp_path / "c.parquet")


def test_dedupe_across_sources_keeps_first():
    a = C.Source("a", "l", "o", ["Same thing.", "Only a.", "Same thing."])
    b = C.Source("b", "l", "o", ["same thing.", "Only b."])
    assert C.dedupe([a, b]) == 2
    assert a.paragraphs == ["Same thing.", "Only a."]
    assert b.paragraphs == ["Only b."]


def test_pack_sequences_bos_first_and_exact_content():
    seqs = C.pack_sequences(["abcdef", "ghij"], char_tok(), seq_len=5)
    # stream: "abcdef\n\nghij\n\n" (14 tokens) -> 3 rows of 4 tokens after BOS
    assert seqs.shape == (3, 5) and seqs.dtype == np.int32
    assert (seqs[:, 0] == 1).all()
    assert decode(seqs[:, 1:].reshape(-1)) == "abcdef\n\nghij"


def test_pack_rejects_ids_beyond_vocabulary():
    with pytest.raises(CorpusError, match="vocabulary"):
        C.pack_sequences(["zzzz"], char_tok(vocab=50), seq_len=3)


def test_write_token_corpus_shards_manifest_and_seeded_shuffle(tmp_path):
    paras = [f"paragraph number {i} with some words." for i in range(40)]
    src = [C.Source("s", "public domain", "test", list(paras))]
    out = C.write_token_corpus(
        src, char_tok(), tmp_path / "c", seq_len=16, seed=3, shard_size=20, progress=False
    )
    corpus = TokenCorpus.open(out)
    m = corpus.manifest
    assert m["sources"][0]["licence"] == "public domain"
    assert m["n_sequences"] == len(corpus.tokens) and m["n_tokens"] == corpus.tokens.size
    assert len(m["shards"]) == -(-m["n_sequences"] // 20)
    # Same rows as the unshuffled packing, permuted by the seed.
    ref = C.pack_sequences(paras, char_tok(), 16)
    perm = np.random.default_rng(3).permutation(len(ref))
    assert np.array_equal(corpus.tokens, ref[perm])
    train, held = corpus.split(2)
    assert len(held) == 2 and np.array_equal(held, corpus.tokens[-2:])


def test_check_tokenizer_mismatch(tmp_path):
    src = [C.Source("s", "l", "o", ["some text that is long enough to pack."])]
    corpus = TokenCorpus.open(
        C.write_token_corpus(src, char_tok(), tmp_path / "c", seq_len=8, progress=False)
    )
    corpus.check_tokenizer("chars", 300)
    with pytest.raises(CorpusError, match=r"vocabulary 300\) but the model.s vocabulary is 101"):
        corpus.check_tokenizer("chars", 101)
    with pytest.raises(CorpusError, match="re-tokenise"):
        corpus.check_tokenizer("other-tokenizer", 300)


def test_prepare_corpus_is_cached(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"Line {i} of the text." for i in range(30)))
    a = C.prepare_corpus(
        str(tmp_path / "t.txt"), char_tok(), tmp_path / "cache", seq_len=12, progress=False
    )
    stamp = (a.path / C.MANIFEST).stat().st_mtime_ns
    b = C.prepare_corpus(
        str(tmp_path / "t.txt"), char_tok(), tmp_path / "cache", seq_len=12, progress=False
    )
    assert a.path == b.path and (b.path / C.MANIFEST).stat().st_mtime_ns == stamp
    assert np.array_equal(a.tokens, b.tokens)
    with pytest.raises(CorpusError, match="not a token corpus"):
        TokenCorpus.open(tmp_path)


def test_sword_ztext_reader(tmp_path):
    """A two-block zText module built by hand: footnotes dropped, paragraphs split."""
    blocks = [
        '<title type="main">Genesis</title><div sID="g1" type="x-p"/>In the beginning'
        '<note placement="foot">a footnote</note> God created.<div eID="g1" type="x-p"/>'
        '<div sID="g2" type="x-p"/><w lemma="x">The</w> earth &amp; sky.',
        '<chapter n="2" sID="Gen.2"/>Thus the heavens were finished.',
    ]
    for t, texts in (("ot", blocks), ("nt", ["Matthew text."])):
        bzz, bzs = b"", b""
        for text in texts:
            comp = zlib.compress(text.encode())
            bzs += struct.pack("<III", len(bzz), len(comp), len(text.encode()))
            bzz += comp
        (tmp_path / f"{t}.bzs").write_bytes(bzs)
        (tmp_path / f"{t}.bzz").write_bytes(bzz)
    assert C.sword_ztext_paragraphs(tmp_path) == [
        "Genesis",
        "In the beginning God created.",
        "The earth & sky.",
        "Thus the heavens were finished.",
        "Matthew text.",
    ]


def test_strip_rst_keeps_prose():
    rst = (
        "Title\n=====\n\nUse :func:`len` to count, see :ref:`the docs <x>`.\n\n"
        ".. note::\n\n   directive body\n\nExample::\n\n   code here\n\nAfter ``code``.\n"
    )
    text = C._strip_rst(rst)
    assert "Use len to count, see the docs." in text
    assert "directive body" not in text and "code here" not in text
    assert "After code." in text and "=====" not in text


def test_fetch_corpus_is_idempotent(tmp_path, monkeypatch):
    calls = []

    def fake_source(name, raw):
        calls.append(name)
        return [f"{name} paragraph {i} has several words in it." for i in range(20)]

    monkeypatch.setattr(C, "_source_paragraphs", fake_source)
    a = C.fetch_corpus(tmp_path, char_tok(), seq_len=32, progress=False)
    n = len(calls)
    b = C.fetch_corpus(tmp_path, char_tok(), seq_len=32, progress=False)
    assert len(calls) == n == len(C.DEFAULT_PUBLIC)  # second call read nothing
    assert a.path.name.startswith("public-english-")
    assert a.path == b.path and np.array_equal(a.tokens, b.tokens)
    licences = {s["name"]: s["licence"] for s in a.manifest["sources"]}
    assert "public domain" in licences["web-bible"] and "PSF" in licences["python-docs"]
    with pytest.raises(CorpusError, match="unknown public source"):
        C.fetch_corpus(tmp_path, char_tok(), sources=("nope",), progress=False)


def test_wordnet_source_reads_training_glosses(tmp_path, monkeypatch):
    from transcoders.corpora import wordnet

    if not (wordnet.WORDNET_DIR / "data.noun").is_file():
        pytest.fail("WordNet (Debian wordnet-base) is missing: run scripts/setup", pytrace=False)
    root = tmp_path / "root"
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/wordnet").symlink_to(wordnet.WORDNET_DIR)
    got = []
    monkeypatch.setattr(C, "_download_apt", lambda pkg, raw: got.append(pkg) or root)
    paras = C._source_paragraphs("wordnet", tmp_path)
    assert got == ["wordnet-base"] and len(paras) > 100_000
    assert "WordNet 3.0" in C.PUBLIC_SOURCES["wordnet"]["licence"]
    assert "wordnet" not in C.DEFAULT_PUBLIC  # the default corpus (and its cache key) unchanged


def test_parse_mix_shares_and_bad_input(tmp_path):
    known = ("public", "wordnet", "generated")
    assert C.parse_mix("generated:0.5,wordnet:0.3,public:0.2", known) == [
        ("generated", 0.5), ("wordnet", 0.3), ("public", 0.2)
    ]  # fmt: skip
    assert C.parse_mix("public:2,wordnet:2", known) == [("public", 0.5), ("wordnet", 0.5)]
    assert C.parse_mix("wordnet", known) == [("wordnet", 1.0)]
    (tmp_path / "t.txt").write_text("x")
    assert C.parse_mix(f"{tmp_path / 't.txt'}:1,public:3", known)[1] == ("public", 0.75)
    with pytest.raises(CorpusError, match="unknown corpus source 'bible' in .*known sources are"):
        C.parse_mix("bible:0.5,public:0.5", known)
    for bad in ("public:abc", "public:-1", "public:0", "public:", "public:inf"):
        with pytest.raises(CorpusError, match="is not a positive number"):
            C.parse_mix(bad + ",wordnet:0.5", known)
    with pytest.raises(CorpusError, match="appears twice"):
        C.parse_mix("public:1,public:2", known)
    with pytest.raises(CorpusError, match="empty part"):
        C.parse_mix("public:1,,wordnet:1", known)


def test_mix_corpora_draws_the_shares_without_repeats(tmp_path):
    tok = char_tok()
    a = C.write_token_corpus(
        [C.Source("a", "A-licence", "here", [f"alpha {i:04d} ." for i in range(400)])],
        tok, tmp_path / "a", seq_len=16, progress=False,
    )  # fmt: skip
    b = C.write_token_corpus(
        [C.Source("b", "B-licence", "there", [f"beta {i:04d} ." for i in range(100)])],
        tok, tmp_path / "b", seq_len=16, progress=False,
    )  # fmt: skip
    ca, cb = TokenCorpus.open(a), TokenCorpus.open(b)
    for c in (ca, cb):  # every source row is distinct, so a repeated row would show
        assert len(set(map(tuple, c.tokens.tolist()))) == len(c.tokens)
    mixed = C.mix_corpora([("a", ca, 0.75), ("b", cb, 0.25)], tmp_path / "mix")
    rows = [decode(r[1:]) for r in mixed.tokens]
    from_b = [r for r in rows if r in {decode(x[1:]) for x in cb.tokens}]
    # b is the scarcer source (its rows / its share): used whole, a fills three quarters.
    assert len(from_b) == len(cb.tokens) and len(rows) == 4 * len(cb.tokens)
    assert len(set(map(tuple, mixed.tokens.tolist()))) == len(rows)  # no row twice
    assert {s["licence"] for s in mixed.manifest["sources"]} == {"A-licence", "B-licence"}
    assert [p["share"] for p in mixed.manifest["mix"]] == [0.75, 0.25]
    again = C.mix_corpora([("a", ca, 0.75), ("b", cb, 0.25)], tmp_path / "mix")
    assert again.path == mixed.path and np.array_equal(again.tokens, mixed.tokens)
    c = C.write_token_corpus(
        [C.Source("c", "C", "x", ["gamma " * 40])], tok, tmp_path / "c", seq_len=8, progress=False
    )
    with pytest.raises(CorpusError, match="seq_len"):
        C.mix_corpora([("a", ca, 0.5), ("c", TokenCorpus.open(c), 0.5)], tmp_path / "mix")
