"""``circuit-atlas trace --prompts FILE --store`` under ``torchrun --nproc_per_node 2`` on the
CPU: SmolLM2 cut to 2 layers, a random CLT, one managed ArcadeDB server (started by rank 0).

Checks every prompt is traced exactly once, the stored graphs equal a one-process run's, a job
whose rank 1 dies part-way (with rank 0 caught in the middle of a graph write) re-runs to the
same store with nothing lost or duplicated, bad prompts fail with their reason while the rest
go on, and an unreachable store stops every rank before any tracing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import save_small_smollm2

from graphstore import GraphStore, LocalServer, graph_id
from graphstore.server import free_port
from tracer.cli import main
from tracer.graph import Graph

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "The opposite of hot is",
    "Roses are red, violets are",
    "The cat sat on the",
]
LONG = " ".join(["a"] * 9000)  # > 8192 tokens: longer than the model's context


def _prompt_file(path: Path) -> Path:
    lines = [
        "# five prompts, a blank line, an empty JSONL prompt, a repeat and an over-long line",
        PROMPTS[0],
        PROMPTS[1],
        "",
        json.dumps({"prompt": ""}),
        PROMPTS[2],
        PROMPTS[0],
        LONG,
        PROMPTS[3],
        PROMPTS[4],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _torchrun(script: list[str], args: list[str], env: dict, timeout: float = 300):
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", *script, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _stored(store: GraphStore) -> dict:
    """Every (:Graph) in the store, complete or not: id -> complete; and the count of nodes."""
    graphs = store.cypher("MATCH (g:Graph) RETURN g.id AS id, g.complete AS c").rows
    ids = [g for g, _ in graphs]
    assert len(ids) == len(set(ids)), "a graph is stored twice"
    nodes = store.cypher("MATCH (n:Node) RETURN count(n) AS c").rows[0][0]
    return {"graphs": dict(graphs), "nodes": nodes}


def _assert_store_matches(store: GraphStore, reference: dict[str, Graph]) -> None:
    state = _stored(store)
    assert state["graphs"] == {gid: True for gid in reference}, "missing, extra or incomplete"
    assert state["nodes"] == sum(g.n_nodes for g in reference.values())
    for gid, ref in reference.items():
        got = store.load(gid)
        for name in ("kind", "layer", "position", "feature", "source", "target"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
        np.testing.assert_allclose(got.weight, ref.weight, rtol=1e-5, atol=1e-7)
        assert got.prompt == ref.prompt


@pytest.mark.slow
def test_trace_under_torchrun(smollm2_full, tmp_path, monkeypatch):
    model, clt = save_small_smollm2(smollm2_full, tmp_path)
    prompts = _prompt_file(tmp_path / "prompts.txt")
    home = tmp_path / "home"
    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(home))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CRASH_DIR": str(tmp_path)}
    common = ["--prompts", str(prompts), "--model", str(model), "--transcoders", str(clt)]

    # The one-process reference (no store), with the ranks' one torch thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["trace", *common, "--out", str(tmp_path / "ref"),
                   "--summary", str(tmp_path / "ref.json")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 1  # two prompts fail
    ref_summary = json.loads((tmp_path / "ref.json").read_text())
    reference = {}
    for r in ref_summary["results"]:
        if r["status"] == "traced":
            g = Graph.load(r["pruned_path"])
            reference[graph_id(g)] = g
    assert sorted(g.prompt for g in reference.values()) == sorted(PROMPTS)

    # A store that cannot be reached: a clear error from rank 0, every rank stops, nothing traced.
    bad = _torchrun(["-m", "tracer"], ["trace", *common, "--out", str(tmp_path / "none"),
                    "--store-uri", f"bolt://127.0.0.1:{free_port()}"], env)  # fmt: skip
    assert bad.returncode != 0
    assert "cannot reach a graph server at bolt://127.0.0.1" in bad.stderr
    assert not (tmp_path / "none").exists()

    try:
        # Two ranks, the managed store: every prompt traced once, by one rank.
        out = tmp_path / "a"
        run = _torchrun(["-m", "tracer"], ["trace", *common, "--out", str(out), "--store",
                        "--summary", str(tmp_path / "a.json")], env)  # fmt: skip
        assert run.returncode != 0  # the two bad prompts fail: exit status 1
        s = json.loads((tmp_path / "a.json").read_text())
        assert "failed: prompt #3 '': empty prompt" in run.stderr, run.stderr[-3000:]
        assert f"failed: prompt #6 '{LONG[:20]}" in run.stderr and "9001 tokens" in run.stderr
        by_status = {}
        for r in s["results"]:
            by_status.setdefault(r["status"], []).append(r)
        assert [r["index"] for r in s["results"]] == list(range(8))
        assert sorted(r["prompt"] for r in by_status["traced"]) == sorted(PROMPTS)
        assert len(by_status["failed"]) == 2 and [r["index"] for r in by_status["duplicate"]] == [4]
        assert {r["rank"] for r in by_status["traced"]} == {0, 1}
        assert s["traced"] == 5 and s["failed"] == 2 and s["skipped"] == 1 and s["world_size"] == 2
        assert len(list(out.glob("*.parquet"))) == 2 * len(PROMPTS)
        assert all(r["stored"] is True for r in by_status["traced"])
        with GraphStore() as store:
            _assert_store_matches(store, reference)
            for gid in list(reference):  # empty the store for the crash run
                store.delete(gid)

        # Rank 1 dies after its first graph while rank 0 is in the middle of writing one.
        out = tmp_path / "b"
        crash = _torchrun([str(HERE / "crash_rank.py")], ["trace", *common, "--out", str(out),
                          "--store"], env)  # fmt: skip
        assert crash.returncode != 0 and (tmp_path / "mid-write").exists()
        before = {p.name for p in out.glob("*.parquet")}
        with GraphStore() as store:
            state = _stored(store)
        assert list(state["graphs"].values()).count(False) == 1, state  # the half-written one
        assert len(before) < 2 * len(PROMPTS)

        # The re-run traces only what is missing and ends with the same store.
        rerun = _torchrun(["-m", "tracer"], ["trace", *common, "--out", str(out), "--store",
                          "--summary", str(tmp_path / "c.json")], env)  # fmt: skip
        assert rerun.returncode != 0, rerun.stderr[-3000:]  # the bad prompts again
        s = json.loads((tmp_path / "c.json").read_text())
        traced = [r for r in s["results"] if r["status"] == "traced"]
        cached = [r for r in s["results"] if r["status"] == "cached"]
        assert len(traced) + len(cached) == len(PROMPTS) and cached
        assert not {Path(r["pruned_path"]).name for r in traced} & before  # none traced twice
        assert {Path(r["pruned_path"]).name for r in cached} <= before
        assert all(r["stored"] is True for r in traced + cached)
        with GraphStore() as store:
            _assert_store_matches(store, reference)
    finally:
        LocalServer(home / "store").stop()
