"""The training benchmark's variants (scripts/bench_training.py): widths and ``--variant``
options become `transcoders train` options that the command line accepts, and the markdown
table reads one row per variant."""

from __future__ import annotations

import argparse

import pytest
from bench_scripts import load_script

from tracer.cli import build_parser

bench = load_script("bench_training")


def _args(**kw):
    return argparse.Namespace(**{"widths": None, "variant": [], **kw})


def test_widths_and_variants_become_train_options():
    got = bench.variants_from_args(
        _args(widths="256,1024", variant=["none=--outlier-rule none", "parts=--outlier-uses loss"])
    )
    assert got == [
        ("256", ["--features-per-layer", "256"]),
        ("1024", ["--features-per-layer", "1024"]),
        ("none", ["--outlier-rule", "none"]),
        ("parts", ["--outlier-uses", "loss"]),
    ]
    base = ["transcoders", "train", "--steps", "3"]
    parsed = [build_parser().parse_args(base + opts) for _, opts in got]
    assert [p.features_per_layer for p in parsed[:2]] == [256, 1024]
    assert parsed[2].outlier_rule == "none" and parsed[3].outlier_uses == "loss"


def test_a_variant_without_a_name_is_refused():
    with pytest.raises(SystemExit, match="NAME='OPTIONS'"):
        bench.variants_from_args(_args(variant=["--outlier-rule none"]))


def test_variants_table_has_a_row_per_variant_and_names_failures():
    row = {
        "variant": "none", "features": 256, "steps": 600, "passes": 1.4, "train_tokens_per_s": 300,
        "nmse": 0.35, "nmse_all": 0.36, "nmse_inliers": 0.3, "l0": 30.0, "dead_heldout": 0.01,
        "spliced": {"kl": 1.5, "top1": 0.4}, "load_average_start": [1.0, 1.0, 1.0],
        "graph_scores": {"replacement": 0.61, "completeness": 0.86},
    }  # fmt: skip
    report = {
        "harvest": {"cache": "c", "tokens": 1000, "seconds": 60},
        "budget_minutes_per_variant": 15,
        "extra_options": ["--steps", "600"],
        "machine": {"cpus": 2, "torch_threads": 1},
        "variants": [
            row,
            {"variant": "wide", "features": 4096, "error": "too slow", "load_average_start": [1.0]},
        ],  # fmt: skip
    }
    md = bench.variants_markdown(report)
    assert "| none | clt | 256 | 600 | 1.4 | 300 | nan | 0.350 (0.360 / 0.300) |" in md
    assert "| 0.610 | 0.860 | nan | nan% | 1.0 |" in md
    row.update(
        kind="plt", step_seconds=0.85, frequency={"median": 0.0089, "share_dense": 0.007},
        meaning={"mean_best_auroc": 0.71, "token_level_share": 0.25},
    )  # fmt: skip
    md = bench.variants_markdown(report)
    assert "| none | plt | 256 | 600 | 1.4 | 300 | 0.85 | 0.350 (0.360 / 0.300) |" in md
    assert "| 1.0% | 0.89% | 0.7% | 1.500 | 40.0% | 0.610 | 0.860 | 0.710 | 25.0% | 1.0 |" in md
    assert "| wide | | 4096 | did not run: too slow" in md
    assert "`--steps 600`" in md
