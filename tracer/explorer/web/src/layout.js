// Where each shown node sits: token positions as columns, layers as rows (token embeddings at
// the bottom, logits at the top). The nodes of one (layer, position) cell sit side by side,
// most influential in the middle, wrapping onto further lines; each row is as tall as its most
// crowded cell needs and each column as wide, so no two nodes ever share a place: centres are
// at least GAP apart in a line and SUB_ROW apart between lines, both more than 2 * NODE_R.

export const NODE_R = 4; // node radius, world units
export const GAP = 12; // between the centres of neighbours in a line
export const SUB_ROW = 11; // between wrapped lines of a cell
const PER_LINE = 8; // nodes per line before a cell wraps
const MIN_COL_W = 64;
const COL_PAD = 18;
const MIN_ROW_H = 30;
const ROW_PAD = 14;
const MAX_ROW_H = 140;

export function rowOf(kind, layer, nLayers) {
  if (kind === "token") return 0;
  if (kind === "logit") return nLayers + 1;
  return layer + 1;
}

// g: the graph payload; shown: Uint8Array [n] (1 = placed; others get NaN); aspect: the free
// canvas area's height / width (rows grow, within limits, so the graph fills it).
export function layoutGraph(g, shown, aspect = 0.6) {
  const n = g.nodes.id.length;
  const P = g.tokens.length;
  const rows = g.n_layers + 2;
  const cells = new Map();
  for (let i = 0; i < n; i++) {
    if (!shown[i]) continue;
    const r = rowOf(g.nodes.kind[i], g.nodes.layer[i], g.n_layers);
    const key = r * P + g.nodes.position[i];
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  }
  const perLine = new Array(P).fill(1);
  for (const [key, list] of cells) perLine[key % P] = Math.max(perLine[key % P], Math.min(PER_LINE, list.length));
  const colW = perLine.map((m) => Math.max(MIN_COL_W, m * GAP + COL_PAD));
  const colX = [];
  let width = 0;
  for (let p = 0; p < P; p++) { colX.push(width + colW[p] / 2); width += colW[p]; }
  const rowLines = new Array(rows).fill(1);
  for (const [key, list] of cells) {
    const r = Math.floor(key / P), p = key % P;
    rowLines[r] = Math.max(rowLines[r], Math.ceil(list.length / perLine[p]));
  }
  const rowH = rowLines.map((l) => Math.max(MIN_ROW_H, l * SUB_ROW + ROW_PAD));
  let height = rowH.reduce((a, b) => a + b, 0);
  if (height < aspect * width) {
    const extra = (aspect * width - height) / rows;
    for (let r = 0; r < rows; r++) rowH[r] = Math.max(rowH[r], Math.min(MAX_ROW_H, rowH[r] + extra));
    height = rowH.reduce((a, b) => a + b, 0);
  }
  // wrapped lines spread over the row's height (room for labels between them), at least SUB_ROW
  const lineGap = rowH.map((h, r) => Math.max(SUB_ROW, Math.min(26, (h - ROW_PAD) / rowLines[r])));
  // row 0 (tokens) at the bottom
  const rowTop = new Array(rows);
  let acc = 0;
  for (let r = rows - 1; r >= 0; r--) { rowTop[r] = acc; acc += rowH[r]; }
  const x = new Float32Array(n).fill(NaN), y = new Float32Array(n).fill(NaN);
  const kindOrder = { feature: 0, error: 1, token: 2, logit: 3 };
  for (const [key, list] of cells) {
    const r = Math.floor(key / P), p = key % P, per = perLine[p];
    list.sort((a, b) => (kindOrder[g.nodes.kind[a]] - kindOrder[g.nodes.kind[b]]) || (g.nodes.influence[b] - g.nodes.influence[a]) || (a - b));
    const lines = Math.ceil(list.length / per);
    list.forEach((i, k) => {
      const line = Math.floor(k / per), inLine = Math.min(per, list.length - line * per);
      const slot = k - line * per;
      // centre-out: the most influential node of a line in its middle
      const offset = slot % 2 === 0 ? slot / 2 : -(slot + 1) / 2;
      const shift = inLine % 2 === 0 ? 0.5 : 0;
      x[i] = colX[p] + (offset + shift) * GAP;
      y[i] = rowTop[r] + rowH[r] / 2 + (line - (lines - 1) / 2) * lineGap[r];
    });
  }
  return { x, y, width, height, rows, rowTop, rowH, colX, colW };
}
