"""The trace command: one prompt, and many prompts in worker processes with caching."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import save_small_smollm2

from tracer.batch import TraceJob, read_prompts, trace_many, transcoder_identity_at
from tracer.cli import main
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
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and any(f.endswith(".full.parquet") for f in files)
    full = Graph.load(next(out.glob("*.full.parquet")))
    pruned = Graph.load(next(p for p in out.glob("*.parquet") if ".full." not in p.name))
    assert pruned.n_nodes < full.n_nodes and pruned.params["pruned"]
    # The screen names the model's own top token (checked by an ordinary forward pass) with its
    # probability, and the pruned circuit's counts.
    from tracer.graph import LOGIT
    from tracer.model import LanguageModel

    model = LanguageModel.load(str(small_model_dir / "model"))
    probs = model.run(model.tokenize("The capital of France is")).logits[0, -1].softmax(-1)
    top_id = int(probs.argmax())
    logits = np.flatnonzero(full.kind == LOGIT)
    top = logits[np.argmax(full.probability[logits])]
    assert int(full.feature[top]) == top_id
    name = full.extra["token_text"][str(top_id)]
    assert f"  p={float(probs[top_id]):.3f}  {name!r}" in text.splitlines()
    assert (
        f"pruned circuit: {pruned.n_nodes} nodes ({pruned.count('feature')} features), "
        f"{pruned.n_edges} edges"
    ) in text.splitlines()


def test_trace_many_workers_and_cache(small_model_dir, tmp_path):
    prompts = ["The capital of France is", "One, two, three,", "The opposite of hot is"]
    f = tmp_path / "prompts.txt"
    f.write_text("# demo\n" + "\n".join(prompts) + "\n")
    assert read_prompts(f) == prompts
    clt_dir = str(small_model_dir / "clt")
    job = TraceJob(model=str(small_model_dir / "model"), transcoders=clt_dir,
                   out=str(tmp_path / "g"),
                   transcoder_id=transcoder_identity_at(clt_dir))  # fmt: skip
    first = trace_many(job, prompts, workers=2)
    assert [r.prompt for r in first] == prompts and all(r.status == "traced" for r in first)
    again = trace_many(job, prompts, workers=2)
    assert all(r.status == "cached" for r in again)
    # The same prompt traced in-process gives the same graph as the worker did.
    from tracer.batch import load_replacement, trace_one

    rm = load_replacement(job.model, job.transcoders)
    pruned, full, _, _ = trace_one(
        TraceJob(model=job.model, transcoders=job.transcoders, out=str(tmp_path / "h"),
                 transcoder_id=job.transcoder_id),
        prompts[1], rm,
    )  # fmt: skip
    worker_full = Graph.load(first[1].full_path)
    np.testing.assert_allclose(worker_full.weight, full.weight, rtol=1e-5, atol=1e-6)


def test_cache_follows_transcoder_identity_not_path(small_model_dir, tmp_path):
    """A copy of the CLT elsewhere reuses the cached graph; a retrained CLT written to the same
    path does not (its fingerprint differs), and its graph names the new identity."""
    import shutil

    import torch
    from model_fixtures import make_random_clt

    from transcoders.formats import save_transcoder

    model = str(small_model_dir / "model")
    prompt = "The opposite of hot is"
    clt_dir = tmp_path / "clt"
    shutil.copytree(small_model_dir / "clt", clt_dir)
    out = str(tmp_path / "graphs")

    def run(path):
        job = TraceJob(model=model, transcoders=str(path), out=out,
                       transcoder_id=transcoder_identity_at(str(path)))  # fmt: skip
        return job, trace_many(job, [prompt])[0]

    job1, r1 = run(clt_dir)
    assert r1.status == "traced"
    assert Graph.load(r1.full_path).transcoder_name == job1.transcoder_id
    copy = tmp_path / "elsewhere" / "same-clt"
    shutil.copytree(clt_dir, copy)
    job2, r2 = run(copy)
    assert job2.transcoder_id == job1.transcoder_id
    assert r2.status == "cached" and r2.pruned_path == r1.pruned_path
    retrained = make_random_clt(2, 576, 32, seed=4)  # another training run, same shape
    with torch.no_grad():
        retrained.threshold.fill_(0.1)
    save_transcoder(retrained, clt_dir, format="circuit-tracer", overwrite=True)
    job3, r3 = run(clt_dir)
    assert job3.transcoder_id != job1.transcoder_id
    assert r3.status == "traced" and r3.pruned_path != r1.pruned_path
    assert Graph.load(r3.full_path).transcoder_name == job3.transcoder_id


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


def test_trace_convention_is_recorded_and_shown(small_model_dir, tmp_path, capsys):
    """Both conventions on one prompt: the same edges, the scores of each convention (checked
    against graph_scores), named in the summary and recorded in both graphs' parameters."""
    from tracer.prune import graph_scores

    out = tmp_path / "graphs"
    base = ["trace", "The capital of France is", "--model", str(small_model_dir / "model"),
            "--transcoders", str(small_model_dir / "clt"), "--out", str(out)]  # fmt: skip
    seen = {}
    for conv in ("circuit-tracer", "atlas"):
        before = set(out.glob("*.parquet")) if out.exists() else set()
        assert main(base + ([] if conv == "circuit-tracer" else ["--convention", conv])) == 0
        text = capsys.readouterr().out
        assert f"scores ({conv} convention)" in text
        new = set(out.glob("*.parquet")) - before
        assert len(new) == 2  # its own files: the convention is part of the cache key
        full = Graph.load(next(p for p in new if ".full." in p.name))
        pruned = Graph.load(next(p for p in new if ".full." not in p.name))
        assert full.params["convention"] == pruned.params["convention"] == conv
        expect = graph_scores(full, conv)
        for k in ("replacement", "completeness"):
            assert pruned.scores[k] == full.scores[k] == pytest.approx(expect[k], abs=1e-12)
            assert f"{k} {expect[k]:.3f}" in text
        seen[conv] = (full, pruned)
    (ct_full, ct), (at_full, at) = seen["circuit-tracer"], seen["atlas"]
    np.testing.assert_array_equal(ct_full.weight, at_full.weight)
    # The start position's MLP output is an error node in atlas only: the scores differ.
    assert ct.scores["replacement"] != pytest.approx(at.scores["replacement"], abs=1e-6)
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--convention", "neuronpedia"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
