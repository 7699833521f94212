"""The explorer end to end in headless Chromium (Debian's, driven by Playwright): a stored
graph opened, hovered and clicked; three nodes pinned, two grouped into a supernode, saved and
still there after a reload; a feature opened and its link followed to the other graph; an
ablation whose logit table matches tracer.interventions for the same edit; a Cypher query
whose nodes are highlighted. No console errors, every request to the local server, and
screenshots in test-artifacts/explorer/."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from playwright.sync_api import expect

from tracer.graph import FEATURE
from tracer.interventions import FeatureEdit, intervene
from tracer.reports.neuronpedia import np_node_id, read_subgraph
from tracer.steer import generate_batch

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "explorer"


class Tab:
    """A page that records console errors, page errors and every request URL."""

    def __init__(self, browser, base_url: str):
        self.context = browser.new_context(viewport={"width": 1500, "height": 900})
        self.page = self.context.new_page()
        self.base = base_url
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, query: str = ""):
        self.page.goto(self.base + "/" + query)
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def node_xy(self, node_id: str) -> tuple[float, float]:
        return tuple(
            self.js(
                "(id) => window.__explorer.view.screenPos(window.__explorer.index.get(id))", node_id
            )  # fmt: skip
        )

    def click_node(self, node_id: str):
        self.page.mouse.click(*self.node_xy(node_id))

    def shot(self, name: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def close(self):
        self.context.close()


def top_features(graph, k: int) -> list[int]:
    """Indices of the k most influential feature nodes, spread over positions if possible."""
    from tracer.reports.annotate import display_influence

    infl = display_influence(graph)
    feats = np.flatnonzero(graph.kind == FEATURE)
    return [int(i) for i in feats[np.argsort(-infl[feats], kind="stable")][:k]]


def shared_feature(a, b) -> int:
    """A feature node of graph a whose (layer, index) is also a node of graph b."""
    in_b = set(zip(b.layer[b.kind == FEATURE].tolist(), b.feature[b.kind == FEATURE].tolist(),
                   strict=True))  # fmt: skip
    for i in np.flatnonzero(a.kind == FEATURE):
        if (int(a.layer[i]), int(a.feature[i])) in in_b:
            return int(i)
    raise AssertionError("the two test graphs share no feature")


def test_tour(world, browser):
    g, _ = world.graphs[0]
    other, _ = world.graphs[1]
    gid, other_id = world.ids
    tab = Tab(browser, world.url)
    page = tab.page
    tab.open(f"?graph={gid}")
    assert page.locator("#graph-title").inner_text() == g.prompt
    assert page.locator(".graph-item").count() == 2
    tab.shot("01-graph")

    # hover: the tooltip names the node and its strongest input with its weight
    node = top_features(g, 1)[0]
    nid = np_node_id(g, node)
    page.mouse.move(*tab.node_xy(nid))
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    ins = np.flatnonzero(g.target == node)
    strongest = ins[np.argmax(np.abs(g.weight[ins]))]
    assert f"{g.weight[strongest]:.3f}" in tip.inner_text()
    assert f"inputs ({len(ins)})" in tip.inner_text()
    assert tab.js("window.__explorer.view.hover") == node
    tab.shot("02-hover")

    # click: the node tab lists its inputs and outputs with weights
    tab.click_node(nid)
    page.wait_for_selector("#node-title")
    assert page.locator("#tab-node").get_by_text(f"inputs ({len(ins)})").count() == 1
    outs = np.flatnonzero(g.source == node)
    assert page.locator("#tab-node").get_by_text(f"outputs ({len(outs)})").count() == 1

    # pin three nodes (click each in the graph, then "pin")
    pins = [np_node_id(g, i) for i in top_features(g, 3)]
    for p in pins:
        tab.click_node(p)
        page.wait_for_selector("#pin-button")
        page.click("#pin-button")
    page.click("#tabs button[data-tab=subgraph]")
    assert page.locator("#pinned-list .pinned-item").count() == 3
    # group two into a supernode, label the third
    page.check(f"#pinned-list input.pick[data-id='{pins[0]}']")
    page.check(f"#pinned-list input.pick[data-id='{pins[1]}']")
    page.fill("#supernode-label", "top pair")
    page.click("#group-button")
    assert page.locator("#supernode-list .supernode").count() == 1
    page.fill(f"#pinned-list input.label[data-id='{pins[2]}']", "third one")
    page.dispatch_event(f"#pinned-list input.label[data-id='{pins[2]}']", "change")
    page.fill("#subgraph-name", "tour")
    page.click("#save-button")
    page.wait_for_selector("#message.info")
    tab.shot("03-subgraph")
    saved = world.store.load_subgraph(gid, "tour")
    assert saved.pinned == pins
    assert [(s.label, s.members) for s in saved.supernodes] == [("top pair", pins[:2])]
    assert saved.labels == {pins[2]: "third one"}

    # reload: the subgraph is still there
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert "subgraph=tour" in page.url
    page.click("#tabs button[data-tab=subgraph]")
    assert page.locator("#pinned-list .pinned-item").count() == 3
    assert page.locator("#supernode-list input.sn-label").input_value() == "top pair"
    # ... and the Neuronpedia export the page links to carries it in qParams
    href = page.locator("#export-link").get_attribute("href")
    doc = page.request.get(world.url + href).json()
    assert read_subgraph(doc, name="tour") == saved
    tab.shot("04-reloaded")
    # ... and the qParams of a Neuronpedia JSON import back into the page
    doc["qParams"].update(pinnedIds=[pins[2]], supernodes=[])
    page.set_input_files("#import-file", files=[{
        "name": "shared.json", "mimeType": "application/json", "buffer": json.dumps(doc).encode(),
    }])  # fmt: skip
    expect(page.locator("#pinned-list .pinned-item")).to_have_count(1)
    assert page.locator("#supernode-list .supernode").count() == 0

    # a feature shared with the other graph: open it, follow its link
    shared = shared_feature(g, other)
    tab.click_node(np_node_id(g, shared))
    page.click("#feature-button")
    page.wait_for_selector("#feature-title")
    info = world.features.get(int(g.layer[shared]), int(g.feature[shared]))
    panel = page.locator("#tab-feature")
    assert panel.locator(".ctx").count() == len(info.top_contexts) > 0
    assert panel.locator("#feature-histogram rect").count() == len(info.histogram_counts)
    assert panel.locator(".tokens").first.locator("span").count() == len(info.promoted_tokens)
    assert panel.locator(".tokens").nth(1).locator("span").count() == len(info.suppressed_tokens)
    link = panel.locator("a.feature-graph-link")
    assert link.count() == 1
    tab.shot("05-feature")
    link.click()
    page.wait_for_selector(f"body[data-graph='{other_id}']")
    assert page.locator("#graph-title").inner_text() == other.prompt
    sel = tab.js("window.__explorer.view.selected")
    assert (int(other.layer[sel]), int(other.feature[sel])) == (
        int(g.layer[shared]), int(g.feature[shared]))  # fmt: skip

    # ablate the supernode: the logit table equals tracer.interventions for the same edit
    tab.open(f"?graph={gid}&subgraph=tour")
    page.click("#tabs button[data-tab=intervene]")
    page.select_option("#iv-target", "s:0")
    page.select_option("#iv-op", "ablate")
    page.select_option("#iv-mode", "constrained")
    page.click("#iv-run")
    page.wait_for_selector("#logit-table", timeout=60_000)
    tab.shot("06-intervention")
    rows = page.locator("#logit-table tr[data-token]")
    shown = {
        int(rows.nth(k).get_attribute("data-token")): (
            float(rows.nth(k).locator(".logit-before").inner_text()),
            float(rows.nth(k).locator(".logit-after").inner_text()),
        )
        for k in range(rows.count())
    }
    rm = world.rm
    state = rm.record(torch.tensor(g.tokens))
    edits = [FeatureEdit(int(g.layer[i]), int(g.feature[i]), int(g.position[i]), "ablate")
             for i in (g_index(g, pins[0]), g_index(g, pins[1]))]  # fmt: skip
    after = intervene(rm, state, edits, "constrained").logits[-1]
    before = state.logits[-1]
    assert len(shown) >= 10
    for tok, (b, a) in shown.items():
        assert b == pytest.approx(float(before[tok]), abs=2e-4)
        assert a == pytest.approx(float(after[tok]), abs=2e-4)
    assert any(abs(a - b) > 1e-3 for b, a in shown.values()), "the ablation changed nothing"
    # the mode is named beside each result, and the target logit's change and rank are shown
    assert page.locator("#iv-table-mode").inner_text() == "constrained"
    assert page.locator("#iv-cont-mode").inner_text() == "live"
    top = int(np.flatnonzero(g.kind == 3)[np.argmax(g.probability[g.kind == 3])])
    tok = int(g.feature[top])
    delta = float(after[tok]) - float(before[tok])
    change = page.locator("#iv-target-change").inner_text()
    assert f"{float(before[tok]):.3f} → {float(after[tok]):.3f}" in change
    assert f"{delta:+.3f}" in change and "rank 1 → " in change
    base, steered = generate_batch(rm, state.tokens, [[], edits], max_new_tokens=6)
    assert page.locator("#cont-original").text_content() == base.text
    assert page.locator("#cont-steered").text_content() == steered.text

    # a Cypher query: its nodes of this graph are highlighted
    page.click("#tabs button[data-tab=cypher]")
    page.fill(
        "#cypher-text",
        f"MATCH (n:Node {{graph: '{gid}'}}) WHERE n.kind = 'feature' "
        "RETURN n ORDER BY n.activation DESC LIMIT 3",
    )
    page.click("#cypher-run")
    page.wait_for_selector("#cypher-table")
    assert page.locator("#cypher-table tr").count() == 4
    feats = np.flatnonzero(g.kind == FEATURE)
    top3 = {np_node_id(g, int(i)) for i in feats[np.argsort(-g.activation[feats])][:3]}
    lit = tab.js("[...__explorer.view.highlight].map(i => __explorer.graph.nodes.id[i])")
    assert set(lit) == top3
    tab.shot("07-cypher")

    assert tab.errors == []
    outside = [u for u in tab.requests if not u.startswith(world.url + "/")]
    assert outside == [] and len(tab.requests) > 10
    tab.close()


def test_suggested_supernodes(world, browser):
    """Automatic supernodes stored with the graph are offered in the subgraph pane; "use"
    pins their members and groups them under the supernode's name."""
    k = max(range(2), key=lambda j: world.graphs[j][0].count("feature"))  # the bigger circuit
    g, gid = world.graphs[k][0], world.ids[k]
    feats = top_features(g, 3)
    assert len(feats) == 3
    members = [[int(g.layer[i]), int(g.position[i]), int(g.feature[i])] for i in feats]
    world.store.add_supernodes(gid, [{"id": "s0", "name": "→ Paris", "nodes": feats,
                                      "members": members, "influence": 0.5,
                                      "validation": {"agreement": 0.8125}}])  # fmt: skip
    tab = Tab(browser, world.url)
    page = tab.page
    try:
        tab.open(f"?graph={gid}")
        page.click("#tabs button[data-tab=subgraph]")
        item = page.locator("#suggested-list .suggested")
        assert item.count() == 1
        assert "→ Paris" in item.inner_text() and "agreement 0.81" in item.inner_text()
        page.click("#suggested-list button.use-suggested")
        ids = [np_node_id(g, i) for i in sorted(feats)]  # the store keeps members by index
        assert page.locator("#pinned-list .pinned-item").count() == 3
        assert page.locator("#supernode-list input.sn-label").input_value() == "→ Paris"
        assert tab.js("window.__explorer.supernodes") == [{"label": "→ Paris", "members": ids}]
        tab.shot("09-suggested-supernodes")
        assert tab.errors == []
    finally:
        world.store.add_supernodes(gid, [])
        tab.close()


def g_index(g, node_id: str) -> int:
    return next(i for i in range(g.n_nodes) if np_node_id(g, i) == node_id)


def test_bad_input_in_the_page(world, browser):
    gid = world.ids[0]
    tab = Tab(browser, world.url)
    page = tab.page
    # an unknown graph id: a message, and the list still loads
    tab.open("?graph=gdoesnotexist")
    msg = page.locator("#message.error")
    assert "no graph with id 'gdoesnotexist'" in msg.inner_text()
    assert page.locator(".graph-item").count() == 2
    # a malformed subgraph save (a name with a slash)
    tab.open(f"?graph={gid}")
    page.click("#tabs button[data-tab=subgraph]")
    page.fill("#subgraph-name", "bad/name")
    page.click("#save-button")
    assert "is not allowed" in page.locator("#message.error").inner_text()
    assert world.store.subgraphs(gid) == [] or all(
        s["name"] != "bad/name" for s in world.store.subgraphs(gid)
    )
    # an intervention on a node that does not exist
    tab.js("window.__explorer.runIntervention(['9_9_99'], 'ablate', 0, 'constrained')")
    page.wait_for_selector("#message.error")
    assert "node '9_9_99' is not a node" in page.locator("#message.error").inner_text()
    # a write in the console: refused, nothing written
    page.click("#tabs button[data-tab=cypher]")
    page.fill("#cypher-text", "CREATE (x:Intruder {name: 'x'}) RETURN x")
    page.click("#cypher-run")
    expect(page.locator("#cypher-status")).to_have_text("refused")
    assert "read-only" in page.locator("#message.error").inner_text()
    assert world.store.cypher("MATCH (x:Intruder) RETURN count(x) AS c").rows == [[0]]
    tab.shot("08-bad-input")
    # the server keeps serving: the graph opens and draws
    tab.open(f"?graph={gid}")
    assert page.locator("#graph-title").inner_text() == world.graphs[0][0].prompt
    # the only console errors are the browser's notes on the refused requests (4xx)
    assert all("Failed to load resource" in e for e in tab.errors), tab.errors
    tab.close()


# --- the explorer as a reading tool (issue 27) --------------------------------------------------

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
MAX_FEATURES, MAX_EDGES = 100, 150  # the page's readable default
SETTLED = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


@pytest.fixture
def graph550(world):
    """A 550-node graph (graphstore.synthetic's shape, 30 layers, 12 tokens) in the store for
    one test (the other tests' screenshots list the demo graphs only)."""
    from explorer_fixtures import big_graph

    from graphstore import graph_id

    g = big_graph(550, 36_000, seed=3)
    world.store.add(g)
    gid = graph_id(g)
    yield g, gid
    world.store.delete(gid)


def overlaps(boxes) -> list:
    out = []
    for a, b in itertools.combinations(boxes, 2):
        if a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]:
            out.append((a["kind"], a["text"], b["kind"], b["text"]))
    return out


def check_readable_default(tab, g, name: str):
    """The first fit of graph g as the page opens it: tokens labelled inside the canvas, no
    label over another, no node over another, at most the default features and edges, and a
    feature at every node-threshold setting above zero."""
    page = tab.page
    tab.js(SETTLED)
    view = tab.js("""() => { const v = __explorer.view, r = v.base.getBoundingClientRect();
      const shown = [...v.shown.keys()].filter(i => v.shown[i]);
      return {w: r.width, h: r.height, boxes: v.labelBoxes, counts: v.counts,
              focus: v.focusEdges.length, r: v.radiusPx(),
              xy: shown.map(i => [v.sx(i), v.sy(i)])}; }""")
    W, H, boxes = view["w"], view["h"], view["boxes"]
    tokens = [b for b in boxes if b["kind"] == "token"]
    positions = [b for b in boxes if b["kind"] == "position"]
    assert len(tokens) == len(positions) == len(g.tokens)
    for b in tokens + positions:
        assert 0 <= b["x0"] and b["x1"] <= W and 0 <= b["y0"] and b["y1"] <= H, b
    assert sorted(int(b["text"]) for b in positions) == list(range(len(g.tokens)))
    logits = [b for b in boxes if b["kind"] == "logit"]
    assert len(logits) == g.count("logit")
    assert overlaps(boxes) == []  # node labels, logit labels, tokens and positions
    # nodes never drawn on top of each other
    xy, r = np.array(view["xy"]), view["r"]
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    assert d.min() >= 2 * r, f"two nodes {d.min():.2f} px apart, radius {r:.2f}"
    c = view["counts"]
    assert 1 <= c["features"] <= MAX_FEATURES and c["edges"] <= MAX_EDGES
    assert view["focus"] == 0  # no strong edges until a node is hovered, selected or pinned
    assert c["features"] == min(MAX_FEATURES, c["features"])
    tab.shot(f"10-default-{name}")
    # a feature stays at every slider position above zero; more as the slider rises
    counts = []
    for t in [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        page.fill("#max-features", "5000")
        page.locator("#node-threshold").evaluate(
            "(el, t) => { el.value = t; el.dispatchEvent(new Event('input')); }", t
        )
        counts.append(tab.js("__explorer.view.counts.features"))
    assert min(counts) >= 1 and counts == sorted(counts)
    assert counts[-1] == g.count("feature")
    return view


def test_readable_default_demo_graphs(world, browser):
    tab = Tab(browser, world.url)
    try:
        for (g, full), gid in zip(world.graphs, world.ids, strict=True):
            tab.open(f"?graph={gid}")
            check_readable_default(tab, g, gid[:8])
            tab.open(f"?graph={gid}&full=1")  # the unpruned graph: the default prunes it
            view = check_readable_default(tab, full, gid[:8] + "-full")
            assert view["counts"]["features"] < full.count("feature")
        assert tab.errors == []
    finally:
        tab.close()


def test_readable_default_550_nodes(world, browser, graph550):
    g, gid = graph550
    assert g.n_nodes == 550 and g.count("feature") > MAX_FEATURES
    tab = Tab(browser, world.url)
    try:
        tab.open(f"?graph={gid}")
        view = check_readable_default(tab, g, "550")
        assert view["counts"]["features"] == MAX_FEATURES  # the cap binds on this graph
        assert tab.errors == []
    finally:
        tab.close()


def test_france_default_screenshot_and_paths(world, browser):
    """The README's default view of the France circuit; "trace from here" on its top logit
    highlights paths that start at a token node and read as tracer.analyses.paths writes them."""
    from tracer.analyses.paths import paths

    k = next(j for j, (g, _) in enumerate(world.graphs) if "France" in g.prompt)
    g, gid = world.graphs[k][1], world.ids[k]  # the full graph, pruned by the page's default
    tab = Tab(browser, world.url)
    page = tab.page
    try:
        tab.open(f"?graph={gid}&full=1")
        tab.js(SETTLED)
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_IMG / "explorer-default.png"))
        top = int(np.flatnonzero(g.kind == 3)[np.argmax(g.probability[g.kind == 3])])
        tab.click_node(np_node_id(g, top))
        page.click("#trace-button")
        page.wait_for_selector("#path-list .path-item")
        shown = page.locator("#path-list .path-text").all_inner_texts()
        want = paths(g, None, 5, decode=lambda i: world.rm.model.decode([i]))
        assert shown == [p.text(g, lambda i: world.rm.model.decode([i])) for p in want]
        lit = tab.js(
            "__explorer.view.paths.map(p => p.nodes.map(i => __explorer.graph.nodes.id[i]))"
        )
        assert lit == [[np_node_id(g, i) for i in p.nodes] for p in want]
        kinds = tab.js("__explorer.view.paths.map(p => __explorer.graph.nodes.kind[p.nodes[0]])")
        assert set(kinds) == {"token"}
        assert all(ids[-1] == np_node_id(g, top) for ids in lit)
        tab.js(SETTLED)
        tab.shot("11-paths")
        assert tab.errors == []
    finally:
        tab.close()


def test_subgraph_diagram(world, browser):
    """Pinned nodes drawn with the edges between them at the graph's weights; a supernode's
    edges are the sums of its members'; SVG export; the README's screenshot."""
    from tracer.analyses.paths import paths

    k = next(j for j, (g, _) in enumerate(world.graphs) if "France" in g.prompt)
    g, gid = world.graphs[k][1], world.ids[k]  # the full graph
    nodes = top_features(g, 3)
    for p in paths(g, None, 2):
        nodes += [i for i in p.nodes if i not in nodes]
    ids = [np_node_id(g, i) for i in nodes]
    tab = Tab(browser, world.url)
    page = tab.page
    try:
        tab.open(f"?graph={gid}&full=1")
        page.click("#tabs button[data-tab=subgraph]")
        tab.js("(ids) => { for (const id of ids) __explorer.togglePin(id); }", ids)
        expect(page.locator("#diagram-svg .diagram-unit")).to_have_count(len(ids))
        drawn = {
            (e.get_attribute("data-source"), e.get_attribute("data-target")):
                float(e.get_attribute("data-weight"))
            for e in page.locator("#diagram-svg .diagram-edge").all()
        }  # fmt: skip
        pos = {i: j for j, i in enumerate(nodes)}
        want = {(ids[pos[int(s)]], ids[pos[int(t)]]): float(w)
                for t, s, w in zip(g.target, g.source, g.weight, strict=True)
                if int(s) in pos and int(t) in pos}  # fmt: skip
        assert drawn == pytest.approx(want, rel=1e-6) and len(want) >= len(ids) - 1
        assert set(drawn) == set(want)
        from tracer.subgraph import Subgraph, subgraph_scores

        sc = subgraph_scores(g, Subgraph("x", pinned=ids))
        expect(page.locator("#diagram-scores")).to_contain_text(
            f"replacement {sc['replacement']:.3f} · completeness {sc['completeness']:.3f}"
        )
        tab.js(SETTLED)
        page.screenshot(path=str(DOCS_IMG / "explorer-subgraph.png"))
        tab.shot("12-subgraph-diagram")
        # group the two strongest features: the supernode's edges are sums of theirs
        feats = nodes[:2]
        assert len(feats) == 2
        for i in feats:
            page.check(f"#pinned-list input.pick[data-id='{np_node_id(g, i)}']")
        page.fill("#supernode-label", "pair")
        page.click("#group-button")
        expect(page.locator("#diagram-svg .diagram-unit")).to_have_count(len(ids) - 1)
        members = {np_node_id(g, i) for i in feats}
        unit = {i: "s0" if i in members else i for i in ids}
        sums: dict = {}
        for (s, t), w in want.items():
            if unit[s] != unit[t]:
                sums[(unit[s], unit[t])] = sums.get((unit[s], unit[t]), 0.0) + w
        got = {
            (e.get_attribute("data-source"), e.get_attribute("data-target")):
                float(e.get_attribute("data-weight"))
            for e in page.locator("#diagram-svg .diagram-edge").all()
        }  # fmt: skip
        assert got == pytest.approx(sums, rel=1e-6)
        with page.expect_download() as dl:
            page.click("#export-svg")
        svg = Path(dl.value.path()).read_text()
        assert svg.startswith("<svg") and svg.count('class="diagram-edge"') == len(sums)
        with page.expect_download() as dl:
            page.click("#export-png")
        assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the Neuronpedia JSON of what is pinned now (not saved) carries it in its qParams
        with page.expect_download() as dl:
            page.click("#export-np")
        doc = json.loads(Path(dl.value.path()).read_text())
        sub = read_subgraph(doc, name="x")
        assert sub.pinned == ids
        assert [(s.label, s.members) for s in sub.supernodes] == [("pair", [ids[0], ids[1]])]
        # the full-graph toggle keeps the pins the pruned circuit has
        pruned = world.graphs[k][0]
        in_pruned = {np_node_id(pruned, i) for i in range(pruned.n_nodes)}
        kept = [i for i in ids if i in in_pruned]
        assert kept
        page.uncheck("#full-graph")
        page.wait_for_function("(n) => __explorer.graph.full === false && __explorer.pinned.length"
                               " === n", arg=len(kept))  # fmt: skip
        assert tab.js("__explorer.pinned") == kept
        assert tab.errors == []
    finally:
        tab.close()


def test_feature_label_kept_per_feature(world, browser):
    """An edited label is stored per feature identity: it survives a reload and is the
    feature's text in the other graph that has the feature."""
    g, _ = world.graphs[0]
    other, _ = world.graphs[1]
    gid, other_id = world.ids
    shared = shared_feature(g, other)
    layer, index = int(g.layer[shared]), int(g.feature[shared])
    tab = Tab(browser, world.url)
    page = tab.page
    try:
        tab.open(f"?graph={gid}")
        auto = tab.js("(id) => __explorer.graph.nodes.text[__explorer.index.get(id)]",
                      np_node_id(g, shared))  # fmt: skip
        tab.js("(id) => __explorer.openFeature(__explorer.index.get(id))", np_node_id(g, shared))
        page.wait_for_selector("#feature-label")
        # the full contexts, the activating token marked
        info = world.features.get(layer, index)
        ctx = page.locator("#tab-feature .ctx")
        assert ctx.count() == len(info.top_contexts)
        for j, c in enumerate(info.top_contexts):
            assert ctx.nth(j).text_content() == "".join(c.tokens)
            assert ctx.nth(j).locator(".peak").text_content() == c.tokens[c.peak]
        page.fill("#feature-label", "capital-city feature")
        page.click("#feature-label-save")
        page.wait_for_selector("#message.info")
        assert world.store.feature_labels(g.transcoder_name) == {
            (layer, index): "capital-city feature"
        }
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        tab.js(SETTLED)
        text = "(id) => __explorer.graph.nodes.text[__explorer.index.get(id)]"
        assert tab.js(text, np_node_id(g, shared)) == "capital-city feature"
        tab.open(f"?graph={other_id}")
        same = [i for i in np.flatnonzero(other.kind == FEATURE)
                if (int(other.layer[i]), int(other.feature[i])) == (layer, index)]  # fmt: skip
        for i in same:
            assert tab.js(text, np_node_id(other, int(i))) == "capital-city feature"
        tab.js(
            "(id) => __explorer.openFeature(__explorer.index.get(id))",
            np_node_id(other, int(same[0])),
        )
        page.wait_for_selector("#feature-label")
        assert page.locator("#feature-label").input_value() == "capital-city feature"
        tab.shot("13-feature-label")
        # an empty label removes it: the automatic label is back
        page.fill("#feature-label", "")
        page.click("#feature-label-save")
        expect(page.locator("#feature-title")).not_to_contain_text("capital-city")
        assert world.store.feature_labels(g.transcoder_name) == {}
        tab.open(f"?graph={gid}")
        assert tab.js(text, np_node_id(g, shared)) == auto
        assert tab.errors == []
    finally:
        world.store.set_feature_label(g.transcoder_name, layer, index, "")
        tab.close()


COLUMNS = (("constrained", ".logit-after-constrained"), ("free", ".logit-after-live"))


def test_intervention_both_modes(world, browser):
    """ "both" runs the edit constrained and live and shows them side by side, each column
    equal to tracer.interventions in that mode."""
    g, _ = world.graphs[0]
    gid = world.ids[0]
    node = top_features(g, 1)[0]
    nid = np_node_id(g, node)
    tab = Tab(browser, world.url)
    page = tab.page
    try:
        tab.open(f"?graph={gid}")
        tab.js("(id) => __explorer.togglePin(id)", nid)
        page.click("#tabs button[data-tab=intervene]")
        page.select_option("#iv-target", f"n:{nid}")
        page.select_option("#iv-op", "ablate")
        page.select_option("#iv-mode", "both")
        page.click("#iv-run")
        page.wait_for_selector("#logit-table-both", timeout=120_000)
        tab.shot("14-intervention-both")
        rm = world.rm
        state = rm.record(torch.tensor(g.tokens))
        edits = [FeatureEdit(int(g.layer[node]), int(g.feature[node]), int(g.position[node]),
                             "ablate")]  # fmt: skip
        want = {m: intervene(rm, state, edits, m).logits[-1] for m in ("constrained", "free")}
        rows = page.locator("#logit-table-both tr[data-token]")
        assert rows.count() >= 10
        checked = 0
        for j in range(rows.count()):
            tok = int(rows.nth(j).get_attribute("data-token"))
            for m, cls in (
                ("constrained", ".logit-after-constrained"),
                ("free", ".logit-after-live"),
            ):
                text = rows.nth(j).locator(cls).inner_text()
                if text != "·":
                    assert float(text) == pytest.approx(float(want[m][tok]), abs=2e-4)
                    checked += 1
        assert checked >= 20
        assert page.locator("#iv-target-change-constrained").count() == 1
        assert page.locator("#iv-target-change-live").count() == 1
        assert tab.errors == []
    finally:
        tab.close()


def test_cypher_node_query_as_a_property_table(world, browser):
    """A node query renders as a table of properties: a labels column and one column per
    property, the influence column holding the numbers pruning recorded, in order; no cell
    wider than the panel."""
    g, gid = world.graphs[0][0], world.ids[0]
    infl = np.asarray(g.extra["influence"], dtype=np.float64)
    feats = np.flatnonzero(g.kind == FEATURE)
    tab = Tab(browser, world.url)
    page = tab.page
    try:
        tab.open(f"?graph={gid}")
        page.click("#tabs button[data-tab=cypher]")
        page.fill(
            "#cypher-text",
            f"MATCH (n:Node {{graph: '{gid}'}}) WHERE n.kind = 'feature' "
            "RETURN n ORDER BY n.influence DESC LIMIT 8",
        )
        k = min(8, len(feats))
        page.click("#cypher-run")
        page.wait_for_selector("#cypher-table")
        heads = page.locator("#cypher-table th").all_inner_texts()
        assert heads[0] == "n:labels" and "n.influence" in heads and "n.layer" in heads
        col = heads.index("n.influence")
        rows = page.locator("#cypher-table tr")
        assert rows.count() == k + 1 > 3
        values = [
            float(rows.nth(j).locator("td").nth(col).get_attribute("data-value"))
            for j in range(1, k + 1)
        ]
        np.testing.assert_allclose(values, np.sort(infl[feats])[::-1][:k], rtol=1e-12)
        assert rows.nth(1).locator("td").first.inner_text() == "Node"
        # no JSON blobs, and every cell inside the panel's width
        assert not any("{" in t for t in page.locator("#cypher-table td").all_inner_texts())
        widths = tab.js("""() => { const p = document.getElementById('tab-cypher');
          const cells = [...document.querySelectorAll('#cypher-table td, #cypher-table th')];
          return {panel: p.clientWidth, widest: Math.max(...cells.map(c => c.offsetWidth))}; }""")
        assert widths["widest"] <= widths["panel"]
        tab.shot("15-cypher-table")
        assert tab.errors == []
    finally:
        tab.close()


def test_neuronpedia_export_uses_edited_labels(world):
    """Both Neuronpedia exports (the saved-subgraph link and the export of what is pinned now)
    carry a feature's edited label as the clerp of every node of that feature, in each graph
    that has it; the other features keep their automatic labels."""
    from explorer_client import call

    g, _ = world.graphs[0]
    other, _ = world.graphs[1]
    gid, other_id = world.ids
    shared = shared_feature(g, other)
    key = (int(g.layer[shared]), int(g.feature[shared]))
    before = call(f"{world.url}/api/graphs/{gid}/neuronpedia")[1]
    try:
        world.store.set_feature_label(g.transcoder_name, *key, "capital-city feature")
        for graph, graph_id in ((g, gid), (other, other_id)):
            pinned = {"name": "now", "pinnedIds": [np_node_id(graph, int(shared_in(graph, key)))]}
            for status, doc in (
                call(f"{world.url}/api/graphs/{graph_id}/neuronpedia"),
                call(f"{world.url}/api/graphs/{graph_id}/neuronpedia", pinned),
            ):
                assert status == 200, doc
                hits = 0
                for i, node in enumerate(doc["nodes"]):
                    mine = graph.kind[i] == FEATURE and (
                        int(graph.layer[i]), int(graph.feature[i])) == key  # fmt: skip
                    if mine:
                        assert node["clerp"] == "capital-city feature"
                        hits += 1
                    else:
                        assert node["clerp"] != "capital-city feature"
                assert hits >= 1
        after = call(f"{world.url}/api/graphs/{gid}/neuronpedia")[1]
        changed = [i for i, (a, b) in enumerate(zip(before["nodes"], after["nodes"], strict=True))
                   if a["clerp"] != b["clerp"]]  # fmt: skip
        assert changed and all(
            (int(g.layer[i]), int(g.feature[i])) == key for i in changed
        )  # fmt: skip
    finally:
        world.store.set_feature_label(g.transcoder_name, *key, "")
    assert call(f"{world.url}/api/graphs/{gid}/neuronpedia")[1]["nodes"] == before["nodes"]


def shared_in(graph, key) -> int:
    """A feature node of ``graph`` with (layer, index) ``key``."""
    return next(
        int(i) for i in np.flatnonzero(graph.kind == FEATURE)
        if (int(graph.layer[i]), int(graph.feature[i])) == key
    )  # fmt: skip


def test_cancelled_intervention_stops(world, browser):
    """Cancel while the continuation is being generated: the page says cancelled and shows no
    result, the server's job ends cancelled before it finished, and the next run works."""
    from explorer_client import call

    g, _ = world.graphs[0]
    gid = world.ids[0]
    nid = np_node_id(g, top_features(g, 1)[0])
    tab = Tab(browser, world.url)
    page = tab.page

    def longer(route):  # a 64-token continuation, so the job is still running when cancelled
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "max_new_tokens": 64}))

    try:
        tab.open(f"?graph={gid}")
        tab.js("(id) => __explorer.togglePin(id)", nid)
        page.click("#tabs button[data-tab=intervene]")
        page.select_option("#iv-target", f"n:{nid}")
        page.select_option("#iv-op", "ablate")
        page.select_option("#iv-mode", "free")
        page.route("**/api/interventions", longer)
        with page.expect_response("**/api/interventions") as submitted:
            page.click("#iv-run")
        jid = submitted.value.json()["id"]
        expect(page.locator("#iv-status")).to_contain_text(
            "generating continuations", timeout=60_000
        )
        assert page.locator("#iv-cancel").is_visible()
        page.click("#iv-cancel")
        expect(page.locator("#iv-status")).to_have_text("cancelled", timeout=30_000)
        job = call(f"{world.url}/api/jobs/{jid}")[1]
        assert job["state"] == "cancelled" and job["result"] is None
        assert 0.5 <= job["progress"] < 1.0  # stopped during the continuation
        assert page.locator("#iv-result").inner_text().strip() == ""
        assert page.locator("#logit-table").count() == 0
        assert page.locator("#iv-cancel").is_hidden() and page.locator("#iv-run").is_enabled()
        assert call(f"{world.url}/api/info")[1]["queue"]["pending"] == 0
        tab.shot("16-intervention-cancelled")
        # the worker is free: the next run (the page's own length) completes
        page.unroute("**/api/interventions")
        page.click("#iv-run")
        page.wait_for_selector("#logit-table", timeout=120_000)
        expect(page.locator("#iv-status")).to_have_text("done")
        assert tab.errors == []
    finally:
        tab.close()
