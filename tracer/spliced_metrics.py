"""The model-facing glue of transcoder training: MLP activations for the harvest, and the
model with every MLP replaced by a transcoder (spliced evaluation).

Both go through :meth:`LanguageModel.run` / :func:`tracer.hooks.run_hooked`; nothing here
touches the model any other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transcoders.clt import CrossLayerTranscoder


@torch.no_grad()
def mlp_activations(model, tokens: torch.Tensor, input_site: str = "mlp_in"):
    """Every layer's transcoder input (``input_site``: ``mlp_in`` or ``resid_mid``) and MLP
    output for tokens [B, P]: two float32 tensors [L, B*P, d] on the model's device (row
    b*P + p is sequence b, position p)."""
    if input_site not in ("mlp_in", "resid_mid"):
        raise ValueError(f"input site {input_site!r}: use 'mlp_in' or 'resid_mid'")
    run = model.run(tokens, record_sites=(input_site, "mlp_out"))
    x, y = run.sites[input_site], run.sites["mlp_out"]  # [B, L, P, d]
    B, L, P, d = x.shape
    return (
        x.transpose(0, 1).reshape(L, B * P, d).float(),
        y.transpose(0, 1).reshape(L, B * P, d).float(),
    )


def activation_fn(model, input_site: str = "mlp_in"):
    """The ``activations(tokens) -> (inputs, outputs)`` callable the trainer streams from."""
    return lambda tokens: mlp_activations(model, tokens, input_site)


def splice_edits(clt: CrossLayerTranscoder, keep_bos: bool = True, store: dict | None = None):
    """run_hooked edits that replace every layer's MLP output by the transcoder's reconstruction
    from the inputs of *this* run (so errors compound through the layers, as in use).

    With ``keep_bos`` position 0 keeps the model's own MLP output (the trainer skips BOS: its
    outputs are outliers the attention sink depends on). ``store`` receives the activations.
    The transcoder computes on its own device in float32; reconstructions go back to the
    model's device and dtype."""
    L = clt.cfg.n_layers
    site = clt.cfg.input_site
    acts: list[torch.Tensor | None] = [None] * L
    inputs: list[torch.Tensor | None] = [None] * L

    def read_input(layer):
        def edit(x):
            xt = x.to(clt.device)  # a no-op when model and transcoder share a device
            inputs[layer] = xt
            acts[layer] = clt.activate(layer, clt.pre_activations(layer, xt))
            return x

        return edit

    def replace_output(layer):
        def edit(y):
            cd = acts[layer].dtype  # float32 (the transcoder's compute dtype)
            rec = clt.b_dec[layer].to(cd).expand_as(y).clone()
            for i in range(layer + 1):
                t = layer - i
                w = clt.decoder(i)
                if t < w.shape[1]:
                    rec = rec + acts[i] @ w[:, t].to(cd)
            if clt.W_skip is not None:
                rec = rec + inputs[layer].to(cd) @ clt.W_skip[layer].to(cd).T
            rec = rec.to(device=y.device, dtype=y.dtype)
            if keep_bos:
                rec = torch.cat([y[:, :1], rec[:, 1:]], dim=1)
            return rec

        return edit

    edits = {}
    for l in range(L):
        edits[(site, l)] = read_input(l)
        edits[("mlp_out", l)] = replace_output(l)
    if store is not None:
        store["acts"] = acts
    return edits


def _zero_mlp_edits(L: int, keep_bos: bool):
    def zero(y):
        z = torch.zeros_like(y)
        return torch.cat([y[:, :1], z[:, 1:]], dim=1) if keep_bos else z

    return {("mlp_out", l): zero for l in range(L)}


@dataclass
class SplicedMetrics:
    kl: float  # mean KL(model || spliced) over predicted positions, nats
    top1: float  # fraction of positions where the top next token agrees
    ce_clean: float
    ce_spliced: float
    ce_ablated: float  # every MLP output zeroed (BOS kept as in the splice)
    ce_recovered: float  # (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)

    def as_dict(self) -> dict:
        return {k: round(v, 5) for k, v in self.__dict__.items()}


@torch.no_grad()
def reference_logits(model, tokens: torch.Tensor, keep_bos: bool = True):
    """(clean, MLP-ablated) logits [B, P, vocab] for tokens [B, P]: what spliced runs are
    compared with (computed once per evaluation set)."""
    L = model.facts.n_layers
    clean = model.run(tokens, record=False).logits.float()
    ablated = model.run(tokens, edits=_zero_mlp_edits(L, keep_bos), record=False).logits.float()
    return clean, ablated


@torch.no_grad()
def spliced_metrics(
    model,
    clt: CrossLayerTranscoder,
    tokens: torch.Tensor,
    keep_bos: bool = True,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SplicedMetrics:
    """Compare the model with the model whose MLPs are all replaced by ``clt`` on tokens [B, P]
    (positions 1.. of each row are scored; next-token targets are the row's own tokens).
    ``reference`` is :func:`reference_logits` of the same tokens, if already computed."""
    clt.check_model(model.facts.n_layers, model.facts.d_model, model.facts.name)
    tokens = tokens.unsqueeze(0) if tokens.dim() == 1 else tokens
    clean, ablated = reference or reference_logits(model, tokens, keep_bos)
    spliced = model.run(tokens, edits=splice_edits(clt, keep_bos), record=False).logits.float()
    # Score positions 1..P-1 (position 0 is BOS, identical in all runs when kept).
    sl = slice(1, None)
    lp_clean = clean[:, sl].log_softmax(-1)
    lp_spl = spliced[:, sl].log_softmax(-1)
    kl = (lp_clean.exp() * (lp_clean - lp_spl)).sum(-1).mean()
    top1 = (clean[:, sl].argmax(-1) == spliced[:, sl].argmax(-1)).float().mean()
    tgt = tokens[:, 1:].to(clean.device)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    c_clean, c_spl, c_abl = ce(clean), ce(spliced), ce(ablated)
    gap = c_abl - c_clean
    # Undefined when removing the MLPs does not change the loss (e.g. tiny random models).
    rec = (c_abl - c_spl) / gap if gap.abs() > 1e-6 else torch.tensor(float("nan"))
    return SplicedMetrics(
        float(kl), float(top1), float(c_clean), float(c_spl), float(c_abl), float(rec)
    )


def spliced_eval_fn(model, tokens: torch.Tensor, keep_bos: bool = True):
    """The trainer's ``spliced_eval(clt) -> dict`` callback on fixed held-out tokens (the clean
    and ablated runs are computed on first use and reused)."""
    ref: list = []

    def evaluate(clt: CrossLayerTranscoder) -> dict:
        if not ref:
            ref.append(reference_logits(model, tokens, keep_bos))
        return spliced_metrics(model, clt, tokens, keep_bos, ref[0]).as_dict()

    return evaluate
