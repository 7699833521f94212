"""Shared fixtures: tiny random models of every supported architecture, the real SmolLM2
truncated to a few layers, and small random transcoders for them."""

from __future__ import annotations

import os

import pytest
import torch
from model_fixtures import TINY_TYPES, make_tiny_model

# Two cores in CI: keep torch from oversubscribing them when pytest runs beside a server.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=TINY_TYPES)
def tiny_model(request):
    """A tiny random model of each supported architecture (3 layers, d_model 32)."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_full():
    """The real SmolLM2-135M-Instruct (built once from its PyPI package, then cached)."""
    from tracer.model import LanguageModel

    return LanguageModel.load("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_full):
    """SmolLM2 truncated to its first 4 layers."""
    from tracer.model import truncate_layers

    return truncate_layers(smollm2_full, 4)


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2):
    """The 4-layer SmolLM2 with its weights rounded to bfloat16 (and computing in bfloat16)."""
    from tracer.model import truncate_layers

    return truncate_layers(smollm2, 4).to(dtype="bfloat16")


@pytest.fixture(scope="session")
def smollm2_bf16_as_f32(smollm2_bf16):
    """The same bfloat16-rounded weights in float32 (every value exact), computing in float32:
    the reference a bfloat16 run is compared against."""
    from tracer.model import truncate_layers

    return truncate_layers(smollm2_bf16, 4).to(dtype="float32")


@pytest.fixture(scope="session")
def gemma3_full():
    """The real Gemma-3-270M (built once from its PyPI chunk packages, then cached)."""
    from tracer.model import LanguageModel

    return LanguageModel.load("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3(gemma3_full):
    """Gemma-3-270M truncated to its first 6 layers: layers 0-4 use sliding-window attention,
    layer 5 global attention (the first prefix with both kinds)."""
    from tracer.model import truncate_layers

    return truncate_layers(gemma3_full, 6)


@pytest.fixture(scope="session")
def arcadedb_server(tmp_path_factory):
    """A real ArcadeDB server for the graph-store and explorer tests: started once per test
    session on a free loopback port in a fresh temporary folder (a fresh database), stopped at
    the end."""
    from graphstore import LocalServer
    from graphstore.server import free_port

    home = tmp_path_factory.mktemp("graphstore") / "store"
    server = LocalServer(home, bolt_port=free_port(), heap="1g")
    info = server.start(timeout=180)
    yield server, info
    assert server.stop(), "the test server was not running at teardown"


@pytest.fixture(scope="session")
def server_auth(arcadedb_server):
    from graphstore.server import ROOT_USER

    server, info = arcadedb_server
    return {
        "uri": info.uri,
        "user": ROOT_USER,
        "password": server.password(),
        "database": info.database,
    }
