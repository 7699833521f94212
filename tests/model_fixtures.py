"""Builders shared by the tests: tiny random models of every supported architecture and
small random transcoders. (Fixtures that use them live in conftest.py.)"""

from __future__ import annotations

import torch

TINY_VOCAB = 101


class TinyTokenizer:
    """A stand-in tokenizer for random tiny models: one character = one token."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [3 + (ord(c) % (TINY_VOCAB - 3)) for c in text]
        return {"input_ids": ids}

    def decode(self, ids, **_):
        return "".join(chr(97 + (int(i) % 26)) for i in ids)


def tiny_config(model_type: str, n_layers: int = 3):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    if model_type == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=n_layers, n_head=4, vocab_size=TINY_VOCAB, n_positions=64,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    cls = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "gemma3_text": Gemma3TextConfig,
    }[model_type]
    return cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=TINY_VOCAB, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


TINY_TYPES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2")


def make_tiny_model(model_type: str, n_layers: int = 3, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from tracer.model import LanguageModel

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(model_type, n_layers), dtype=torch.float32)
    # Random norm gains so frozen-norm bugs cannot hide behind gains of exactly one (or zero).
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return LanguageModel(hf, TinyTokenizer(), name=f"tiny-{model_type}")


def make_random_clt(n_layers, d_model, n_features=16, kind="clt", seed=0, skip=False,
                    input_site="mlp_in", activation="jumprelu"):  # fmt: skip
    """A random CLT whose thresholds leave a fair share of features active
    (``transcoders.random_init``; drawn from torch's default generator seeded with ``seed``,
    so the tests' later draws follow from it as they always have)."""
    from transcoders.clt import TranscoderConfig
    from transcoders.random_init import random_transcoder

    cfg = TranscoderConfig(
        n_layers=n_layers, d_model=d_model, n_features=n_features, kind=kind, skip=skip,
        input_site=input_site, activation=activation, topk=4 if activation == "topk" else None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return random_transcoder(cfg, generator=torch.default_generator)


def keyed_edges(graph) -> tuple[set, dict]:
    """A graph's node keys (kind, layer, position, feature) and its edges keyed by
    (target key, source key): how graphs from two runs are compared edge by edge."""
    keys = list(
        zip(graph.kind.tolist(), graph.layer.tolist(), graph.position.tolist(),
            graph.feature.tolist(), strict=True)
    )  # fmt: skip
    edges = {
        (keys[t], keys[s]): w
        for t, s, w in zip(graph.target, graph.source, graph.weight, strict=True)
    }
    return set(keys), edges


def tiny_training_run(steps: int = 3):
    """A tiny random Llama (2 layers, d 32), random token rows [12, 9] starting with BOS, and
    a TopK recipe of ``steps`` steps: ``(model, tokens, cfg)`` for quick training runs."""
    from transcoders.training.run import TrainConfig

    model = make_tiny_model("llama", n_layers=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, TINY_VOCAB, (12, 9), generator=g)
    tokens[:, 0] = 1
    cfg = TrainConfig(
        n_features=16, topk=4, steps=steps, batch_tokens=32, buffer_tokens=64,
        eval_every=steps, log_every=steps, n_heldout_seqs=2, harvest_batch=4, auxk=4,
    )  # fmt: skip
    return model, tokens, cfg


def save_small_smollm2(smollm2_full, root, n_features: int = 32, seed: int = 3):
    """SmolLM2 cut to 2 layers saved as a normal HF folder ``root/model``, and a random CLT for
    it (thresholds 0.1) in the circuit-tracer layout at ``root/clt``; returns both paths."""
    from pathlib import Path

    from tracer.model import truncate_layers
    from transcoders.formats import save_transcoder

    root = Path(root)
    small = truncate_layers(smollm2_full, 2)
    small.hf.save_pretrained(root / "model")
    small.tokenizer.save_pretrained(root / "model")
    clt = make_random_clt(2, 576, n_features, seed=seed)
    with torch.no_grad():
        clt.threshold.fill_(0.1)
    save_transcoder(clt, root / "clt", format="circuit-tracer")
    return root / "model", root / "clt"


def save_tiny_folder(root):
    """A tiny random Llama (2 layers, d_model 32) with SmolLM2's tokenizer saved as a model
    folder ``root/model``, and a random CLT for it (32 features) in the circuit-tracer layout
    at ``root/clt``: real text prompts for command-line tests at tiny-model cost."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tracer.fetch import fetch_smollm2
    from transcoders.formats import save_transcoder

    root = Path(root)
    tok = AutoTokenizer.from_pretrained(fetch_smollm2())
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      vocab_size=len(tok), max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    save_transcoder(make_random_clt(2, 32, 32), root / "clt")
    return root


def hand_graph(kinds, layers, positions, features, acts, edges, logit_weights=None):
    """A Graph from node lists and (target, source, weight) edges (4 prompt tokens, model 'm',
    transcoder 'tc'); logit weights default to equal shares of the logit nodes."""
    import numpy as np

    from tracer.graph import LOGIT, Graph

    n = len(kinds)
    t, s, w = (np.array(x) for x in zip(*edges, strict=True)) if edges else ([], [], [])
    lw = np.zeros(n) if logit_weights is None else np.asarray(logit_weights, float)
    if logit_weights is None:
        logits = [i for i, k in enumerate(kinds) if k == LOGIT]
        lw[logits] = 1.0 / len(logits)
    return Graph(
        prompt="planted", tokens=[1, 5, 6, 7], token_strings=["<s>", "a", "b", "c"],
        model_name="m", transcoder_name="tc", n_layers=4,
        kind=np.array(kinds, np.int8), layer=np.array(layers, np.int32),
        position=np.array(positions, np.int32), feature=np.array(features, np.int64),
        activation=np.array(acts, np.float32), probability=np.zeros(n, np.float32),
        target=np.asarray(t, np.int32), source=np.asarray(s, np.int32),
        weight=np.asarray(w, np.float32), logit_weights=lw.astype(np.float32),
    )  # fmt: skip
