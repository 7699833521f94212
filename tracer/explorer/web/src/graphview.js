// The attribution graph on two canvases: the base (edges and nodes, redrawn on zoom, pan and
// threshold changes) and the overlay (hover, selection, pins, highlights: cheap to redraw).
// Zoom and pan by d3-zoom. Frame times are kept in window.__explorerStats for the benchmark.
import { select } from "d3-selection";
import { zoom, zoomIdentity } from "d3-zoom";
import { layoutGraph } from "./layout.js";

const N_BUCKETS = 6;
const FAST_EDGES = 8000; // above this many shown edges, gestures move a bitmap of the drawing
const SETTLE_MS = 120;
const POS = "47, 111, 179"; // positive weight
const NEG = "196, 52, 38"; // negative weight
const KIND_COLOR = { feature: "#5b6b7f", error: "#b9a37a", token: "#2e6f40", logit: "#7a3fa0" };

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
    this.nodeThreshold = 1;
    this.edgeThreshold = 1;
    this.pending = { base: false, overlay: false, fast: false };
    // While a zoom or pan gesture runs on a large graph, frames show the last full drawing
    // moved and scaled (one bitmap copy); the full redraw follows when the gesture pauses.
    this.zoom = zoom().scaleExtent([0.05, 40]).on("zoom", (e) => {
      this.t = e.transform;
      if (this.counts && this.counts.edges > FAST_EDGES && this.snapshot) {
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

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const r = this.base.parentElement.getBoundingClientRect();
    for (const c of [this.base, this.overlay]) {
      c.width = Math.max(1, Math.round(r.width * dpr));
      c.height = Math.max(1, Math.round(r.height * dpr));
    }
    this.dpr = dpr;
    this.request(true);
  }

  setGraph(g, { nodeThreshold, edgeThreshold }) {
    this.g = g;
    const r = this.base.parentElement.getBoundingClientRect();
    this.lay = layoutGraph(g, r.width > 0 ? (r.height - 30) / (r.width - 60) : 0.6);
    const n = g.nodes.id.length, m = g.edges.source.length;
    this.inEdges = Array.from({ length: n }, () => []);
    this.outEdges = Array.from({ length: n }, () => []);
    const order = Array.from({ length: m }, (_, e) => e).sort((a, b) => Math.abs(g.edges.weight[b]) - Math.abs(g.edges.weight[a]));
    for (const e of order) {
      this.inEdges[g.edges.target[e]].push(e);
      this.outEdges[g.edges.source[e]].push(e);
    }
    this.maxW = 0;
    for (let e = 0; e < m; e++) this.maxW = Math.max(this.maxW, Math.abs(g.edges.weight[e]));
    this.hover = -1;
    this.selected = -1;
    this.highlight = new Set();
    this.buildGrid();
    this.setThresholds(nodeThreshold, edgeThreshold);
    stats.graph = { nodes: n, edges: m };
    this.fit();
  }

  buildGrid() {
    this.cell = 24;
    this.grid = new Map();
    const { x, y } = this.lay;
    for (let i = 0; i < x.length; i++) {
      const key = `${Math.floor(x[i] / this.cell)},${Math.floor(y[i] / this.cell)}`;
      if (!this.grid.has(key)) this.grid.set(key, []);
      this.grid.get(key).push(i);
    }
  }

  // Re-prune in the browser: a node is shown when its cumulative influence share is within
  // the node threshold (tokens and logits always), an edge when both ends are shown and its
  // cumulative |weight| share is within the edge threshold.
  setThresholds(nodeT, edgeT) {
    const g = this.g;
    if (!g) return;
    this.nodeThreshold = nodeT;
    this.edgeThreshold = edgeT;
    const n = g.nodes.id.length, m = g.edges.source.length;
    this.visible = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const k = g.nodes.kind[i];
      this.visible[i] = k === "token" || k === "logit" || g.nodes.cum[i] <= nodeT + 1e-9 ? 1 : 0;
    }
    this.buckets = Array.from({ length: 2 * N_BUCKETS }, () => []);
    let shown = 0;
    for (let e = 0; e < m; e++) {
      const s = g.edges.source[e], t = g.edges.target[e];
      if (!this.visible[s] || !this.visible[t] || g.edges.cum[e] > edgeT + 1e-9) continue;
      const w = g.edges.weight[e];
      const b = Math.min(N_BUCKETS - 1, Math.floor((Math.abs(w) / (this.maxW || 1)) * N_BUCKETS));
      this.buckets[(w >= 0 ? 0 : N_BUCKETS) + b].push(e);
      shown++;
    }
    let nShown = 0;
    for (let i = 0; i < n; i++) nShown += this.visible[i];
    this.counts = { nodes: nShown, edges: shown };
    this.request(true);
  }

  fit() {
    if (!this.g) return;
    const r = this.base.parentElement.getBoundingClientRect();
    const k = Math.min(r.width / (this.lay.width + 80), r.height / (this.lay.height + 40));
    const t = zoomIdentity.translate((r.width - this.lay.width * k) / 2 + 20 * k, (r.height - this.lay.height * k) / 2).scale(k);
    select(this.overlay).call(this.zoom.transform, t);
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

  worldTransform(ctx) {
    const d = this.dpr || 1;
    ctx.setTransform(d * this.t.k, 0, 0, d * this.t.k, d * this.t.x, d * this.t.y);
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

  drawBase() {
    const t0 = performance.now();
    const ctx = this.base.getContext("2d");
    const d = this.dpr || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.base.width, this.base.height);
    if (!this.g) return;
    const g = this.g, { x, y } = this.lay, k = this.t.k;
    this.worldTransform(ctx);
    // row bands
    ctx.fillStyle = "#f7f8fa";
    for (let r = 0; r < this.lay.rows; r += 2) ctx.fillRect(-40, r * this.lay.rowH, this.lay.width + 80, this.lay.rowH);
    // edges, one path per (sign, strength) bucket
    for (let b = 0; b < 2 * N_BUCKETS; b++) {
      const list = this.buckets[b];
      if (!list.length) continue;
      const strength = (b % N_BUCKETS) / (N_BUCKETS - 1);
      ctx.strokeStyle = `rgba(${b < N_BUCKETS ? POS : NEG}, ${0.18 + 0.6 * strength})`;
      ctx.lineWidth = (0.6 + 2.6 * strength) / k;
      ctx.beginPath();
      for (const e of list) {
        const s = g.edges.source[e], tg = g.edges.target[e];
        ctx.moveTo(x[s], y[s]);
        ctx.lineTo(x[tg], y[tg]);
      }
      ctx.stroke();
    }
    // nodes
    const rad = Math.max(1.5 / k, Math.min(4.5, 7 / k));
    for (const kind of ["feature", "error", "token", "logit"]) {
      ctx.fillStyle = KIND_COLOR[kind];
      ctx.beginPath();
      for (let i = 0; i < x.length; i++) {
        if (!this.visible[i] || g.nodes.kind[i] !== kind) continue;
        if (kind === "error") ctx.rect(x[i] - rad, y[i] - rad, 2 * rad, 2 * rad);
        else { ctx.moveTo(x[i] + rad, y[i]); ctx.arc(x[i], y[i], rad, 0, 2 * Math.PI); }
      }
      ctx.fill();
    }
    // labels in screen pixels: tokens, logits, layer names; feature text when zoomed in
    ctx.setTransform(d, 0, 0, d, 0, 0);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillStyle = "#1d232b";
    const sx = (i) => this.t.x + x[i] * k, sy = (i) => this.t.y + y[i] * k;
    for (let i = 0; i < x.length; i++) {
      const kind = g.nodes.kind[i];
      if (!this.visible[i]) continue;
      if (kind === "token") ctx.fillText(g.nodes.text[i], sx(i), sy(i) + 16);
      else if (kind === "logit") ctx.fillText(g.nodes.text[i], sx(i), sy(i) - 9);
      else if (kind === "feature" && k > 2.2 && g.nodes.text[i]) ctx.fillText(g.nodes.text[i].slice(0, 18), sx(i), sy(i) + 13);
    }
    ctx.textAlign = "left";
    ctx.fillStyle = "#6a7381";
    for (let r = 0; r < this.lay.rows; r++) {
      const name = r === 0 ? "emb" : r === this.lay.rows - 1 ? "logit" : `L${r - 1}`;
      ctx.fillText(name, 4, this.t.y + ((this.lay.rows - 1 - r) * this.lay.rowH + this.lay.rowH / 2) * k + 4);
    }
    if (this.counts && this.counts.edges > FAST_EDGES) this.keepSnapshot();
    const ms = performance.now() - t0;
    stats.base.push(ms);
    if (stats.base.length > 500) stats.base.shift();
    if (stats.firstRender === null) stats.firstRender = performance.now();
  }

  drawOverlay() {
    const t0 = performance.now();
    const ctx = this.overlay.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
    if (!this.g) return;
    const g = this.g, { x, y } = this.lay, k = this.t.k;
    this.worldTransform(ctx);
    const focus = this.hover >= 0 ? this.hover : this.selected;
    if (focus >= 0) {
      for (const [list, color] of [[this.inEdges[focus], "#e07b00"], [this.outEdges[focus], "#0f8a6a"]]) {
        ctx.strokeStyle = color;
        for (const e of list.slice(0, 400)) {
          const w = Math.abs(g.edges.weight[e]) / (this.maxW || 1);
          ctx.lineWidth = (1 + 3 * w) / k;
          ctx.beginPath();
          ctx.moveTo(x[g.edges.source[e]], y[g.edges.source[e]]);
          ctx.lineTo(x[g.edges.target[e]], y[g.edges.target[e]]);
          ctx.stroke();
        }
      }
    }
    const ring = (i, color, r, width) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = width / k;
      ctx.beginPath();
      ctx.arc(x[i], y[i], r / k, 0, 2 * Math.PI);
      ctx.stroke();
    };
    for (const i of this.highlight) ring(i, "#e8b400", 10, 3);
    for (const i of this.pinned) ring(i, this.grouped.has(i) ? "#c2185b" : "#7a3fa0", 8, 2.5);
    if (this.selected >= 0) ring(this.selected, "#111", 9, 2.5);
    if (this.hover >= 0) ring(this.hover, "#e07b00", 9, 2);
    stats.overlay.push(performance.now() - t0);
    if (stats.overlay.length > 500) stats.overlay.shift();
  }

  toWorld(e) {
    const r = this.overlay.getBoundingClientRect();
    return [(e.clientX - r.left - this.t.x) / this.t.k, (e.clientY - r.top - this.t.y) / this.t.k];
  }

  pick(e) {
    if (!this.g) return -1;
    const [wx, wy] = this.toWorld(e);
    const maxD = Math.max(6, 9 / this.t.k);
    let best = -1, bestD = maxD * maxD;
    const cx = Math.floor(wx / this.cell), cy = Math.floor(wy / this.cell);
    const reach = Math.ceil(maxD / this.cell);
    for (let gx = cx - reach; gx <= cx + reach; gx++) {
      for (let gy = cy - reach; gy <= cy + reach; gy++) {
        for (const i of this.grid.get(`${gx},${gy}`) || []) {
          if (!this.visible[i]) continue;
          const dx = this.lay.x[i] - wx, dy = this.lay.y[i] - wy, dd = dx * dx + dy * dy;
          if (dd < bestD) { bestD = dd; best = i; }
        }
      }
    }
    return best;
  }

  onMove(e) {
    const i = this.pick(e);
    this.setHover(i, e);
  }

  setHover(i, e) {
    if (i !== this.hover) {
      this.hover = i;
      this.request(false);
      this.cb.onHover(i);
    }
    if (i < 0) { this.tooltip.hidden = true; return; }
    if (e) {
      const r = this.overlay.getBoundingClientRect();
      this.tooltip.style.left = `${Math.min(r.width - 330, e.clientX - r.left + 14)}px`;
      this.tooltip.style.top = `${e.clientY - r.top + 14}px`;
    }
  }

  screenPos(i) {
    const r = this.overlay.getBoundingClientRect();
    return [r.left + this.t.x + this.lay.x[i] * this.t.k, r.top + this.t.y + this.lay.y[i] * this.t.k];
  }
}
