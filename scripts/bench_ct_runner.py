"""One circuit-tracer attribution run, timed, for scripts/bench_attribution.py.

Runs ONLY under the separate circuit-tracer virtual environment (circuit-tracer==0.5.0 with its
own torch / transformers / transformer-lens); it imports nothing from circuit-atlas, and
circuit-atlas never imports it. The main benchmark script starts it as a subprocess so that its
peak memory is measured on its own:

    CT_VENV/bin/python scripts/bench_ct_runner.py --model-dir M --clt-dir C \
        --tokens 1,504,... --out run.npz [--max-feature-nodes N] [--n-layers L] \
        [--prune 0.8:0.98,0.5:0.9]

Writes ``run.npz``: the graph's nonzero edges (COO: target, source, weight; A[target, source]
as circuit-tracer's adjacency, rows = targets), its node keys (kind, layer, position,
feature-or-token), and a JSON string of timings (seconds), peak resident memory (MB) and
counts.

With ``--prune`` (node:edge threshold pairs; scripts/bench_conventions.py) it also applies
circuit-tracer's own ``prune_graph`` and ``compute_graph_scores`` to that graph, once as
shipped (float32) and once with torch's default dtype float64 (the same code, without float32
rounding), and writes per dtype ``{dtype}_influence`` [N] (``compute_node_influence``),
``{dtype}_replacement`` / ``{dtype}_completeness``, and per pair i ``{dtype}_node_mask_{i}``
[N] and ``{dtype}_edge_mask_{i}`` [E] (the edge mask at the stored edges, both ends kept), with
the node and edge cuts (``find_threshold``) and the kept entries the edge mask holds beyond
those (zero entries, dropped ends) in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

from proc_stats import cpu_s, hwm_mb, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

# Nothing may be downloaded: the model folder and the CLT are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FEATURE, ERROR, TOKEN, LOGIT = 0, 1, 2, 3  # node kinds, as in the main script


def model_folder_for_old_transformers(src: Path, dst: Path) -> Path:
    """A view of the model folder that transformers 4.x reads correctly.

    The cached folder was written by transformers 5, which stores ``rope_theta`` under
    ``rope_parameters``; transformers 4.57 ignores that key and would silently use its default
    rope_theta (10000 instead of SmolLM2's 100000). The copy restores the top-level key and
    the tokenizer class name; the weights and tokenizer.json are symlinked, not copied.
    """
    dst.mkdir(parents=True, exist_ok=True)
    rewritten = ("config.json", "tokenizer_config.json")
    for f in src.iterdir():
        if f.name in rewritten:
            continue
        link = dst / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    # transformers 5 names its generic fast tokenizer 'TokenizersBackend'; 4.x calls the same
    # class (backed by tokenizer.json) 'PreTrainedTokenizerFast'.
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    if tcfg.get("tokenizer_class") == "TokenizersBackend":
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return dst


def read_hooks(clt_dir: Path) -> tuple[str, str]:
    """feature_input_hook / feature_output_hook from the CLT folder's config.yaml."""
    import yaml

    cfg = yaml.safe_load((clt_dir / "config.yaml").read_text())
    return cfg["feature_input_hook"], cfg["feature_output_hook"]


def ct_prune(graph, pairs: list[tuple[float, float]], tgt, src) -> tuple[dict, dict]:
    """circuit-tracer's ``prune_graph`` / ``compute_graph_scores`` on ``graph`` for each
    (node, edge) threshold pair, in float32 (as shipped) and float64: (arrays, JSON facts).

    The cuts are recomputed with circuit-tracer's ``find_threshold`` for the record (the
    benchmark reports how far a differing node or edge lies from them); the masks are
    ``prune_graph``'s own."""
    import copy

    import torch
    from circuit_tracer.graph import (
        compute_edge_influence,
        compute_graph_scores,
        compute_node_influence,
        find_threshold,
        prune_graph,
    )

    arrays, facts = {}, {}
    n_tok, n_logit = len(graph.input_tokens), len(graph.logit_targets)
    default = torch.get_default_dtype()
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        torch.set_default_dtype(dtype)  # prune_graph makes its logit weights in the default
        try:
            g = copy.copy(graph)
            g.adjacency_matrix = graph.adjacency_matrix.to(dtype)
            g.logit_probabilities = graph.logit_probabilities.to(dtype)
            A = g.adjacency_matrix
            w = torch.zeros(A.shape[0])
            w[-n_logit:] = g.logit_probabilities
            infl = compute_node_influence(A, w)
            rep, comp = compute_graph_scores(g)
            arrays[f"{name}_influence"] = infl.numpy()
            arrays[f"{name}_replacement"] = rep
            arrays[f"{name}_completeness"] = comp
            runs = []
            for i, (node_t, edge_t) in enumerate(pairs):
                t0 = time.perf_counter()
                res = prune_graph(g, node_threshold=node_t, edge_threshold=edge_t)
                prune_s = time.perf_counter() - t0
                nm, em = res.node_mask, res.edge_mask
                ends = nm[:, None] & nm[None, :]
                # The cuts as prune_graph finds them (before its clean-up).
                node_cut = find_threshold(infl, node_t)
                nm0 = infl >= node_cut
                nm0[-n_logit - n_tok :] = True
                pm = A.clone()
                pm[~nm0] = 0
                pm[:, ~nm0] = 0
                escore = compute_edge_influence(pm, w)
                edge_cut = find_threshold(escore.flatten(), edge_t)
                arrays[f"{name}_node_mask_{i}"] = nm.numpy()
                arrays[f"{name}_edge_mask_{i}"] = (em & ends)[tgt, src].numpy()
                arrays[f"{name}_edge_score_{i}"] = escore[tgt, src].numpy()
                runs.append({
                    "node_threshold": node_t,
                    "edge_threshold": edge_t,
                    "node_cut": float(node_cut),
                    "edge_cut": float(edge_cut),
                    "nodes_kept": int(nm.sum()),
                    "edges_kept": int((em & ends & (A != 0)).sum()),
                    "mask_entries_on_zero_weights": int((em & (A == 0)).sum()),
                    "mask_entries_with_a_dropped_end": int((em & ~ends & (A != 0)).sum()),
                    "prune_s": round(prune_s, 3),
                })  # fmt: skip
            facts[name] = {"replacement": rep, "completeness": comp, "runs": runs}
        finally:
            torch.set_default_dtype(default)
    return arrays, facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, type=Path, help="local HF model folder")
    ap.add_argument("--clt-dir", required=True, type=Path, help="CLT in circuit-tracer layout")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids, start token first")
    ap.add_argument("--out", required=True, type=Path, help="output .npz")
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--prune", default=None, help="node:edge threshold pairs, comma-separated")
    args = ap.parse_args()

    import circuit_tracer
    import numpy as np
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = args.out.parent / (args.out.stem + "-model")
    folder = model_folder_for_old_transformers(args.model_dir, work / "SmolLM2-135M-Instruct")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    in_hook, out_hook = read_hooks(args.clt_dir)
    # circuit-tracer's own defaults for a CLT: lazy decoder, eager encoder (here float32).
    clt = load_clt(
        str(args.clt_dir), feature_input_hook=in_hook, feature_output_hook=out_hook,
        device=torch.device("cpu"), dtype=torch.float32,
    )  # fmt: skip
    # SmolLM2 is not in TransformerLens's list of official models, but its config reader takes
    # a local folder (config.json, architecture LlamaForCausalLM) and its weight converter
    # takes the loaded HF model: naming the folder as an official model is all it needs.
    from transformer_lens import loading_from_pretrained as tl_loading

    tl_loading.OFFICIAL_MODEL_NAMES.append(str(folder))
    # Its generic Llama config leaves rotary_base at 10000 (it sets the base only for the
    # Llama models it names); SmolLM2 uses rope_theta 100000. Without this the forward pass
    # is a different model (logits off by several units).
    rope_theta = float(json.loads((folder / "config.json").read_text())["rope_theta"])
    convert = tl_loading.convert_hf_model_config

    def convert_with_rope(name, **kw):
        cfg = convert(name, **kw)
        cfg["rotary_base"] = rope_theta
        return cfg

    tl_loading.convert_hf_model_config = convert_with_rope
    rm = ReplacementModel.from_pretrained_and_transcoders(
        model_name=str(folder), transcoders=clt, backend="transformerlens",
        device=torch.device("cpu"), dtype=torch.float32, hf_model=hf, tokenizer=tok,
        first_n_layers=args.n_layers,
    )  # fmt: skip
    del hf
    load_s = time.perf_counter() - t_start

    tokens = torch.tensor([int(t) for t in args.tokens.split(",")], dtype=torch.long)
    gc.collect()
    load_peak = peak_rss_mb()  # read first: the reset below clears it too
    rss_before, hwm_reset = rss_mb(), reset_peak_rss()
    c0, t0 = cpu_s(), time.perf_counter()
    graph = attribute(
        tokens, rm, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes
    )
    wall = time.perf_counter() - t0
    cpu = cpu_s() - c0
    rss_graph = hwm_mb() if hwm_reset else peak_rss_mb()

    A = graph.adjacency_matrix
    L, P = rm.cfg.n_layers, len(graph.input_tokens)
    af = graph.active_features[graph.selected_features]  # [n, 3] (layer, pos, feature)
    n_f, n_l = len(af), len(graph.logit_targets)
    logit_ids = [int(t.vocab_idx) for t in graph.logit_targets]
    kind = np.r_[
        np.full(n_f, FEATURE), np.full(L * P, ERROR), np.full(P, TOKEN), np.full(n_l, LOGIT)
    ]
    layer = np.r_[af[:, 0].numpy(), np.repeat(np.arange(L), P), np.full(P, -1), np.full(n_l, L)]
    pos = np.r_[af[:, 1].numpy(), np.tile(np.arange(P), L), np.arange(P), np.full(n_l, P - 1)]
    feat = np.r_[af[:, 2].numpy(), np.full(L * P, -1), graph.input_tokens.numpy(), logit_ids]
    assert A.shape == (len(kind), len(kind)), (A.shape, len(kind))
    tgt, src = torch.nonzero(A, as_tuple=True)
    info = {
        "engine": f"circuit-tracer {circuit_tracer.__version__}"
        if hasattr(circuit_tracer, "__version__")
        else "circuit-tracer",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(rss_graph, 1),
        "peak_rss_is_attribution_only": hwm_reset,
        "rss_before_attribution_mb": round(rss_before, 1),
        "process_peak_rss_mb": round(max(load_peak, peak_rss_mb()), 1),
        "n_active_features": int(len(graph.active_features)),
        "n_nodes": int(len(kind)),
        "n_edges": int(len(tgt)),
        "feature_input_hook": in_hook,
        "feature_output_hook": out_hook,
        "logit_probabilities": [float(p) for p in graph.logit_probabilities],
        "batch_size": args.batch_size,
        "max_feature_nodes": args.max_feature_nodes,
    }
    pruned: dict = {}
    if args.prune:
        pairs = [tuple(float(x) for x in p.split(":")) for p in args.prune.split(",")]
        pruned, info["prune"] = ct_prune(graph, pairs, tgt, src)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        kind=kind.astype(np.int8), layer=layer.astype(np.int32), position=pos.astype(np.int32),
        feature=feat.astype(np.int64), target=tgt.numpy().astype(np.int32),
        source=src.numpy().astype(np.int32), weight=A[tgt, src].numpy().astype(np.float32),
        activation=graph.activation_values[graph.selected_features].numpy()
        if len(graph.activation_values) == len(graph.active_features)
        else graph.activation_values.numpy(),
        info=json.dumps(info), **pruned,
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
