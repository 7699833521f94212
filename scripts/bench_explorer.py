"""Benchmark the explorer's page in headless Chromium: time to first render and interaction
frame times, for demo-size graphs and a synthetic 2,000-node / 50,000-edge graph.

    PYTHONPATH=.:tests:tests/explorer .venv/bin/python scripts/bench_explorer.py

Graphs: the demo-size graphs the browser tests use (SmolLM2 truncated to 4 layers, a random
CLT: the pruned circuit and its full graph), and ``big_graph()`` (graphstore.synthetic's shape
at 2,000 nodes, 50,000 edges), served from a Parquet folder by ``tracer.explorer``.

Each graph opens at the page's readable default (features by cumulative influence among
features, at most 100; at most 150 faint background edges); the 2,000-node graph is also timed
with everything shown (sliders at 1, no caps), as the page drew it before that default.

Per graph:
- ``first_render_ms``: navigation start to the end of the first full draw of the graph
  (page, scripts, graph JSON fetched and parsed, layout, first canvas draw);
- ``hover_frame_ms``: rAF frame intervals while the mouse sweeps over nodes (each move
  re-picks the node and redraws the highlight overlay), median and p95; plus the overlay
  draw time alone;
- ``pan_zoom_frame_ms``: rAF frame intervals while wheel-zooming and dragging, median and p95;
  ``base_draw_ms``: the full redraws during and just after the gesture (a graph above the
  page's fast-edge limit moves a snapshot during a gesture, ``moved_draw_ms``, and redraws in
  full once it settles); ``full_draw_ms``: one full redraw of every visible edge and node,
  timed five times.
Frame intervals are capped by the browser at 16.7 ms (60 frames per second): a median of 16.7
means no frame was dropped.
Chromium runs headless with software rendering (no GPU) on this machine; the load average is
recorded with every run. Results go to benchmarks/explorer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(values, q):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))], 2) if v else None


def summary(values):
    return {"median": round(statistics.median(values), 2), "p95": pct(values, 0.95),
            "n": len(values)} if values else None  # fmt: skip


RESET = (
    "window.__explorerStats.overlay.length = 0; window.__explorerStats.base.length = 0;"
    " window.__explorerStats.moved.length = 0"
)
# One full redraw of every visible edge and node, timed 5 times (what a settled view costs).
FULL_DRAW = """() => { const v = window.__explorer.view, out = [];
  for (let i = 0; i < 5; i++) { const t0 = performance.now(); v.drawBase();
    out.push(performance.now() - t0); } return out; }"""
FRAME_PROBE = """() => {
  window.__frames = [];
  let last = performance.now();
  window.__probe = true;
  const tick = (t) => {
    window.__frames.push(t - last); last = t;
    if (window.__probe) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


# Everything shown: the sliders at 1, no caps (what the page drew before the readable default).
SHOW_ALL = """() => { for (const [id, v] of [["node-threshold", 1], ["edge-threshold", 1],
  ["max-features", 100000], ["max-edges", 10000000]]) {
  const el = document.getElementById(id); el.value = v; el.dispatchEvent(new Event("input")); } }"""


def measure(page, url: str, gid: str, shot: Path | None, show_all: bool = False) -> dict:
    page.goto(f"{url}/?graph={gid}")
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    page.wait_for_timeout(300)
    first = page.evaluate("window.__explorerStats.firstRender")
    if show_all:
        page.evaluate(SHOW_ALL)
        page.wait_for_timeout(300)
    graph = page.evaluate("window.__explorerStats.graph")
    counts = page.evaluate("window.__explorer.view.counts")
    box = page.locator("#overlay").bounding_box()
    pts = page.evaluate(
        """() => { const a = window.__explorer, v = a.view, out = [];
        for (let i = 0; i < a.graph.nodes.id.length && out.length < 60; i += Math.max(1,
             Math.floor(a.graph.nodes.id.length / 60))) if (v.shown[i]) out.push(v.screenPos(i));
        return out; }"""
    )
    # hover sweep
    page.evaluate(RESET)
    page.evaluate(FRAME_PROBE)
    for x, y in pts:
        page.mouse.move(x, y, steps=2)
    page.wait_for_timeout(100)
    page.evaluate("window.__probe = false")
    hover_frames = page.evaluate("window.__frames.slice(1)")
    overlay_draw = page.evaluate("window.__explorerStats.overlay.slice()")
    # pan and zoom
    page.evaluate(RESET)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.evaluate(FRAME_PROBE)
    for k in range(12):
        page.mouse.wheel(0, -120 if k < 6 else 120)
        page.wait_for_timeout(30)
    page.mouse.down()
    for k in range(30):
        page.mouse.move(cx + 6 * k, cy + 3 * k)
    page.mouse.up()
    page.wait_for_timeout(100)
    page.evaluate("window.__probe = false")
    pan_frames = page.evaluate("window.__frames.slice(1)")
    page.wait_for_timeout(600)  # a big graph redraws in full once the gesture has settled
    base_draw = page.evaluate("window.__explorerStats.base.slice()")
    moved_draw = page.evaluate("window.__explorerStats.moved.slice()")
    full_draw = page.evaluate(FULL_DRAW)
    if shot is not None:
        page.evaluate("window.__explorer.view.fit()")
        page.wait_for_timeout(200)
        page.screenshot(path=str(shot))
    return {
        "nodes": graph["nodes"],
        "edges": graph["edges"],
        "shown": counts,
        "first_render_ms": round(first, 1),
        "hover_frame_ms": summary(hover_frames),
        "overlay_draw_ms": summary(overlay_draw),
        "pan_zoom_frame_ms": summary(pan_frames),
        "base_draw_ms": summary(base_draw),
        "moved_draw_ms": summary(moved_draw),
        "full_draw_ms": summary(full_draw),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "explorer.json"))
    ap.add_argument("--screenshot", default=None, help="save a PNG of the demo graph here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "explorer")]
    from explorer_fixtures import big_graph, build_graphs, build_replacement
    from playwright.sync_api import sync_playwright

    from graphstore import graph_id
    from tracer.explorer import GraphSource, ServerThread, create_app
    from tracer.model import LanguageModel, truncate_layers

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-explorer-"))
    try:
        rm = build_replacement(truncate_layers(LanguageModel.load("smollm2"), 4))
        pruned, full = build_graphs(rm)[0]
        pruned.save(tmp / "demo.parquet")
        full.save(tmp / "demo.full.parquet")
        big = big_graph()
        big.save(tmp / "big.parquet")
        server = ServerThread(create_app(GraphSource(folder=tmp))).start()
        cases = [
            ("demo-size circuit (pruned), readable default", graph_id(pruned), args.screenshot,
             False),
            ("synthetic 2,000 nodes / 50,000 edges, readable default", graph_id(big), None, False),
            ("synthetic 2,000 nodes / 50,000 edges, everything shown", graph_id(big), None, True),
        ]  # fmt: skip
        results = {}
        chromium = shutil.which("chromium")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox"])  # fmt: skip
            for name, gid, shot, show_all in cases:
                page = browser.new_page(viewport={"width": 1500, "height": 900})
                results[name] = measure(page, server.url, gid, Path(shot) if shot else None,
                                        show_all)  # fmt: skip
                print(name, json.dumps(results[name]), file=sys.stderr)
                page.close()
            # the full graph of the demo-size prompt (the "full graph" toggle)
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(f"{server.url}/?graph={graph_id(pruned)}&full=1")
            res = measure(page, server.url, graph_id(pruned) + "&full=1", None)
            results["demo-size full graph, readable default"] = res
            print("full", json.dumps(res), file=sys.stderr)
            browser.close()
        server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    out = {
        "commit": commit,
        "command": "PYTHONPATH=.:tests:tests/explorer .venv/bin/python scripts/bench_explorer.py",
        "machine": "the shared 2-core CPU; headless Debian chromium, software rendering",
        "load_start": [round(x, 2) for x in load_start],
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "viewport": [1500, 900],
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
