"""The main job end to end on a small budget: SmolLM2 cut to 2 layers, a CLT trained for a
few seconds on a local text file, two prompts, the embedded graph store, reports."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tracer.cli import main
from tracer.graph import LOGIT, Graph

CORPUS = """The river ran past the old mill, and the miller's daughter watched the water turn
the wheel. In the spring the fields were green and the lambs ran along the hedges.
The capital of France is Paris. The capital of Spain is Madrid. The opposite of hot is cold.
Once upon a time there was a small fox who lived at the edge of a wood. Every morning it went
down to the stream to drink, and every evening it came back to its den under the oak tree.
def add(a, b):
    return a + b
Twinkle, twinkle, little star, how I wonder what you are. Up above the world so high, like a
diamond in the sky. The sun rose over the hills and the village woke to the sound of bells.
"""


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1
        self.refs += [v for k, v in attrs if k in ("href", "src") and v]


@pytest.mark.slow
def _explore(summary) -> None:
    """The explorer command the demo prints serves the demo's graphs."""
    import shlex
    import urllib.request

    from tracer.cli import build_parser
    from tracer.cli.serve_cmd import build
    from tracer.explorer import ServerThread

    argv = shlex.split(summary["explore"])
    assert argv[:3] == ["circuit-atlas", "serve", "--store"]
    app, store = build(build_parser().parse_args(argv[1:]))
    server = ServerThread(app).start()
    try:
        with urllib.request.urlopen(server.url + "/api/graphs", timeout=60) as r:
            listed = json.loads(r.read())["graphs"]
        assert sorted(g["prompt"] for g in listed) == sorted(g["prompt"] for g in summary["graphs"])
    finally:
        server.stop()
        store.close()


def test_demo_end_to_end(tmp_path, monkeypatch, smollm2_full):
    from graphstore import LocalServer
    from tracer.model import truncate_layers

    home = tmp_path / "home"
    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(home))
    small = truncate_layers(smollm2_full, 2)
    small.hf.save_pretrained(tmp_path / "model")
    small.tokenizer.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    sentences = [x.strip() for x in CORPUS.replace("\n", " ").split(".") if x.strip()]
    rng = random.Random(0)
    paragraphs = [". ".join(rng.sample(sentences, len(sentences))) + "." for _ in range(400)]
    corpus.write_text("\n\n".join(paragraphs))  # distinct paragraphs survive deduplication
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nThe opposite of hot is\n")
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tmp_path / "model"), "--corpus", str(corpus),
            "--features-per-layer", "64", "--train-minutes", "1.5", "--prompts", str(prompts),
            "--out", str(out), "--max-feature-nodes", "300", "--validate-samples", "8"]  # fmt: skip
    try:
        assert main(args) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert len(summary["graphs"]) == 2
        for g in summary["graphs"]:
            html = open(g["report"], encoding="utf-8").read()
            parser = _Refs()
            parser.feed(html)
            svg_name = g["svg"].rsplit("/", 1)[-1]
            assert parser.tags > 50 and any(svg_name in r for r in parser.refs)
            svg = open(g["svg"], encoding="utf-8").read()
            pruned = Graph.load(g["pruned"])
            logits = np.flatnonzero(pruned.kind == LOGIT)
            assert len(logits) >= 1
            for i in logits:  # every logit node is drawn with its probability label
                assert f"p={float(pruned.probability[i]):.3f}" in svg
            assert pruned.transcoder_name == summary["transcoder_identity"]
            doc = json.load(open(g["neuronpedia_json"]))
            assert doc["nodes"] and doc["links"] and doc["metadata"]["prompt"] == g["prompt"]
            assert set(g["validation"]) >= {"spearman", "sufficiency", "necessity"}
        assert summary["queries"], "the canned queries ran against the store"
        assert (out / "reports" / "index.html").exists()
        _explore(summary)
        # A re-run reuses everything: the trained transcoder (same files, untouched, same
        # fingerprint) and both graphs (same files, not rewritten).
        tc_files = sorted(Path(summary["transcoder"]).glob("*.safetensors"))
        graph_files = [Path(g[k]) for g in summary["graphs"] for k in ("pruned", "full")]
        mtimes = {f: f.stat().st_mtime_ns for f in tc_files + graph_files}
        assert tc_files and main(args) == 0
        again = json.loads((out / "summary.json").read_text())
        assert again["transcoder"] == summary["transcoder"]
        assert again["transcoder_identity"] == summary["transcoder_identity"]
        assert [g["pruned"] for g in again["graphs"]] == [g["pruned"] for g in summary["graphs"]]
        assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
    finally:
        LocalServer(home / "store").stop()
