"""The trace command: one prompt, and many prompts in worker processes with caching."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import save_small_smollm2

from tracer.cli import main
from tracer.cli.trace_cmd import TraceJob, read_prompts, trace_many
from tracer.graph import Graph


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, smollm2_full):
    """SmolLM2 cut to 2 layers, saved as a normal HF folder, plus a random CLT for it."""
    root = tmp_path_factory.mktemp("trace")
    save_small_smollm2(smollm2_full, root)
    return root


def test_trace_one_prompt_cli(small_model_dir, tmp_path, capsys):
    out = tmp_path / "graphs"
    rc = main(["trace", "The capital of France is", "--model", str(small_model_dir / "model"),
               "--transcoders", str(small_model_dir / "clt"), "--out", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "' Paris'" in text or "top logits" in text
    assert "pruned circuit" in text and "replacement" in text
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and any(f.endswith(".full.parquet") for f in files)
    full = Graph.load(next(out.glob("*.full.parquet")))
    pruned = Graph.load(next(p for p in out.glob("*.parquet") if ".full." not in p.name))
    assert pruned.n_nodes < full.n_nodes and pruned.params["pruned"]


def test_trace_many_workers_and_cache(small_model_dir, tmp_path):
    prompts = ["The capital of France is", "One, two, three,", "The opposite of hot is"]
    f = tmp_path / "prompts.txt"
    f.write_text("# demo\n" + "\n".join(prompts) + "\n")
    assert read_prompts(f) == prompts
    job = TraceJob(model=str(small_model_dir / "model"),
                   transcoders=str(small_model_dir / "clt"), out=str(tmp_path / "g"))  # fmt: skip
    first = trace_many(job, prompts, workers=2)
    assert [r.prompt for r in first] == prompts and all(r.status == "traced" for r in first)
    again = trace_many(job, prompts, workers=2)
    assert all(r.status == "cached" for r in again)
    # The same prompt traced in-process gives the same graph as the worker did.
    from tracer.cli.trace_cmd import load_replacement, trace_one

    rm = load_replacement(job.model, job.transcoders)
    pruned, full, _, _ = trace_one(
        TraceJob(model=job.model, transcoders=job.transcoders, out=str(tmp_path / "h")),
        prompts[1], rm,
    )  # fmt: skip
    worker_full = Graph.load(first[1].full_path)
    np.testing.assert_allclose(worker_full.weight, full.weight, rtol=1e-5, atol=1e-6)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_prompts(bad)
