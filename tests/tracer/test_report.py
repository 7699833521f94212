"""HTML reports: structure, working in-page links, feature cards, validation, index page, CLI
errors, and the page opened in a real headless browser (Debian chromium)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from report_fixtures import LOGITS, PROMPT_TOKENS, make_feature_dict, make_graph

from tracer.cli import main as cli_main
from tracer.graph import FEATURE, GraphFormatError
from tracer.reports.report import QueryTable, ReportError, write_index, write_report

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class _Page(HTMLParser):
    """Collects ids, in-page links, external references and text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.local_links: list[str] = []
        self.hrefs: list[str] = []
        self.external: list[str] = []
        self.tags: dict[str, int] = {}
        self.stack: list[str] = []
        self.rows: dict[str, list[str]] = {}  # node-table row id -> its text
        self._row: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("href", "xlink:href"):
            if key in a:
                (self.local_links if a[key].startswith("#") else self.hrefs).append(a[key])
        if tag in ("script", "img", "iframe") and a.get("src"):
            self.external.append(a["src"])
        if tag == "link":
            self.external.append(a.get("href", ""))
        if tag == "tr" and a.get("id", "").startswith("node-"):
            self._row = a["id"]
            self.rows[self._row] = []

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row:
            self.rows[self._row].append(data)


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    g = make_graph(n_layers=5, n_features=30)
    files = write_report(g, out, features=make_feature_dict(g), name="dallas")
    return g, files


def test_files_written_and_html_contains_the_svg(report):
    g, files = report
    assert files.html.name == "dallas.html"
    for p in (files.svg, files.png, files.json):
        assert p.exists() and p.stat().st_size > 1000
    page = _parse(files.html)
    assert page.tags.get("svg", 0) >= 1 and page.tags.get("table", 0) >= 4
    html_text = files.html.read_text(encoding="utf-8")
    # the rendered graph is inlined (its node groups are in the page) and the files are linked
    assert "<?xml" not in html_text and "<!DOCTYPE svg" not in html_text
    svg_text = files.svg.read_text()
    svg_ids = {html.unescape(i) for i in re.findall(r'<g id="([^"]+)" class="node"', svg_text)}
    svg_ids = {i for i in svg_ids if i.startswith("g-")}
    assert len(svg_ids) == g.n_nodes
    assert svg_ids and svg_ids <= set(page.ids)
    assert {"dallas.svg", "dallas.png", "dallas.json"} <= set(page.hrefs)
    # self-contained: nothing loaded from elsewhere
    assert page.external == []
    text = "".join(page.text)
    for tok in PROMPT_TOKENS:
        assert tok in text
    for logit_text, _, _ in LOGITS:
        assert logit_text in text


def test_every_in_page_link_resolves_and_rows_link_their_neighbours(report):
    g, files = report
    page = _parse(files.html)
    ids = set(page.ids)
    assert len(ids) == len(page.ids), "duplicate ids"
    missing = [link for link in page.local_links if link[1:] not in ids]
    assert missing == []
    # one row per node, and each row lists its strongest inputs as links to their rows
    assert set(page.rows) == {f"node-{g.node_id(i)}" for i in range(g.n_nodes)}
    html_text = files.html.read_text(encoding="utf-8")
    f0 = int(np.flatnonzero(g.kind == FEATURE)[0])
    src = g.source[g.target == f0]
    w = g.weight[g.target == f0]
    strongest = int(src[np.argmax(np.abs(w))])
    row = re.search(rf"<tr id='node-{g.node_id(f0)}'.*?</tr>", html_text).group(0)
    assert f'href="#node-{g.node_id(strongest)}"' in row
    # the graph's nodes link to the rows too
    assert f"#node-{g.node_id(f0)}" in page.local_links


def test_feature_cards_show_contexts_histogram_and_promoted_tokens(report):
    g, files = report
    html_text = files.html.read_text(encoding="utf-8")
    feats = np.flatnonzero(g.kind == FEATURE)
    with_info = feats[0]  # make_feature_dict covers every other feature, starting at the first
    card_id = f"feature-{int(g.layer[with_info])}-{int(g.feature[with_info])}"
    card = re.search(rf"<div class='card' id='{card_id}'>.*?</div>", html_text, re.S).group(0)
    assert "Promotes" in card and "Austin" in card
    assert "<svg class='hist'" in card and card.count("<rect") == 10
    assert "<ol class='contexts'>" in card and "Houston" in card
    assert "&lt;b&gt;" in card  # context text is escaped, not interpreted
    # the red marker sits at this prompt's activation on the histogram's 0..10 axis
    x = float(re.search(r"<line class='mark' x1='([\d.]+)'", card).group(1))
    assert x == pytest.approx(float(g.activation[with_info]) / 10 * 280, abs=0.06)


def test_validation_scores_and_parameters(report):
    g, files = report
    page = _parse(files.html)
    text = " ".join(page.text)
    for key in ("spearman", "sign_agreement", "sufficiency", "necessity", "replacement",
                "completeness", "node_threshold", "edge_threshold"):  # fmt: skip
        assert key in text, key
    node = g.extra["validation"]["nodes"][0]["node"]
    assert f"#node-{node}" in page.local_links


def test_report_without_features_or_influence(tmp_path):
    g = make_graph(influence=False, validation=False)
    files = write_report(g, tmp_path, name="plain")
    html_text = files.html.read_text(encoding="utf-8")
    assert "No feature contexts were given" in html_text
    assert "influence on the logits (computed for this report)" in html_text
    assert "No validation results" in html_text
    page = _parse(files.html)
    assert all(link[1:] in set(page.ids) for link in page.local_links)


def test_supernodes_and_swaps_sections(tmp_path):
    g = make_graph(n_layers=5, n_features=30)
    feats = [int(i) for i in np.flatnonzero(g.kind == FEATURE)]

    def members(nodes):
        return [[int(g.layer[i]), int(g.position[i]), int(g.feature[i])] for i in nodes]

    checked = {"observed": -1.25, "predicted": -1.5, "agreement": 0.9091, "n_random": 8,
               "random_mean_agreement": 0.4375, "effect_rank": 0.875, "seed": 0}  # fmt: skip
    g.extra["supernodes"] = [
        {"id": "s0", "name": "→ Austin | on Texas", "nodes": feats[:3],
         "members": members(feats[:3]), "influence": 0.5, "cohesion": 0.625,
         "validation": checked},
        {"id": "s1", "name": "L2/F7, L3/F9", "nodes": feats[3:5], "members": members(feats[3:5]),
         "influence": 0.25, "cohesion": 0.5, "validation": None},
    ]  # fmt: skip
    g.extra["supernode_params"] = {"signals": ["decoder", "edges"]}
    g.extra["swaps"] = [{
        "prompt": g.prompt, "other_prompt": "The capital of California is", "mode": "live",
        "removed": members(feats[:3]), "inserted": [[1, 2, 5, 3.5]],
        "top_before": [[" Austin", 7, 0.625]], "top_after": [[" Sacramento", 9, 0.5]],
        "continuation_after": " Sacramento, the", "moved": True,
        "label": {"remove": ["s0"], "insert": ["s2"], "remove_names": ["→ Austin | on Texas"],
                  "insert_names": ["→ Sacramento"]},
    }]  # fmt: skip
    files = write_report(g, tmp_path, name="sn")
    html_text = files.html.read_text(encoding="utf-8")
    page = _parse(files.html)
    assert {"supernodes", "swaps"} <= set(page.ids)
    assert "#supernodes" in page.local_links and "#swaps" in page.local_links
    section = re.search(r"<section id='supernodes'>.*?</section>", html_text, re.S).group(0)
    rows = re.findall(r"<tr><td>(s\d)</td>(.*?)</tr>", section, re.S)
    assert [r[0] for r in rows] == ["s0", "s1"]
    for (_, row), sn in zip(rows, g.extra["supernodes"], strict=True):
        assert html.escape(sn["name"], quote=True) in row
        # each member links to its row of the node table
        linked = re.findall(r'href="#node-([^"]+)"', row)
        assert linked == [g.node_id(i) for i in sn["nodes"]]
    cells = re.findall(r"<td>([^<]*)</td>", rows[0][1])
    assert cells[-5:] == ["-1.25", "-1.5", "0.9091", "0.4375", "0.875"]
    assert re.findall(r"<td>([^<]*)</td>", rows[1][1])[-5:] == [""] * 5
    assert "beside 8 random groups" in section and "decoder, edges" in section
    swaps = re.search(r"<section id='swaps'>.*?</section>", html_text, re.S).group(0)
    assert "→ Austin | on Texas → → Sacramento" in html.unescape(swaps)
    assert "Sacramento, the" in swaps and "The capital of California is" in swaps
    assert all(link[1:] in set(page.ids) for link in page.local_links)
    # Without them, neither section nor its link.
    plain = write_report(make_graph(n_layers=5, n_features=30), tmp_path, name="plain")
    text = plain.html.read_text(encoding="utf-8")
    assert "id='supernodes'" not in text and "#supernodes" not in text and "#swaps" not in text


class _StoreResult:
    """Shaped like the graph store's query results: ``columns`` and ``rows``."""

    def __init__(self, columns, rows):
        self.columns, self.rows = columns, rows


def test_index_page_lists_prompts_and_query_tables(tmp_path, report):
    _, files = report
    g2 = make_graph(seed=3)
    g2.prompt = "The opposite of hot is"
    files2 = write_report(g2, tmp_path, name="hot")
    queries = {
        "Recurring features": [
            {"feature": "L3/F17", "prompts": 12},
            {"feature": "L1/F2", "prompts": 9},
        ],
        "Paths": QueryTable("Paths", ["from", "to", "weight"], [["'Dallas'", "' Austin'", 1.5]]),
        "Empty": {"columns": ["a"], "rows": []},
        "Store result": _StoreResult(["graph", "shared"], [["g-17", 4]]),
    }
    index = write_index(tmp_path, [files, files2], queries)
    page = _parse(index)
    text = " ".join(page.text)
    assert "Recurring features" in text and "L3/F17" in text and "L1/F2" in text
    assert "Paths" in text and "(no rows)" in text and "g-17" in text
    assert "The opposite of hot is" in text and "Dallas" in text
    assert "hot.html" in page.hrefs
    # a report in another folder is linked by an absolute file URI
    assert any(h.endswith("/dallas.html") for h in page.hrefs)
    assert all(link[1:] in set(page.ids) for link in page.local_links)
    with pytest.raises(ReportError, match="list of row dicts"):
        write_index(tmp_path, [files], {"bad": 42})


def test_unwritable_output_directory_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ReportError, match=r"cannot write reports to .*--out"):
        write_report(make_graph(), blocker / "reports")
    graph_file = make_graph().save(tmp_path / "g.parquet")
    rc = cli_main(["report", str(graph_file), "--out", str(blocker / "reports")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write reports to" in err and "Traceback" not in err


def test_newer_graph_format_is_a_clear_error(tmp_path, capsys):
    path = make_graph().save(tmp_path / "g.parquet")
    table = pq.read_table(path)
    head = json.loads(table.schema.metadata[b"circuit_atlas"])
    head["format_version"] = 99
    pq.write_table(table.replace_schema_metadata({b"circuit_atlas": json.dumps(head)}), path)
    from tracer.graph import Graph

    with pytest.raises(GraphFormatError, match="version 99"):
        Graph.load(path)
    out = tmp_path / "out"
    rc = cli_main(["report", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "version 99" in err and "upgrade circuit-atlas" in err
    assert not list(out.glob("*.html"))


def test_cli_writes_reports_and_index(tmp_path, capsys):
    a = make_graph().save(tmp_path / "a.parquet")
    g = make_graph(seed=5)
    g.prompt = "The opposite of hot is"
    b = g.save(tmp_path / "sub" / "a.parquet")  # same stem: gets a numbered name
    feats = tmp_path / "features.json"
    feats.write_text(json.dumps(make_feature_dict(g)))
    out = tmp_path / "out"
    rc = cli_main(["report", str(a), str(b), "--out", str(out), "--features", str(feats),
                   "--no-png", "--scan", "smollm2-135m"])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a-2.html", "a-2.json", "a-2.svg", "a.html", "a.json", "a.svg",
                     "index.html"]  # fmt: skip
    assert "Feature information from" in (out / "a-2.html").read_text()
    assert json.loads((out / "a.json").read_text())["metadata"]["scan"] == "smollm2-135m"
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed and str(out / "a.html") in printed


def test_cli_missing_feature_file_is_a_clear_error(tmp_path, capsys):
    a = make_graph().save(tmp_path / "a.parquet")
    rc = cli_main(["report", str(a), "--out", str(tmp_path), "--features", str(tmp_path / "x")])
    assert rc == 2 and "feature information file" in capsys.readouterr().err


# --- the real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _console_lines(stderr: str) -> list[str]:
    """Every page console message (chromium logs console.* and uncaught errors as CONSOLE)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/setup "
                    "installs it; apt-get install -y chromium)")  # fmt: skip
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    g, files = report
    # The console check must be able to fail: a page with an error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFn();</script></body></html>")
    probe = _chromium(["--dump-dom", bad.as_uri()], tmp_path / "p0")
    assert any("undefinedFn" in line for line in _console_lines(probe.stderr)), probe.stderr

    run = _chromium(["--dump-dom", files.html.as_uri()], tmp_path / "p1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_lines(run.stderr) == []
    dom = run.stdout
    assert "<svg" in dom and f"node-{g.node_id(0)}" in dom and "Austin" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    shot.unlink(missing_ok=True)
    run = _chromium([f"--screenshot={shot}", "--window-size=1400,1000", files.html.as_uri()],
                    tmp_path / "p2")  # fmt: skip
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert _console_lines(run.stderr) == []
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (1000, 1400, 3)
    assert img.std() > 20  # not a blank page
    r, gr, b = img[..., 0], img[..., 1], img[..., 2]
    # The graph is on screen: red (negative) edges appear only in the picture above the fold.
    red = (r > 150) & (r - b > 60) & (r - gr > 60)
    blue = (b > 120) & (b - r > 60)
    assert red.sum() > 300 and blue.sum() > 300, (red.sum(), blue.sum())
    # and the feature/graph nodes (orange fill #f6c98e) are visible
    orange = (np.abs(r - 0xF6) < 6) & (np.abs(gr - 0xC9) < 6) & (np.abs(b - 0x8E) < 6)
    assert orange.sum() > 500

    # the index page too
    index = write_index(files.html.parent, [files], {"q": [{"feature": "L1/F2", "prompts": 3}]})
    run = _chromium(["--dump-dom", index.as_uri()], tmp_path / "p3")
    assert run.returncode == 0 and _console_lines(run.stderr) == []
    assert "dallas.html" in run.stdout and "L1/F2" in run.stdout


# --- a real graph ----------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_a_pruned_smollm2_graph(smollm2, tmp_path):
    """Attribute on SmolLM2 (4 layers) with a random CLT, prune, save, and report through the
    CLI: the tokenizer spells the logits, links resolve, the JSON passes the format check."""
    import torch
    from model_fixtures import make_random_clt

    from tracer.attribution import attribute
    from tracer.prune import prune
    from tracer.replacement import ReplacementModel
    from tracer.reports.neuronpedia import check_document

    clt = make_random_clt(4, 576, 64, seed=1)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    prompt = "The capital of the state containing Dallas is"
    graph = attribute(ReplacementModel(smollm2, clt), prompt, progress=False, max_n_logits=3)
    circuit = prune(graph)
    path = circuit.save(tmp_path / "dallas.parquet")
    out = tmp_path / "out"
    assert cli_main(["report", str(path), "--out", str(out), "--model", "smollm2"]) == 0
    page = _parse(out / "dallas.html")
    assert all(link[1:] in set(page.ids) for link in page.local_links)
    assert len(page.rows) == circuit.n_nodes
    text = " ".join(page.text)
    logits = np.flatnonzero(circuit.kind == 3)
    for i in logits:
        assert smollm2.decode([int(circuit.feature[i])]) in text
    assert f"pruned from {graph.n_nodes:,} nodes" in text
    doc = json.loads((out / "dallas.json").read_text())
    check_document(doc)
    assert len(doc["nodes"]) == circuit.n_nodes and len(doc["links"]) == circuit.n_edges
    svg = (out / "dallas.svg").read_text()
    for tok in smollm2.token_strings(smollm2.tokenize(prompt))[1:]:
        assert html.escape(tok.strip()) in svg


def test_report_of_a_graph_without_features_or_edges(tmp_path):
    """A circuit pruned down to tokens and logits still gives a complete, linked report."""
    g = make_graph()
    keep = (g.kind == 2) | (g.kind == 3)
    bare = g.subgraph(keep, np.zeros(g.n_edges, dtype=bool))
    assert bare.n_edges == 0 and bare.count("feature") == 0
    assert bare.extra["influence"] == list(np.asarray(g.extra["influence"])[keep])
    files = write_report(bare, tmp_path, name="bare")
    page = _parse(files.html)
    assert len(page.rows) == bare.n_nodes
    assert all(link[1:] in set(page.ids) for link in page.local_links)
    assert json.loads(files.json.read_text())["links"] == []


def _diagram_edges(html_text: str) -> dict[tuple[str, str], tuple[float, int]]:
    section = re.search(r"<section id='subgraph'>.*?</section>", html_text, re.S).group(0)
    return {
        (html.unescape(s), html.unescape(t)): (float(w), int(n))
        for s, t, w, n in re.findall(
            r'<g class="diagram-edge" data-source="([^"]*)" data-target="([^"]*)" '
            r'data-weight="([^"]*)" data-n="(\d+)">',
            section,
        )
    }


def _unit_sums(g, groups: dict[str, list[int]]) -> dict[tuple[str, str], tuple[float, int]]:
    """Independent of tracer.subgraph: for each ordered pair of units, the sum of the graph's
    edge weights from a member of one to a member of the other, and their count."""
    out = {}
    for a, ma in groups.items():
        for b, mb in groups.items():
            if a == b:
                continue
            sel = np.isin(g.source, ma) & np.isin(g.target, mb)
            if sel.any():
                out[(a, b)] = (float(g.weight[sel].astype(np.float64).sum()), int(sel.sum()))
    return out


def test_subgraph_diagram_of_saved_pins_and_automatic_supernodes(tmp_path):
    from tracer.reports.neuronpedia import np_node_id
    from tracer.subgraph import Subgraph, Supernode

    g = make_graph(n_layers=5, n_features=30)
    feats = [int(i) for i in np.flatnonzero(g.kind == FEATURE)]
    # a feature pair linked by the most edges as one supernode, its neighbours pinned alone
    by_edges = sorted(feats, key=lambda i: -int(((g.source == i) | (g.target == i)).sum()))
    pair, singles = by_edges[:2], by_edges[2:5]
    logit = int(np.flatnonzero(g.kind == 3)[np.argmax(g.probability[g.kind == 3])])
    ids = {i: np_node_id(g, i) for i in [*pair, *singles, logit]}
    sub = Subgraph(
        "mine",
        [ids[i] for i in [*pair, *singles, logit]],
        [Supernode("the pair", [ids[i] for i in pair])],
        {ids[singles[0]]: "one"},
    )
    files = write_report(g, tmp_path, name="saved", subgraph=sub)
    text = files.html.read_text(encoding="utf-8")
    page = _parse(files.html)
    assert "subgraph" in page.ids and "#subgraph" in page.local_links
    assert "the saved subgraph <b>mine</b>" in text
    groups = {"s0": pair, **{ids[i]: [i] for i in [*singles, logit]}}
    want = _unit_sums(g, groups)
    got = _diagram_edges(text)
    assert set(got) == set(want) and len(got) >= 3
    for k, (w, n) in want.items():
        assert got[k][0] == pytest.approx(w, rel=1e-6, abs=1e-9) and got[k][1] == n
    section = re.search(r"<section id='subgraph'>.*?</section>", text, re.S).group(0)
    assert section.count('class="diagram-unit"') == 5  # the supernode, three singles, the logit
    assert ">the pair<" in section and ">one<" in section and "2 nodes" in section
    assert "Subgraph replacement" in section
    # the edge table lists the same edges, strongest first
    table = re.findall(r"<tr><td>[^<]*</td><td>[^<]*</td><td>([^<]*)</td>", section)
    assert len(table) == len(want)
    assert [abs(float(x)) for x in table] == sorted((abs(float(x)) for x in table), reverse=True)

    # automatic supernodes, no saved subgraph: the groups and the top logit
    g.extra["supernodes"] = [
        {"id": "s0", "name": "first", "nodes": feats[:3]},
        {"id": "s1", "name": "second", "nodes": feats[3:6]},
    ]
    files = write_report(g, tmp_path, name="auto")
    text = files.html.read_text(encoding="utf-8")
    assert "automatic supernodes and its top logit" in text
    want = _unit_sums(g, {"s0": feats[:3], "s1": feats[3:6], np_node_id(g, logit): [logit]})
    got = _diagram_edges(text)
    assert set(got) == set(want) and len(want) >= 1
    for k, (w, n) in want.items():
        assert got[k][0] == pytest.approx(w, rel=1e-6, abs=1e-9) and got[k][1] == n
    # neither: no section, no link
    plain = write_report(make_graph(n_layers=5, n_features=30), tmp_path, name="none")
    text = plain.html.read_text(encoding="utf-8")
    assert "id='subgraph'" not in text and "#subgraph" not in text
