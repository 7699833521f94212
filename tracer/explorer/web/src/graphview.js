// The attribution graph on two canvases: the base (faint background edges, nodes, labels;
// redrawn on zoom, pan and threshold changes) and the overlay (the edges of the hovered,
// selected and pinned nodes, traced paths, rings: cheap to redraw). Zoom and pan by d3-zoom.
//
// What is shown (readable by default): features by cumulative influence among features
// (payload's fcum/frank: the most influential feature stays at every threshold above zero),
// at most maxFeatures of them; error nodes as influential as the weakest shown feature; all
// tokens and logits; pinned, selected, highlighted and traced nodes always. Background edges:
// the strongest maxEdges among shown nodes within the edge threshold, faint; the edges of the
// hovered, selected and pinned nodes drawn strongly on the overlay (FOCUS_EDGES each).
// Labels are placed without overlap (greedy, most influential first; the boxes drawn are kept
// in view.labelBoxes, CSS pixels): token text and position under each column, logits listed
// beside their column with leader lines, feature labels where there is room.
// Frame times are kept in window.__explorerStats for the benchmark.
import { select } from "d3-selection";
import { zoom, zoomIdentity } from "d3-zoom";
import { GAP, NODE_R, SUB_ROW, layoutGraph } from "./layout.js";

export const FOCUS_EDGES = 30; // per direction, for each hovered / selected node
const N_BUCKETS = 6; // background edges are drawn as one path per (sign, strength) bucket
const FAST_EDGES = 8000; // above this many background edges, gestures move a bitmap
const SETTLE_MS = 120;
const PIN_EDGES = 3; // per direction, for each pinned node (besides those between pinned nodes)
const POS = "47, 111, 179"; // positive weight
const NEG = "196, 52, 38"; // negative weight
const KIND_COLOR = { feature: "#5b6b7f", error: "#b9a37a", token: "#2e6f40", logit: "#7a3fa0" };
const FONT = "11px system-ui, sans-serif";
const SMALL = "10px system-ui, sans-serif";
const M = { left: 34, top: 14, bottom: 42, gapRight: 14 }; // fit margins, CSS px
const MAX_FEATURE_LABELS = 400;

const stats = (window.__explorerStats = window.__explorerStats || { base: [], overlay: [], moved: [], firstRender: null, graph: null });

export class GraphView {
  constructor(base, overlay, tooltip, callbacks) {
    this.base = base;
    this.overlay = overlay;
    this.tooltip = tooltip;
    this.cb = callbacks;
    this.g = null;
    this.t = zoomIdentity;
    this.hover = -1;
    this.selected = -1;
    this.pinned = new Set();
    this.grouped = new Map(); // node index -> supernode number
    this.highlight = new Set();
    this.paths = []; // traced paths: [{nodes: [node index, ...], ...}]
    this.activePath = -1; // -1: all paths highlighted
    this.opts = { nodeThreshold: 0.8, edgeThreshold: 1, maxFeatures: 100, maxEdges: 150 };
    this.labelBoxes = [];
    this.userMoved = false;
    this.pending = { base: false, overlay: false, fast: false };
    // While a zoom or pan gesture runs with many edges drawn, frames show the last full
    // drawing moved and scaled (one bitmap copy); the full redraw follows when it pauses.
    this.zoom = zoom().scaleExtent([0.05, 40]).on("zoom", (e) => {
      this.t = e.transform;
      if (e.sourceEvent) this.userMoved = true;
      if (e.sourceEvent && this.bgEdges && this.bgEdges.length > FAST_EDGES && this.snapshot) {
        this.pending.fast = true;
        clearTimeout(this.settle);
        this.settle = setTimeout(() => this.request(true), SETTLE_MS);
        this.request(false);
      } else this.request(true);
    });
    select(overlay).call(this.zoom).on("dblclick.zoom", null);
    overlay.addEventListener("mousemove", (e) => this.onMove(e));
    overlay.addEventListener("mouseleave", () => this.setHover(-1));
    overlay.addEventListener("click", (e) => {
      const i = this.pick(e);
      if (i >= 0) this.cb.onClick(i);
    });
    new ResizeObserver(() => this.resize()).observe(base.parentElement);
  }

  size() {
    const r = this.base.parentElement.getBoundingClientRect();
    return { w: r.width, h: r.height };
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const { w, h } = this.size();
    for (const c of [this.base, this.overlay]) {
      c.width = Math.max(1, Math.round(w * dpr));
      c.height = Math.max(1, Math.round(h * dpr));
    }
    this.dpr = dpr;
    if (this.g && !this.userMoved) this.fit();
    this.request(true);
  }

  setGraph(g, opts) {
    this.g = g;
    const n = g.nodes.id.length, m = g.edges.source.length;
    this.inEdges = Array.from({ length: n }, () => []);
    this.outEdges = Array.from({ length: n }, () => []);
    this.edgeOrder = Array.from({ length: m }, (_, e) => e).sort((a, b) => Math.abs(g.edges.weight[b]) - Math.abs(g.edges.weight[a]) || a - b);
    for (const e of this.edgeOrder) {
      this.inEdges[g.edges.target[e]].push(e);
      this.outEdges[g.edges.source[e]].push(e);
    }
    this.maxW = m ? Math.abs(g.edges.weight[this.edgeOrder[0]]) : 1;
    this.featureOrder = [];
    for (let i = 0; i < n; i++) if (g.nodes.kind[i] === "feature") this.featureOrder.push(i);
    this.featureOrder.sort((a, b) => g.nodes.frank[a] - g.nodes.frank[b] || g.nodes.influence[b] - g.nodes.influence[a] || a - b);
    this.logitProb = new Map(g.logits.map((l) => [l.node, l.probability]));
    this.hover = -1;
    this.selected = -1;
    this.highlight = new Set();
    this.paths = [];
    this.activePath = -1;
    this.shown = null;
    this.userMoved = false;
    stats.graph = { nodes: n, edges: m };
    this.setThresholds(opts);
  }

  // Which nodes are shown (see the module note); re-lays out when that set changes.
  computeShown() {
    const g = this.g, n = g.nodes.id.length, o = this.opts;
    const shown = new Uint8Array(n);
    let nFeat = 0, weakest = Infinity;
    const within = (i) => o.nodeThreshold >= 1 || g.nodes.fcum[i] < o.nodeThreshold - 1e-12; // 1: all
    for (const i of this.featureOrder) {
      if (nFeat >= o.maxFeatures || !within(i)) break;
      shown[i] = 1;
      nFeat++;
      weakest = g.nodes.influence[i];
    }
    for (let i = 0; i < n; i++) {
      const k = g.nodes.kind[i];
      if (k === "token" || k === "logit") shown[i] = 1;
      else if (k === "error" && (nFeat === 0 || g.nodes.influence[i] >= weakest) && within(i)) shown[i] = 1;
    }
    for (const i of this.forcedNodes()) shown[i] = 1;
    return shown;
  }

  forcedNodes() {
    const out = new Set([...this.pinned, ...this.highlight]);
    if (this.selected >= 0) out.add(this.selected);
    for (const p of this.paths) for (const i of p.nodes) out.add(i);
    out.delete(undefined);
    return out;
  }

  setThresholds(opts) {
    if (!this.g) return;
    Object.assign(this.opts, opts || {});
    this.update(true);
  }

  // Recompute what is shown; lay out again when the set changed (refit: forced, or the user
  // has not moved the view).
  update(refit = false) {
    const g = this.g;
    if (!g) return;
    const shown = this.computeShown();
    const same = this.shown && this.shown.length === shown.length && this.shown.every((v, i) => v === shown[i]);
    this.shown = shown;
    if (!same) {
      const { w, h } = this.size();
      const aspect = w > 0 ? Math.max(0.2, (h - M.top - M.bottom) / Math.max(1, w - M.left - this.rightMargin())) : 0.6;
      this.lay = layoutGraph(g, shown, aspect);
      this.buildGrid();
    }
    // background edges: the strongest within the edge threshold among shown nodes
    const bg = [];
    let inThreshold = 0;
    for (const e of this.edgeOrder) {
      if (!shown[g.edges.source[e]] || !shown[g.edges.target[e]] || g.edges.cum[e] > this.opts.edgeThreshold + 1e-9) continue;
      inThreshold++;
      if (bg.length < this.opts.maxEdges) bg.push(e);
    }
    this.bgEdges = bg;
    this.buckets = Array.from({ length: 2 * N_BUCKETS }, () => []);
    for (const e of bg) {
      const w = g.edges.weight[e];
      const b = Math.min(N_BUCKETS - 1, Math.floor((Math.abs(w) / (this.maxW || 1)) * N_BUCKETS));
      this.buckets[(w >= 0 ? 0 : N_BUCKETS) + b].push(e);
    }
    let nodes = 0, features = 0, errors = 0;
    for (let i = 0; i < shown.length; i++) {
      if (!shown[i]) continue;
      nodes++;
      if (g.nodes.kind[i] === "feature") features++;
      else if (g.nodes.kind[i] === "error") errors++;
    }
    this.counts = { nodes, features, errors, edges: bg.length, edgesInThreshold: inThreshold, totalFeatures: this.featureOrder.length };
    if (!same && (refit || !this.userMoved)) this.fit();
    this.request(true);
  }

  buildGrid() {
    this.cell = 24;
    this.grid = new Map();
    const { x, y } = this.lay;
    for (let i = 0; i < x.length; i++) {
      if (Number.isNaN(x[i])) continue;
      const key = `${Math.floor(x[i] / this.cell)},${Math.floor(y[i] / this.cell)}`;
      if (!this.grid.has(key)) this.grid.set(key, []);
      this.grid.get(key).push(i);
    }
  }

  logitLabel(i) {
    const p = this.logitProb.get(this.g.nodes.id[i]);
    return `${this.g.nodes.text[i]}${p !== undefined ? ` ${p.toFixed(2)}` : ""}`;
  }

  rightMargin() {
    if (!this.g) return 120;
    const ctx = this.base.getContext("2d");
    ctx.font = FONT;
    let w = 0;
    for (let i = 0; i < this.g.nodes.id.length; i++) if (this.g.nodes.kind[i] === "logit") w = Math.max(w, ctx.measureText(this.logitLabel(i)).width);
    return Math.min(220, w + 2 * M.gapRight + 6);
  }

  // The whole shown graph in view with room for the labels around it.
  fit() {
    if (!this.g || !this.lay) return;
    const { w, h } = this.size();
    const right = this.rightMargin();
    const aw = Math.max(10, w - M.left - right), ah = Math.max(10, h - M.top - M.bottom);
    const k = Math.min(3, aw / this.lay.width, ah / this.lay.height);
    const tx = M.left + (aw - this.lay.width * k) / 2, ty = M.top + (ah - this.lay.height * k) / 2;
    select(this.overlay).call(this.zoom.transform, zoomIdentity.translate(tx, ty).scale(k));
    this.userMoved = false;
  }

  request(baseToo) {
    if (baseToo) this.pending.base = true;
    this.pending.overlay = true;
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      if (this.pending.base) this.drawBase();
      else if (this.pending.fast) this.drawMoved();
      if (this.pending.overlay) this.drawOverlay();
      this.pending = { base: false, overlay: false, fast: false };
    });
  }

  // The last full drawing, moved and scaled to the current transform (during gestures).
  drawMoved() {
    const t0 = performance.now();
    const ctx = this.base.getContext("2d"), d = this.dpr || 1, s0 = this.snapshotT;
    const s = this.t.k / s0.k;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.base.width, this.base.height);
    ctx.setTransform(s, 0, 0, s, d * (this.t.x - s0.x * s), d * (this.t.y - s0.y * s));
    ctx.drawImage(this.snapshot, 0, 0);
    stats.moved.push(performance.now() - t0);
    if (stats.moved.length > 500) stats.moved.shift();
  }

  keepSnapshot() {
    if (!this.snapshot || this.snapshot.width !== this.base.width || this.snapshot.height !== this.base.height) {
      this.snapshot = document.createElement("canvas");
      this.snapshot.width = this.base.width;
      this.snapshot.height = this.base.height;
    }
    const c = this.snapshot.getContext("2d");
    c.clearRect(0, 0, this.snapshot.width, this.snapshot.height);
    c.drawImage(this.base, 0, 0);
    this.snapshotT = { k: this.t.k, x: this.t.x, y: this.t.y };
  }

  worldTransform(ctx) {
    const d = this.dpr || 1;
    ctx.setTransform(d * this.t.k, 0, 0, d * this.t.k, d * this.t.x, d * this.t.y);
  }

  // Node radius on screen (CSS px): the world radius scaled, so neighbours (GAP, SUB_ROW apart)
  // never overlap, within readable limits.
  radiusPx() {
    return Math.max(1.2, Math.min(7, NODE_R * this.t.k, 0.45 * Math.min(GAP, SUB_ROW) * this.t.k));
  }

  sx(i) { return this.t.x + this.lay.x[i] * this.t.k; }
  sy(i) { return this.t.y + this.lay.y[i] * this.t.k; }

  drawBase() {
    const t0 = performance.now();
    const ctx = this.base.getContext("2d");
    const d = this.dpr || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.base.width, this.base.height);
    this.labelBoxes = [];
    if (!this.g || !this.lay) return;
    const g = this.g, { x, y } = this.lay, k = this.t.k, shown = this.shown;
    this.worldTransform(ctx);
    // row bands
    ctx.fillStyle = "#f7f8fa";
    for (let r = 0; r < this.lay.rows; r += 2) ctx.fillRect(-30, this.lay.rowTop[r], this.lay.width + 60, this.lay.rowH[r]);
    // background edges: faint, one path per (sign, strength) bucket
    for (let b = 0; b < 2 * N_BUCKETS; b++) {
      const list = this.buckets[b];
      if (!list.length) continue;
      const a = ((b % N_BUCKETS) + 0.5) / N_BUCKETS;
      ctx.strokeStyle = `rgba(${b < N_BUCKETS ? POS : NEG}, ${(0.08 + 0.3 * a).toFixed(3)})`;
      ctx.lineWidth = (0.5 + 1.8 * a) / k;
      ctx.beginPath();
      for (const e of list) {
        const s = g.edges.source[e], tg = g.edges.target[e];
        ctx.moveTo(x[s], y[s]);
        ctx.lineTo(x[tg], y[tg]);
      }
      ctx.stroke();
    }
    // nodes
    const rad = this.radiusPx() / k;
    for (const kind of ["feature", "error", "token", "logit"]) {
      ctx.fillStyle = KIND_COLOR[kind];
      ctx.beginPath();
      for (let i = 0; i < x.length; i++) {
        if (!shown[i] || g.nodes.kind[i] !== kind) continue;
        if (kind === "error") ctx.rect(x[i] - rad, y[i] - rad, 2 * rad, 2 * rad);
        else { ctx.moveTo(x[i] + rad, y[i]); ctx.arc(x[i], y[i], rad, 0, 2 * Math.PI); }
      }
      ctx.fill();
    }
    ctx.setTransform(d, 0, 0, d, 0, 0);
    this.drawLabels(ctx);
    if (this.bgEdges.length > FAST_EDGES) this.keepSnapshot();
    if (stats.firstRender === null) stats.firstRender = performance.now();
    stats.base.push(performance.now() - t0);
    if (stats.base.length > 500) stats.base.shift();
  }

  // Labels in screen pixels, placed so that no two overlap (boxes kept in this.labelBoxes).
  drawLabels(ctx) {
    const g = this.g, k = this.t.k, shown = this.shown, P = g.tokens.length;
    const { w: W, h: H } = this.size();
    const r = this.radiusPx();
    const placed = new Boxes();
    const put = (box, kind, node, text) => { placed.add(box); this.labelBoxes.push({ kind, node, text, x0: box[0], y0: box[1], x1: box[2], y1: box[3] }); };
    // layer names (in the left margin; not node labels)
    ctx.font = SMALL;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillStyle = "#6a7381";
    for (let row = 0; row < this.lay.rows; row++) {
      const name = row === 0 ? "emb" : row === this.lay.rows - 1 ? "logit" : `L${row - 1}`;
      ctx.fillText(name, 4, this.t.y + (this.lay.rowTop[row] + this.lay.rowH[row] / 2) * k);
    }
    // tokens: text and position under each column, cut to the column's width
    ctx.textAlign = "center";
    ctx.textBaseline = "alphabetic";
    for (let i = 0; i < shown.length; i++) {
      if (!shown[i] || g.nodes.kind[i] !== "token") continue;
      const p = g.nodes.position[i], cw = Math.max(16, this.lay.colW[p] * k - 6);
      const cx = this.t.x + this.lay.colX[p] * k, ty = this.sy(i) + r + 12;
      ctx.font = FONT;
      ctx.fillStyle = "#1d232b";
      const text = fitText(ctx, g.nodes.text[i], cw);
      const tw = ctx.measureText(text).width;
      ctx.fillText(text, cx, ty);
      put([cx - tw / 2, ty - 10, cx + tw / 2, ty + 2], "token", i, text);
      ctx.font = SMALL;
      ctx.fillStyle = "#8a93a0";
      const pos = String(p), pw = ctx.measureText(pos).width;
      ctx.fillText(pos, cx, ty + 12);
      put([cx - pw / 2, ty + 3, cx + pw / 2, ty + 13], "position", i, pos);
    }
    // logits: a list beside their column, most left node first, with leader lines
    const logits = [];
    for (let i = 0; i < shown.length; i++) if (shown[i] && g.nodes.kind[i] === "logit") logits.push(i);
    logits.sort((a, b) => this.sx(a) - this.sx(b) || this.sy(a) - this.sy(b));
    if (logits.length) {
      ctx.font = FONT;
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      const lastCol = Math.max(...logits.map((i) => g.nodes.position[i]));
      const x0 = this.t.x + (this.lay.colX[lastCol] + this.lay.colW[lastCol] / 2) * k + M.gapRight;
      const lineH = 14;
      let top = Math.min(...logits.map((i) => this.sy(i))) - lineH / 2;
      top = Math.max(2, Math.min(top, H - 2 - logits.length * lineH));
      logits.forEach((i, j) => {
        const ly = top + j * lineH + lineH / 2, text = this.logitLabel(i);
        const tw = ctx.measureText(text).width;
        ctx.strokeStyle = "rgba(122, 63, 160, 0.35)";
        ctx.lineWidth = 1;
        ctx.beginPath(); ctx.moveTo(this.sx(i) + r, this.sy(i)); ctx.lineTo(x0 - 3, ly); ctx.stroke();
        ctx.fillStyle = "#4a2466";
        ctx.fillText(text, x0, ly);
        put([x0, ly - 6, x0 + tw, ly + 6], "logit", i, text);
      });
    }
    // feature labels where there is room (clear of every label and node), most influential first
    for (let i = 0; i < shown.length; i++) {
      if (shown[i]) placed.add([this.sx(i) - r - 1, this.sy(i) - r - 1, this.sx(i) + r + 1, this.sy(i) + r + 1]);
    }
    ctx.font = SMALL;
    ctx.textAlign = "center";
    ctx.textBaseline = "alphabetic";
    ctx.fillStyle = "#2b3440";
    let tried = 0;
    for (const i of this.featureOrder) {
      if (!shown[i] || !g.nodes.text[i]) continue;
      if (++tried > MAX_FEATURE_LABELS) break;
      const cx = this.sx(i), cy = this.sy(i);
      if (cx < 0 || cx > W || cy < 0 || cy > H) continue;
      const text = fitText(ctx, g.nodes.text[i], 130);
      const tw = ctx.measureText(text).width;
      for (const by of [cy + r + 10, cy - r - 2]) {
        const box = [cx - tw / 2, by - 9, cx + tw / 2, by + 2];
        if (box[0] < M.left || box[2] > W || box[1] < 0 || box[3] > H || placed.hits(box)) continue;
        ctx.fillText(text, cx, by);
        put(box, "feature", i, text);
        break;
      }
    }
  }

  drawOverlay() {
    const t0 = performance.now();
    const ctx = this.overlay.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
    this.focusEdges = [];
    if (!this.g || !this.lay) return;
    const g = this.g, { x, y } = this.lay, k = this.t.k, shown = this.shown;
    this.worldTransform(ctx);
    const drawn = new Set();
    const edgesOf = (i, per, alsoTo = null) => {
      for (const [list, end] of [[this.inEdges[i], g.edges.source], [this.outEdges[i], g.edges.target]]) {
        let c = 0;
        for (const e of list) {
          if (!shown[end[e]]) continue;
          if (alsoTo && alsoTo.has(end[e])) { drawn.add(e); continue; }
          if (c >= per) { if (alsoTo) continue; break; }
          c++;
          drawn.add(e);
        }
      }
    };
    // pinned nodes: every edge between two pinned nodes, and a few strongest others
    for (const i of this.pinned) if (i !== undefined) edgesOf(i, PIN_EDGES, this.pinned);
    if (this.selected >= 0) edgesOf(this.selected, FOCUS_EDGES);
    if (this.hover >= 0) edgesOf(this.hover, FOCUS_EDGES);
    for (const e of drawn) {
      const w = g.edges.weight[e], a = Math.abs(w) / (this.maxW || 1);
      ctx.strokeStyle = `rgba(${w >= 0 ? POS : NEG}, ${(0.45 + 0.5 * a).toFixed(3)})`;
      ctx.lineWidth = (0.8 + 3 * a) / k;
      ctx.beginPath();
      ctx.moveTo(x[g.edges.source[e]], y[g.edges.source[e]]);
      ctx.lineTo(x[g.edges.target[e]], y[g.edges.target[e]]);
      ctx.stroke();
    }
    this.focusEdges = [...drawn];
    // traced paths
    const ring = (i, color, rr, width) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = width / k;
      ctx.beginPath();
      ctx.arc(x[i], y[i], rr / k, 0, 2 * Math.PI);
      ctx.stroke();
    };
    this.paths.forEach((p, j) => {
      if (this.activePath >= 0 && j !== this.activePath) return;
      ctx.strokeStyle = j === 0 || this.activePath >= 0 ? "rgba(232, 164, 0, 0.95)" : "rgba(232, 164, 0, 0.55)";
      ctx.lineWidth = (j === 0 || this.activePath >= 0 ? 4 : 2.5) / k;
      ctx.beginPath();
      p.nodes.forEach((i, s) => (s ? ctx.lineTo(x[i], y[i]) : ctx.moveTo(x[i], y[i])));
      ctx.stroke();
      for (const i of p.nodes) ring(i, "#e8a400", 8, 2.5);
    });
    for (const i of this.highlight) ring(i, "#e8b400", 10, 3);
    for (const i of this.pinned) if (i !== undefined) ring(i, this.grouped.has(i) ? "#c2185b" : "#7a3fa0", 8, 2.5);
    if (this.selected >= 0) ring(this.selected, "#111", 9, 2.5);
    if (this.hover >= 0) ring(this.hover, "#e07b00", 9, 2);
    stats.overlay.push(performance.now() - t0);
    if (stats.overlay.length > 500) stats.overlay.shift();
  }

  setPaths(list) {
    this.paths = list;
    this.activePath = -1;
    this.update(false);
  }

  toWorld(e) {
    const r = this.overlay.getBoundingClientRect();
    return [(e.clientX - r.left - this.t.x) / this.t.k, (e.clientY - r.top - this.t.y) / this.t.k];
  }

  pick(e) {
    if (!this.g || !this.lay) return -1;
    const [wx, wy] = this.toWorld(e);
    const maxD = Math.max(6, 9 / this.t.k);
    let best = -1, bestD = maxD * maxD;
    const cx = Math.floor(wx / this.cell), cy = Math.floor(wy / this.cell);
    const reach = Math.ceil(maxD / this.cell);
    for (let gx = cx - reach; gx <= cx + reach; gx++) {
      for (let gy = cy - reach; gy <= cy + reach; gy++) {
        for (const i of this.grid.get(`${gx},${gy}`) || []) {
          if (!this.shown[i]) continue;
          const dx = this.lay.x[i] - wx, dy = this.lay.y[i] - wy, dd = dx * dx + dy * dy;
          if (dd < bestD) { bestD = dd; best = i; }
        }
      }
    }
    return best;
  }

  onMove(e) {
    this.setHover(this.pick(e), e);
  }

  setHover(i, e) {
    if (i !== this.hover) {
      this.hover = i;
      this.request(false);
      this.cb.onHover(i);
    }
    if (i < 0) { this.tooltip.hidden = true; return; }
    if (e) {
      // kept inside the canvas: flipped left / up near the right / bottom edge
      const r = this.overlay.getBoundingClientRect(), tw = this.tooltip.offsetWidth || 320, th = this.tooltip.offsetHeight || 120;
      let left = e.clientX - r.left + 14, top = e.clientY - r.top + 14;
      if (left + tw > r.width - 4) left = Math.max(4, e.clientX - r.left - tw - 14);
      if (top + th > r.height - 4) top = Math.max(4, e.clientY - r.top - th - 14);
      this.tooltip.style.left = `${left}px`;
      this.tooltip.style.top = `${top}px`;
    }
  }

  screenPos(i) {
    const r = this.overlay.getBoundingClientRect();
    return [r.left + this.sx(i), r.top + this.sy(i)];
  }
}

// The longest prefix of text (with "…") that fits in maxW pixels at the context's font.
function fitText(ctx, text, maxW) {
  if (ctx.measureText(text).width <= maxW) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (ctx.measureText(`${text.slice(0, mid)}…`).width <= maxW) lo = mid;
    else hi = mid - 1;
  }
  return `${text.slice(0, lo)}…`;
}

// Placed label boxes [x0, y0, x1, y1] in a coarse grid, for overlap checks.
class Boxes {
  constructor() { this.cells = new Map(); this.size = 48; }
  keys(b) {
    const out = [];
    for (let gx = Math.floor(b[0] / this.size); gx <= Math.floor(b[2] / this.size); gx++) {
      for (let gy = Math.floor(b[1] / this.size); gy <= Math.floor(b[3] / this.size); gy++) out.push(`${gx},${gy}`);
    }
    return out;
  }
  add(b) {
    for (const key of this.keys(b)) {
      if (!this.cells.has(key)) this.cells.set(key, []);
      this.cells.get(key).push(b);
    }
  }
  hits(b) {
    for (const key of this.keys(b)) {
      for (const o of this.cells.get(key) || []) if (b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3]) return true;
    }
    return false;
  }
}
