"""Graph-store test helpers: a store on the session's ArcadeDB server (tests/conftest.py starts
it once per test session on a free loopback port in a fresh temporary folder), small graphs."""

from __future__ import annotations

import numpy as np
import pytest

from graphstore import GraphStore
from graphstore.synthetic import SyntheticConfig, synthetic_graph

# Small graphs with a small shared vocabulary: features recur across prompts, tests stay fast.
SMALL = SyntheticConfig(
    n_layers=6,
    vocab_per_layer=40,
    zipf_a=1.0,
    prompt_tokens=(4, 7),
    features=(25, 45),
    errors=(3, 6),
    logits=(2, 4),
    in_degree=(2, 6),
    transcoder_name="clt-test@00000000c1700001",
    model_name="model-test",
)


@pytest.fixture
def store(server_auth, tmp_path):
    s = GraphStore(
        server_auth["uri"],
        server_auth["user"],
        server_auth["password"],
        server_auth["database"],
        archive_dir=tmp_path / "archive",
    )
    yield s
    s.close()


def wipe(store: GraphStore) -> None:
    """Remove every graph, complete or not (features stay: queries reach them only through
    complete graphs)."""
    res = store.cypher("MATCH (g:Graph) RETURN g.id AS id")
    for (gid,) in res.rows:
        store.delete(gid)
    leftover = store.cypher("MATCH (n:Node) RETURN count(n) AS c").rows[0][0]
    assert leftover == 0


def small_graph(seed: int, **overrides):
    return synthetic_graph(seed, SMALL, **overrides)


def assert_graphs_equal(a, b) -> None:
    for name in (
        "kind", "layer", "position", "feature", "activation", "probability", "logit_weights",
        "target", "source", "weight",
    ):  # fmt: skip
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in (
        "prompt", "tokens", "token_strings", "model_name", "transcoder_name", "n_layers",
        "params", "scores", "extra",
    ):  # fmt: skip
        assert getattr(a, name) == getattr(b, name), name


def recurring_expected(graphs, min_prompts: int) -> list[list]:
    """What ``recurring-features`` should return, computed from the Graph objects: rows
    [layer, index, prompts, graphs, nodes] of features in >= ``min_prompts`` prompts, ordered as
    the query orders them."""
    from collections import defaultdict

    from graphstore import graph_id, prompt_id
    from tracer.graph import FEATURE

    agg = defaultdict(lambda: [set(), set(), 0])
    for g in graphs:
        for i in np.flatnonzero(g.kind == FEATURE):
            a = agg[(int(g.layer[i]), int(g.feature[i]))]
            a[0].add(prompt_id(g))
            a[1].add(graph_id(g))
            a[2] += 1
    rows = [
        [k[0], k[1], len(p), len(gs), n] for k, (p, gs, n) in agg.items() if len(p) >= min_prompts
    ]
    rows.sort(key=lambda r: (-r[2], -r[3], r[0], r[1]))
    return rows
