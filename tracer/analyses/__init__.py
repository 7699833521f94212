"""Analyses of attribution graphs: validation by perturbation, supernodes and their
check, contrasts, swaps, global weights, paths, scores of prompts. May import the
engine (tracer) and transcoders, never graphstore."""

from __future__ import annotations

from transcoders.lazy_exports import install

# public name -> the module that holds it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "validate": "tracer.analyses.validate",
    "ValidationConfig": "tracer.analyses.validate",
    "ValidationError": "tracer.analyses.validate",
    "find_supernodes": "tracer.analyses.supernodes",
    "Supernode": "tracer.analyses.supernodes",
    "validate_supernodes": "tracer.analyses.supernode_check",
    "contrast": "tracer.analyses.contrast",
    "Contrast": "tracer.analyses.contrast",
    "swap": "tracer.analyses.swap",
    "concept_swaps": "tracer.analyses.swap",
    "global_weights": "tracer.analyses.global_weights",
    "paths": "tracer.analyses.paths",
    "k_best_paths": "tracer.analyses.paths",
    "check_prompts": "tracer.analyses.prompt_check",
    "feature_cards": "tracer.analyses.feature_topics",
    "feature_topic": "tracer.analyses.feature_topics",
}

install(__name__, _EXPORTS)
