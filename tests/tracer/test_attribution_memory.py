"""Attribution at scale: lazy decoders read only active rows, the row store's placements and
the position-split sweeps give the same graph, the memory plan counts what attribution holds,
and budgets that cannot fit are refused with the budget that would."""

from __future__ import annotations

import importlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.attribution import (
    AttributionMemoryError,
    CausalColumns,
    FrozenLinearModel,
    RowStore,
    attribute,
    estimate_memory,
    plan_memory,
)
from tracer.attribution.memory import CAUSAL_SHARE
from tracer.replacement import ReplacementModel
from transcoders.formats import load_transcoder, save_transcoder

# The module (its name is shadowed by the function in tracer.attribution).
attribute_mod = importlib.import_module("tracer.attribution.attribute")
TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13, 60, 3, 8])


def same_graph(a, b):
    for name in ("kind", "layer", "position", "feature", "target", "source", "weight"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.fixture(scope="module")
def lazy_setup(tmp_path_factory):
    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 64, seed=4)
    path = tmp_path_factory.mktemp("clt") / "clt"
    save_transcoder(clt, path, format="circuit-tracer")
    return model, path


def test_lazy_transcoder_reads_only_active_rows(lazy_setup):
    """A lazily loaded CLT (circuit-tracer layout on disk) never loads a whole decoder: only the
    rows of active features are read, and the graph equals the eager load's, edge for edge."""
    model, path = lazy_setup
    eager = load_transcoder(path, lazy=False)
    lazy = load_transcoder(path, lazy=True)
    # The identity fingerprint reads a fixed sample of decoder rows once (transcoders.identity);
    # take it first, so that what is counted below is what attribution reads.
    assert lazy.identity.id == eager.identity.id
    reads: dict[int, list[int]] = {i: [] for i in range(3)}
    for i in range(3):
        rows = lazy._lazy_rows[i]
        assert rows is not None  # circuit-tracer layout reads rows

        def counting(idx, i=i, rows=rows):
            reads[i].extend(idx.tolist())
            return rows(idx)

        def whole(i=i):
            raise AssertionError(f"the whole decoder of layer {i} was loaded")

        lazy._lazy_rows[i] = counting
        lazy._lazy_dec[i] = whole
    rm_lazy = ReplacementModel(model, lazy)
    g_lazy = attribute(rm_lazy, TOKENS, progress=False, max_feature_nodes=25, batch_size=8)
    g_eager = attribute(ReplacementModel(model, eager), TOKENS, progress=False,
                        max_feature_nodes=25, batch_size=8)  # fmt: skip
    same_graph(g_lazy, g_eager)
    state = rm_lazy.record(TOKENS)
    n_before = {i: len(r) for i, r in reads.items()}
    lin = FrozenLinearModel(rm_lazy, state)  # what attribution reads: once per active feature
    for i in range(3):
        active = state.feat_index[state.feat_layer == i].unique().tolist()
        assert 0 < len(active) < 64
        assert set(reads[i]) == set(active)  # no inactive feature's row is ever read
        assert sorted(reads[i][n_before[i] :]) == active  # each active row exactly once
        assert not lazy.decoder_loaded(i)
    n_unique = sum(len(state.feat_index[state.feat_layer == i].unique()) for i in range(3))
    assert lin.decoders.n_rows_read == n_unique


def test_row_store_placements_and_position_split_agree(lazy_setup, tmp_path):
    """Rows in host memory or in a memory-mapped file, and sweeps split into single rows by the
    working-memory cap, give the same graph as the default."""
    model, path = lazy_setup
    rm = ReplacementModel(model, load_transcoder(path))
    base = attribute(rm, TOKENS, progress=False, max_feature_nodes=30, batch_size=16)
    disk = attribute(rm, TOKENS, progress=False, max_feature_nodes=30, batch_size=16,
                     row_store="disk", spill_dir=str(tmp_path))  # fmt: skip
    split = attribute(rm, TOKENS, progress=False, max_feature_nodes=30, batch_size=16,
                      sweep_memory_mb=1e-6)  # fmt: skip
    same_graph(base, disk)
    assert base.count("feature") == 30
    # Each graph records the plan it followed, with where its rows lived.
    assert base.extra["memory_estimate"]["row_store_placement"] == "host"
    assert disk.extra["memory_estimate"]["row_store_placement"] == "disk"
    assert disk.extra["memory_estimate"]["max_feature_nodes"] == 30
    assert f"on {disk.extra['memory_estimate']['row_store_placement']}" in disk.extra["memory_plan"]
    # A different split changes only float summation order inside the BLAS calls.
    assert np.array_equal(split.target, base.target) and np.array_equal(split.source, base.source)
    np.testing.assert_allclose(split.weight, base.weight, rtol=1e-5, atol=1e-6)
    assert list(tmp_path.iterdir()) == []  # the spill file is gone


def dense_influence(A: np.ndarray, node: np.ndarray, logit_w: np.ndarray, n_feat: int):
    """Influence of every feature column, computed densely in float64: rows normalised by
    their |row| sums, logit weights propagated through the feature rows' targets."""
    N = np.abs(A) / np.maximum(np.abs(A).sum(1, keepdims=True), 1e-300)
    N[np.abs(A).sum(1) == 0] = 0
    x = np.where(node < 0, logit_w[np.maximum(-1 - node, 0)], 0.0)
    total = np.zeros(len(node))
    feat_rows = np.flatnonzero(node >= 0)
    while x.sum() > 1e-12:
        total += x
        y = np.zeros(len(node))
        y[feat_rows] = N[:, node[feat_rows]].T @ x
        x = y
    return N[:, :n_feat].T @ total


@pytest.mark.parametrize("placement", ["device", "disk"])
def test_row_store_packs_rows_causally(placement, tmp_path):
    """Rows cut to the columns their targets can receive from (earlier or same position, lower
    layer) read back exactly as the dense rows (any columns, any order), take only those
    columns' bytes, and give the dense influence."""
    gen = torch.Generator().manual_seed(0)
    L, P, n_rest = 3, 4, 7
    # Feature columns in pm order: sorted by position, then layer.
    pos = torch.tensor([0] * 5 + [1] * 9 + [2] * 12 + [3] * 14)
    layer = torch.cat([torch.sort(torch.randint(0, L, (n,), generator=gen)).values
                       for n in (5, 9, 12, 14)])  # fmt: skip
    n_feat = len(pos)
    causal = CausalColumns(pos, layer, L, P)
    t_layer = torch.tensor([L, L, 0, 1, 2, 2, 1, 2])  # two logit rows, then feature rows
    t_pos = torch.tensor([P - 1, P - 1, 3, 1, 2, 3, 0, 1])
    node = torch.tensor([-1, -2, 3, 17, 0, 30, 8, 22])
    dense = torch.randn(len(node), n_feat + n_rest, generator=gen)
    keep = (pos[None, :] <= t_pos[:, None]) & (layer[None, :] < t_layer[:, None])
    dense[:, :n_feat][~keep] = 0.0  # causally zero
    cpu = torch.device("cpu")
    store = RowStore(10, n_feat + n_rest, n_feat=n_feat, causal=causal, device=cpu,
                     placement=placement, spill_dir=tmp_path)  # fmt: skip
    for lo, hi in ((0, 3), (3, 8)):
        store.add(node[lo:hi], lambda buf, lo=lo, hi=hi: buf.copy_(dense[lo:hi]),
                  layer=t_layer[lo:hi], pos=t_pos[lo:hi])  # fmt: skip
    assert store.used_bytes == int(keep.sum() + len(node) * n_rest) * 4 < store.nbytes
    cols = torch.tensor([46, 0, 39, 12, 40, 24, 5])
    order = torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])
    got = torch.cat([block for _, block in store.chunks(cols, order=order)])
    torch.testing.assert_close(got, dense[order][:, cols], rtol=0, atol=0)
    got = torch.cat([block for _, block in store.chunks()])
    torch.testing.assert_close(got, dense, rtol=0, atol=0)
    lw = np.array([0.7, 0.3])
    want = dense_influence(dense.double().numpy(), node.numpy(), lw, n_feat)
    got = store.influence(torch.tensor(lw), n_feat).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="needs each row's target layer and position"):
        store.add(node[:1], lambda buf: None)
    with pytest.raises(ValueError, match="row store full"):
        store.add(node[:3], lambda buf: None, layer=t_layer[:3], pos=t_pos[:3])
    store.close()
    assert list(tmp_path.iterdir()) == []


def _rss_file_mb() -> float:
    """This process's resident file-backed memory (RssFile of /proc/self/status), MB."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_disk_rows_leave_the_process_resident_memory(tmp_path):
    """Rows spilled to disk do not stay in the process's resident memory: writing 128 MB of rows
    and reading them back (chunks, influence) leaves RssFile within a few MB of where it was,
    and the rows read back exactly. Control: touching the mapping without releasing it makes
    RssFile grow by those 128 MB, so the measurement can see the pages."""
    n_rows, n_cols = 128, 2**18  # 128 rows x 1 MB
    store = RowStore(n_rows, n_cols, device=torch.device("cpu"), placement="disk",
                     spill_dir=tmp_path)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**30, (n_rows,), generator=gen)

    def row(r):
        return torch.randn(n_cols, generator=torch.Generator().manual_seed(int(seeds[r])))

    before = _rss_file_mb()
    for r0 in range(0, n_rows, 16):
        rows = torch.stack([row(r) for r in range(r0, r0 + 16)])
        store.add(torch.arange(r0, r0 + 16) % 7, lambda buf, rows=rows: buf.copy_(rows))
    after_write = _rss_file_mb()
    for idx, block in store.chunks(slice(0, n_cols, 4096)):
        for i, r in enumerate(idx.tolist()):
            assert torch.equal(block[i], row(r)[::4096])
    store.influence(torch.ones(7, dtype=torch.float64), 0)
    after_read = _rss_file_mb()
    assert after_write - before < 16 and after_read - before < 16, (before, after_write,
                                                                     after_read)  # fmt: skip
    float(store.flat[: store.used].sum())  # touch every page, no release
    assert _rss_file_mb() - before > 100
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_attribution_stores_rows_causally(lazy_setup):
    """Attribution keeps, for each feature row, the features at its position or before and at
    lower layers: the stored bytes are exactly those, well under the full-width buffer, and
    the graph equals the one a full-width store gives."""
    model, path = lazy_setup
    rm = ReplacementModel(model, load_transcoder(path))
    g = attribute(rm, TOKENS, progress=False)  # no budget: a row for every active feature
    state = rm.record(TOKENS)
    lin = FrozenLinearModel(rm, state)
    pos, lay = state.feat_pos.cpu(), state.feat_layer.cpu()
    # Features each target can receive from, counted independently of the pm numbering.
    width = ((pos[None, :] <= pos[:, None]) & (lay[None, :] < lay[:, None])).sum(1)
    n_logit = g.count("logit")
    n_rest = lin.n_cols - lin.n_feat
    want = (int(width.sum()) + n_logit * lin.n_feat + (len(pos) + n_logit) * n_rest) * 4
    assert g.extra["row_store_bytes"] == want
    assert want < 0.5 * (len(pos) + n_logit) * lin.n_cols * 4


def test_memory_plan_counts_what_attribution_holds(lazy_setup):
    model, path = lazy_setup
    tc = load_transcoder(path)
    rm = ReplacementModel(model, tc)
    est = estimate_memory(model, tc, TOKENS, 20, max_n_logits=10)
    state = rm.record(TOKENS)
    assert est.workload.n_active == state.n_active  # the encoder pass counts exactly
    assert est.workload.counted == "an encoder pass"
    lin = FrozenLinearModel(rm, state)
    assert est.decoder_bytes == lin.decoders.nbytes
    assert est.n_cols == lin.n_cols
    assert est.row_store_buffer_bytes == (20 + 10) * lin.n_cols * 4
    # Host pages are taken as rows are written: logit rows full width, feature rows causal.
    n_rest = lin.n_cols - lin.n_feat
    causal = 10 * lin.n_cols + 20 * (CAUSAL_SHARE * lin.n_feat + n_rest)
    assert est.row_store_bytes == int(causal * 4)
    # The suggested budget is the largest that fits the memory given to the plan (here a
    # 256-token prompt with 160k active features on 30 layers, 3 GB available).
    big = replace(est.workload, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_head=64,
                  vocab_size=49152, n_features=256, n_tokens=256, n_active=160_000,
                  active_targets=160_000 * 15, unique_row_elems=7680 * 15 * 576)  # fmt: skip
    kw = dict(baseline_host_bytes=0, available_host_bytes=3e9)
    s = plan_memory(big, 8192, **kw).suggested_max_feature_nodes
    assert 0 < s < 8192
    at, above = plan_memory(big, s, **kw), plan_memory(big, s + 1, **kw)
    assert at.fits and at.row_store_placement == "host"
    # One more row and the rows spill to a memory-mapped file (it still runs) ...
    assert above.fits and above.row_store_placement == "disk"
    assert not plan_memory(big, s + 1, placement="host", **kw).fits
    # ... until even the rest does not fit.
    assert not plan_memory(big, 8192, baseline_host_bytes=0, available_host_bytes=1e9).fits
    # Rows dominate: peak memory grows with budget x active features.
    p1, p2 = (plan_memory(big, b, **kw).peak_host_bytes for b in (1000, 2000))
    assert p2 - p1 == pytest.approx(1000 * (CAUSAL_SHARE * 160_000 + 31 * 256) * 4, rel=0.1)
    # From a token count: the transcoder's recorded L0 (none recorded here: a clear error).
    with pytest.raises(ValueError, match="give the prompt"):
        estimate_memory(model, tc, 10, 20)
    tc.cfg.training["metrics"] = {"l0": 3.0}
    by_l0 = estimate_memory(model, tc, 10, 20)
    assert by_l0.workload.n_active == 3 * 9 * 3 and "L0" in by_l0.workload.counted


def test_budget_that_cannot_fit(lazy_setup):
    model, path = lazy_setup
    rm = ReplacementModel(model, load_transcoder(path))
    with pytest.raises(AttributionMemoryError, match=r"budget 40 needs .* no feature budget fits"):
        attribute(rm, TOKENS, progress=False, max_feature_nodes=40, memory_limit_gb=1e-9)
    # With fit_budget the plan's suggestion is used instead, and recorded in the graph.
    state = rm.record(TOKENS)
    est = estimate_memory(model, rm.transcoder, TOKENS, 40)
    limit = (est.peak_host_bytes - est.baseline_host_bytes) * 0.7 / 1e9
    g = attribute(rm, TOKENS, progress=False, max_feature_nodes=40, memory_limit_gb=limit,
                  fit_budget=True)  # fmt: skip
    assert 0 < g.params["max_feature_nodes"] < 40 <= state.n_active
    assert g.count("feature") == g.params["max_feature_nodes"]


def test_out_of_memory_names_the_estimate(lazy_setup, monkeypatch):
    model, path = lazy_setup
    rm = ReplacementModel(model, load_transcoder(path))
    from tracer.attribution import rows

    def no_memory(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rows.RowStore, "add", no_memory)
    with pytest.raises(AttributionMemoryError, match=r"plan was: .*--max-feature-nodes \d+"):
        attribute(rm, TOKENS, progress=False, max_feature_nodes=10)


def test_memory_phases_are_measured_without_changing_the_graph(lazy_setup, monkeypatch):
    """With ``profile_memory`` each phase's peak is recorded, in order; a phase that holds a
    known block shows it in its own peak only; the graph is the unprofiled one."""
    from tracer.attribution import memory_phases as phases_mod

    if not phases_mod.reset_host_peak():
        pytest.skip("this kernel does not allow resetting the resident high-water mark")
    model, path = lazy_setup
    rm = ReplacementModel(model, load_transcoder(path))
    base = attribute(rm, TOKENS, progress=False, max_feature_nodes=20, batch_size=8)
    assert "memory_phases" not in base.extra
    block = 256 * 2**20  # held only while the graph's scores are computed
    real_scores = attribute_mod.graph_scores

    def scores_holding_a_block(graph):
        held = np.ones(block // 8)  # every page written: resident
        out = real_scores(graph)
        del held
        return out

    monkeypatch.setattr(attribute_mod, "graph_scores", scores_holding_a_block)
    g = attribute(rm, TOKENS, progress=False, max_feature_nodes=20, batch_size=8,
                  profile_memory=True)  # fmt: skip
    same_graph(g, base)
    assert "profile_memory" not in g.params  # how to run, not what was computed
    names = [p["phase"] for p in g.extra["memory_phases"]]
    assert names == ["record", "view and targets", "logit rows", "feature rows", "edges",
                     "scores"]  # fmt: skip
    peak = {p["phase"]: p["host_peak_mb"] for p in g.extra["memory_phases"]}
    others = max(v for k, v in peak.items() if k != "scores")
    assert peak["scores"] - others > 0.9 * block / 2**20
