"""``circuit-atlas supernodes|contrast|weights|swap`` on a tiny model: what each command writes
to the graph files and to a real ArcadeDB store equals what the Python API computes, and bad
input is one clear line with exit status 2."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from model_fixtures import save_tiny_folder

from graphstore import GraphStore, graph_id
from tracer.cli import main
from tracer.graph import FEATURE, Graph

PROMPTS = ("The capital of France is", "The capital of Germany is")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model folder, its replacement model and the two prompts' pruned graphs
    (``X.parquet``, with ``X.full.parquet`` beside them, as ``trace`` writes them)."""
    from tracer.attribution import attribute
    from tracer.batch import load_replacement
    from tracer.prune import prune

    root = save_tiny_folder(tmp_path_factory.mktemp("xp"))
    rm = load_replacement(str(root / "model"), str(root / "clt"))
    paths = []
    for k, prompt in enumerate(PROMPTS):
        full = attribute(rm, prompt, progress=False)
        full.save(root / f"g{k}.full.parquet")
        paths.append(prune(full).save(root / f"g{k}.parquet"))
    return {"root": root, "rm": rm, "graphs": paths}


def _model(setup) -> list[str]:
    return ["--model", str(setup["root"] / "model"), "--transcoders", str(setup["root"] / "clt")]


def _copy(setup, tmp_path) -> list:
    """Fresh copies of the two graph files (the commands rewrite them)."""
    out = []
    for p in setup["graphs"]:
        for q in (p, p.with_name(p.stem + ".full.parquet")):
            shutil.copy(q, tmp_path / q.name)
        out.append(tmp_path / p.name)
    return out


@pytest.fixture
def store_env(server_auth, monkeypatch):
    """``--store URI`` for the test server (credentials from the environment, as documented)
    and an open GraphStore on it, emptied of graphs."""
    monkeypatch.setenv("CIRCUIT_ATLAS_USER", server_auth["user"])
    monkeypatch.setenv("CIRCUIT_ATLAS_PASSWORD", server_auth["password"])
    monkeypatch.setenv("CIRCUIT_ATLAS_DATABASE", server_auth["database"])
    monkeypatch.delenv("CIRCUIT_ATLAS_URI", raising=False)
    s = GraphStore(server_auth["uri"], server_auth["user"], server_auth["password"],
                   server_auth["database"])  # fmt: skip
    for (gid,) in s.cypher("MATCH (g:Graph) RETURN g.id AS id").rows:
        s.delete(gid)
    yield ["--store", server_auth["uri"]], s
    s.close()


def plain(x):
    """JSON-shaped (tuples as lists), as files and the store hold it."""
    return json.loads(json.dumps(x))


def assert_same(a, b):
    """Equal structures, floats to 1e-6 relative."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and not isinstance(b, bool) and b is not None:
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (a, b)
    else:
        assert a == b


def _python_supernodes(setup, path, tokens=None):
    """What the supernodes command computes, through the Python API."""
    from tracer.analyses.supernode_check import validate_supernodes
    from tracer.analyses.supernodes import corpus_activations, find_supernodes

    rm, g = setup["rm"], Graph.load(path)
    acts = None
    if tokens is not None:
        feats = np.where(g.kind == FEATURE)[0]
        pairs = [(int(g.layer[i]), int(g.feature[i])) for i in feats]
        acts = corpus_activations(rm, tokens, pairs, progress=False)
    found = find_supernodes(g, transcoder=rm.transcoder, activations=acts, min_similarity=0.3)
    validate_supernodes(rm, g, found, n_random=3, seed=0, progress=False)
    return g


def test_supernodes_command_matches_python_and_is_stored(setup, store_env, tmp_path, capsys):
    opt, store = store_env
    a, _ = _copy(setup, tmp_path)
    args = ["supernodes", str(a), *_model(setup), "--corpus", "none", "--min-similarity", "0.3",
            "--n-random", "3", "--quiet", *opt]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    want = _python_supernodes(setup, setup["graphs"][0]).extra["supernodes"]
    assert len(want) >= 2
    got = Graph.load(a).extra["supernodes"]
    assert_same(plain(want), got)
    assert all(s["validation"]["n_random"] == 3 for s in got)
    gid = graph_id(Graph.load(a))
    assert_same(plain(want), store.supernodes(gid))
    # The printed table: one row per supernode, with its name.
    assert f"({len(want)} rows)" in out and want[0]["name"] in out
    # The stored graph is the file's (stored once; the full graph archived beside it).
    assert store.graph_ids() == [gid]
    assert store.load_full(gid).n_nodes == Graph.load(tmp_path / "g0.full.parquet").n_nodes
    # Again on the stored graph by id: the same supernodes replace the old ones.
    assert main(["supernodes", gid, *args[2:]]) == 0
    assert_same(plain(want), store.supernodes(gid))


def test_supernodes_command_with_a_corpus(setup, tmp_path, monkeypatch, capsys):
    """Co-activation over a corpus text file: the same as corpus_activations on its tokens."""
    from tracer.cli.train_cmd import load_corpus
    from tracer.model import LanguageModel

    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(tmp_path / "home"))  # the corpus cache
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    rng = np.random.default_rng(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, 120)) for _ in range(30)))
    a, _ = _copy(setup, tmp_path)
    args = ["supernodes", str(a), *_model(setup), "--corpus", str(text), "--corpus-seqs", "3",
            "--min-similarity", "0.3", "--n-random", "3", "--quiet", "--no-store"]  # fmt: skip
    assert main(args) == 0
    model = LanguageModel.load(setup["root"] / "model")
    tokens = load_corpus(str(text), model).tokens[-3:, :64]  # the tiny model's context
    want = _python_supernodes(setup, setup["graphs"][0], tokens=tokens).extra["supernodes"]
    got = Graph.load(a).extra["supernodes"]
    assert_same(plain(want), got)
    assert Graph.load(a).extra["supernode_params"]["signals"] == [
        "coactivation", "decoder", "edges"]  # fmt: skip


def test_contrast_command(setup, store_env, tmp_path, capsys):
    from tracer.analyses.contrast import contrast

    opt, store = store_env
    a, b = setup["graphs"]
    c = contrast(Graph.load(a), Graph.load(b))
    out = tmp_path / "c"
    assert main(["contrast", str(a), str(b), "--top", "5", "--out", str(out), "--no-store"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(next(out.glob("*.json")).read_text())
    assert_same(plain(c.summary(n=5)), {k: summary[k] for k in c.summary(n=5)})
    assert f"only in a: {len(c.only_in_a)}" in text and "edges that change sign" in text
    diff, want = Graph.load(next(out.glob("*.parquet"))), c.difference_graph()
    for name in ("kind", "layer", "position", "feature", "activation", "source", "target",
                 "weight"):  # fmt: skip
        np.testing.assert_array_equal(getattr(diff, name), getattr(want, name))
    # Graph b by its store id: the same summary.
    gid = store.add(Graph.load(b)).graph_id
    out2 = tmp_path / "c2"
    assert main(["contrast", str(a), gid, "--top", "5", "--out", str(out2), *opt]) == 0
    s2 = json.loads(next(out2.glob("*.json")).read_text())
    assert_same(plain(c.summary(n=5)), {k: s2[k] for k in c.summary(n=5)})


def test_weights_command(setup, store_env, tmp_path, capsys):
    from tracer.analyses.global_weights import GlobalWeights, global_weights

    opt, store = store_env
    rm = setup["rm"]
    name = rm.transcoder.identity.id
    f = tmp_path / "w.parquet"
    args = ["weights", *_model(setup), "--top-k", "4", "--corpus", "none", "--out", str(f),
            "--quiet", *opt]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    want = global_weights(rm.transcoder, rm.model, top_k=4, name=name, progress=False)
    got = GlobalWeights.load(f)
    assert (got.transcoder, got.norm, got.top_k) == (name, "unit", 4)
    for col in ("source_layer", "source_index", "target_layer", "target_index", "weight",
                "rank_in", "rank_out"):  # fmt: skip
        np.testing.assert_array_equal(getattr(got, col), getattr(want, col))
    rows = store.cypher(
        "MATCH (a:Feature {transcoder: $t})-[v:VIRTUAL]->(b:Feature) RETURN a.layer, a.index, "
        "b.layer, b.index, v.weight", {"t": name}, max_rows=0,
    ).rows  # fmt: skip
    stored = {tuple(r[:4]): r[4] for r in rows}
    expect = {
        (int(sl), int(si), int(tl), int(ti)): float(w)
        for sl, si, tl, ti, w in zip(want.source_layer, want.source_index, want.target_layer,
                                     want.target_index, want.weight, strict=True)
    }  # fmt: skip
    assert stored == expect
    k = int(np.argmax(np.abs(want.weight)))
    top = f"L{want.source_layer[k]}/F{want.source_index[k]}"
    assert f"{len(want)} pairs" in text and top in text


def test_swap_command_and_batch(setup, store_env, tmp_path, capsys):
    from tracer.analyses.swap import swap_supernodes

    opt, store = store_env
    a, b = _copy(setup, tmp_path)
    for p in (a, b):
        assert main(["supernodes", str(p), *_model(setup), "--corpus", "none", "--no-check",
                     "--min-similarity", "0.3", "--quiet", "--no-store"]) == 0  # fmt: skip
    ga, gb = Graph.load(a), Graph.load(b)
    rm = setup["rm"]
    want = swap_supernodes(rm, ga, "s0", gb, "s0", max_new_tokens=3).to_dict()
    args = ["swap", str(a), str(b), "--remove", "s0", "--insert", "s0", "--max-new-tokens", "3",
            *_model(setup), *opt]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    saved = Graph.load(a).extra["swaps"]
    assert len(saved) == 1
    for key in ("removed", "inserted", "top_before", "top_after", "continuation_after", "moved"):
        assert_same(plain(want[key]), saved[0][key])
    assert want["continuation_after"] in text and f"moved: {want['moved']}" in text
    gid, oid = graph_id(ga), graph_id(gb)
    rows = store.query("swaps", graph=gid).rows
    assert len(rows) == 1 and json.loads(rows[0][6]) == plain(want["top_after"])
    linked = store.cypher("MATCH (:Swap)-[:SWAP_FROM]->(g:Graph) RETURN g.id").rows
    assert linked == [[oid]]
    # The file's supernodes went to the store with the graph.
    assert [s["id"] for s in store.supernodes(gid)] == [s["id"] for s in ga.extra["supernodes"]]

    # The batch form: one line, another pair of supernodes, results with the graphs.
    batch = tmp_path / "swaps.jsonl"
    batch.write_text(json.dumps({"graph": str(a), "remove": "s1", "other_graph": str(b),
                                 "insert": "s0", "max_new_tokens": 2}) + "\n")  # fmt: skip
    want2 = swap_supernodes(rm, ga, "s1", gb, "s0", max_new_tokens=2).to_dict()
    assert main(["swap", "--batch", str(batch), *_model(setup), "--quiet", *opt]) == 0
    assert "(1 row)" in capsys.readouterr().out
    saved = Graph.load(a).extra["swaps"]
    assert len(saved) == 2
    assert_same(plain(want2["top_after"]), saved[1]["top_after"])
    rows = store.query("swaps", graph=gid).rows
    assert len(rows) == 2
    assert sorted(r[6] for r in rows) == sorted(json.dumps(w["top_after"]) for w in (want, want2))


def test_bad_input_is_one_clear_line(setup, tmp_path, capsys):
    a, b = _copy(setup, tmp_path)
    assert main(["supernodes", str(a), *_model(setup), "--corpus", "none", "--no-check",
                 "--min-similarity", "0.3", "--quiet", "--no-store"]) == 0  # fmt: skip
    capsys.readouterr()
    other_tc = Graph.load(a)
    other_tc.transcoder_name = "another-clt@0123456789abcdef"
    odd = other_tc.save(tmp_path / "odd.parquet")
    model = _model(setup)
    cases = [
        (["contrast", str(a), str(odd), "--no-store", "--out", str(tmp_path / "c")],
         "come from different transcoders"),
        (["supernodes", str(odd), *model, "--corpus", "none", "--no-store"],
         "was traced with transcoder 'another-clt@0123456789abcdef'"),
        (["swap", str(a), str(b), "--remove", "s99", "--insert", "s0", *model, "--no-store"],
         "has no supernode 's99': its supernodes are s0"),
        (["swap", str(a), str(b), "--remove", "s0", "--insert", "s0", *model, "--no-store"],
         "has no supernodes: group it first"),
        (["swap", str(a), str(a), "--insert-feature", "1/31@99", *model, "--no-store"],
         "feature L1/F31@99 is not active in the source prompt"),
        (["swap", str(a), str(a), "--remove-feature", "0/5", *model, "--no-store"],
         "write a feature as L/F@P"),
        (["swap", str(a), *model, "--no-store"], "give GRAPH and OTHER"),
        (["contrast", str(a), str(tmp_path / "missing.parquet"), "--no-store"], "does not exist"),
        (["contrast", str(a), "g0000", "--no-store"], "--no-store leaves no store"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("circuit-atlas: error: "), err
        assert msg in err[0], (argv, err)
