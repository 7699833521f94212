"""Named training recipes: the command-line defaults of ``transcoders train``.

A recipe is a plain dict of training options (the flags of ``circuit-atlas transcoders train``
without dashes). The demo's transcoder cache is keyed by a hash of the recipe it trains with
(``tracer.fetch.default_transcoder_path``), so changing a default here retrains instead of
reusing a transcoder trained under the old one.
"""

from __future__ import annotations

# The demo's training corpus. A WordNet + public-domain mix ("wordnet:0.5,public:0.5", issue 26)
# was tried with the per-layer recipe below: held-out NMSE 0.426 and replacement 0.40-0.52 on
# the demo prompts (circuit-tracer convention) after 220 steps on a loaded CPU, against 0.386
# and 0.54-0.71 for the public corpus at 200 steps (benchmarks/README.md, "The demo"); so the
# public-domain texts stay the default and the mix is one --corpus away.
DEFAULT_CORPUS = "public"

# The default recipe for SmolLM2-135M on a 2-core CPU (docs/training.md).
# Chosen by measurement (issue 3 notes): a skip connection fitted by ridge regression starts
# the reconstruction at the best linear map, so the features only learn what it misses; lr 1e-3
# (4e-3 drifted and spiked after ~100 steps); a buffer of 8,192 tokens so the ridge fit is not
# underdetermined (2,048 tokens for d=576 left held-out NMSE at 0.67-0.85), used twice.
# Per-layer skip transcoders of 2,048 features (k=32: 1.6% density) since issue 26: at equal
# steps they matched the 256-feature CLT's held-out NMSE (0.386 vs 0.392) with a median firing
# frequency of 0.79% (CLT: 11.1%), a higher meaning score (0.949 vs 0.922) and a step 4x cheaper
# with row-sparse updates (benchmarks/training_recipes.md, train_speed.md).
DEFAULT_RECIPE = {
    "kind": "plt",
    "features_per_layer": 2048,
    "activation": "topk",
    "topk": 32,
    "skip": True,
    "batch_tokens": 256,
    "lr": 1e-3,
    "buffer_tokens": 8192,
    "passes": 2,
    "budget_minutes": 20.0,
    "dead_window_tokens": 4096,
    "eval_every": 100,
    # Massive MLP outputs out of the loss only (transcoders.training.outliers): left out of the skip
    # fit too, they cost the demo graphs' replacement score 0.15 (benchmarks/
    # training_outlier_parts.md: 0.600 with the loss alone, 0.454 with the skip fit alone).
    "outlier_rule": "ratio",
    "outlier_factor": 50.0,
    "outlier_uses": "loss",
    "heldout_seqs": 32,
}
