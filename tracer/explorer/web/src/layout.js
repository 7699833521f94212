// Where each node sits: layers as rows (token embeddings at the bottom, logits at the top),
// token positions as columns; the nodes of one (layer, position) cell side by side, most
// influential in the middle.

const MIN_ROW_H = 44;
const MAX_ROW_H = 150;
const GAP = 13; // world units between nodes of a cell
const SUB_ROW = 11; // world units between wrapped lines of a crowded cell

export function rowOf(kind, layer, nLayers) {
  if (kind === "token") return 0;
  if (kind === "logit") return nLayers + 1;
  return layer + 1;
}

// aspect: the canvas's height / width; rows grow (within limits) so the graph fills it.
export function layoutGraph(g, aspect = 0.6) {
  const n = g.nodes.id.length;
  const P = g.tokens.length;
  const rows = g.n_layers + 2;
  const cells = new Map();
  for (let i = 0; i < n; i++) {
    const r = rowOf(g.nodes.kind[i], g.nodes.layer[i], g.n_layers);
    const key = r * P + g.nodes.position[i];
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  }
  const maxInCol = new Array(P).fill(1);
  for (const [key, list] of cells) {
    const p = key % P;
    maxInCol[p] = Math.max(maxInCol[p], list.length);
  }
  const perLine = 12; // nodes per line before a cell wraps
  const colW = maxInCol.map((m) => Math.max(96, Math.min(m, perLine) * GAP + 24));
  const colX = [];
  let acc = 0;
  for (let p = 0; p < P; p++) { colX.push(acc + colW[p] / 2); acc += colW[p]; }
  const rowH = Math.max(MIN_ROW_H, Math.min(MAX_ROW_H, (aspect * acc) / rows));
  const x = new Float32Array(n), y = new Float32Array(n);
  const kindOrder = { feature: 0, error: 1, token: 2, logit: 3 };
  for (const [key, list] of cells) {
    const r = Math.floor(key / P), p = key % P;
    list.sort((a, b) => (kindOrder[g.nodes.kind[a]] - kindOrder[g.nodes.kind[b]]) || (g.nodes.influence[b] - g.nodes.influence[a]));
    const lines = Math.ceil(list.length / perLine);
    list.forEach((i, k) => {
      const line = Math.floor(k / perLine), inLine = Math.min(perLine, list.length - line * perLine);
      const slot = k - line * perLine;
      // centre-out order: the most influential node in the middle of its line
      const offset = slot % 2 === 0 ? slot / 2 : -(slot + 1) / 2;
      const shift = inLine % 2 === 0 ? 0.5 : 0;
      x[i] = colX[p] + (offset + shift) * GAP;
      y[i] = (rows - 1 - r) * rowH + rowH / 2 + (line - (lines - 1) / 2) * SUB_ROW;
    });
  }
  return { x, y, width: acc, height: rows * rowH, rows, rowH, colX, colW };
}
