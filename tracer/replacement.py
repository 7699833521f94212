"""The local replacement model: a language model whose MLPs are read through a transcoder.

For one prompt, :meth:`ReplacementModel.record` runs the real model once and keeps what the
attribution freezes: attention patterns, norm denominators, every layer's MLP input and output,
the transcoder's active features, its reconstruction and the error node values

    error[l, p] = mlp_out[l, p] - reconstruction[l, p]   (decoder bias included in the recon)

so that reconstruction + error is exactly the real MLP output and the replacement's forward
equals the model's. With attention patterns and norm denominators frozen and every MLP output
replaced by (features x decoders + error), the model is linear in the node values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.hooks import Freeze, HookedRun
from tracer.model import LanguageModel
from transcoders.clt import CrossLayerTranscoder, compute_dtype
from transcoders.device import DeviceError, DeviceSetting


@dataclass
class PromptState:
    """What one prompt's run leaves behind. Unbatched; P = n_pos, L = n_layers.

    tokens [P]; logits [P, vocab]; sites: site -> [L, P, d] (resid_final: [P, d]);
    patterns [L, H, P, P]; scales: norm -> [L, P] (final_norm: [P]);
    inputs [L, P, d] (transcoder input site); pre [L, P, F] pre-activations;
    active features as parallel [n_active] arrays (sorted by layer, position, feature);
    recon / errors [L, P, d].

    Device and dtype: every tensor but ``tokens`` (CPU ids) is on the model's device. Floating
    tensors are in the compute dtype (float32; float64 for a float64 model) whatever the
    model's weights are, so a bfloat16 model's record meets float32 transcoder products and
    attribution sums without casts (its values are the bfloat16 activations, exactly).
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    sites: dict[str, torch.Tensor]
    patterns: torch.Tensor
    scales: dict[str, torch.Tensor]
    inputs: torch.Tensor
    pre: torch.Tensor
    feat_layer: torch.Tensor
    feat_pos: torch.Tensor
    feat_index: torch.Tensor
    feat_value: torch.Tensor
    recon: torch.Tensor
    errors: torch.Tensor

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_active(self) -> int:
        return int(self.feat_layer.shape[0])

    def freeze(self) -> Freeze:
        """Attention patterns and every norm denominator, fixed at this prompt's values."""
        return Freeze(patterns=self.patterns, scales=dict(self.scales))


class ReplacementModel:
    """A :class:`LanguageModel` with a transcoder standing in for its MLPs.

    ``exclude_bos`` (default True, as circuit-tracer): features at position 0 (the start token,
    whose activations are outsized and uninformative) are not nodes; that position's MLP output
    goes to its error node instead.
    """

    def __init__(
        self, model: LanguageModel, transcoder: CrossLayerTranscoder, *, exclude_bos: bool = True
    ):
        transcoder.check_model(model.facts.n_layers, model.facts.d_model, model.facts.name)
        if transcoder.device != model.device:
            raise DeviceError(
                f"the transcoder is on {transcoder.device} but the model on {model.device}: "
                "load both with the same device (e.g. load_transcoder(..., device=model.setting))"
            )
        self.model = model
        self.transcoder = transcoder
        self.exclude_bos = exclude_bos
        for p in transcoder.parameters():
            p.requires_grad_(False)

    @property
    def setting(self) -> DeviceSetting:
        """Where the model computes and its weights' dtype (the transcoder is on the same
        device; see :meth:`to`)."""
        return self.model.setting

    def to(
        self,
        device: str | torch.device | DeviceSetting | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ReplacementModel:
        """Move model and transcoder (in place) to ``device`` and convert their weights to
        ``dtype``; returns self. Lazy decoders follow when they are read."""
        self.model.to(device, dtype)
        self.transcoder.to(device=self.model.device, dtype=self.model.dtype)
        return self

    @property
    def input_site(self) -> str:
        return self.transcoder.cfg.input_site

    def feature_mask(self, n_pos: int) -> torch.Tensor:
        """[n_pos] bool: positions whose features may be nodes."""
        mask = torch.ones(n_pos, dtype=torch.bool)
        if self.exclude_bos and n_pos > 0:
            mask[0] = False
        return mask

    @torch.no_grad()
    def record(self, tokens: torch.Tensor) -> PromptState:
        """Run the real model on tokens [P] and keep everything attribution freezes (on the
        model's device, in the compute dtype: see :class:`PromptState`)."""
        tokens = torch.as_tensor(tokens).long().cpu()
        run: HookedRun = self.model.run(tokens)
        cd = compute_dtype(self.model.dtype)

        def c(t: torch.Tensor) -> torch.Tensor:
            return t.to(cd)  # a no-op for a float32 model

        sites = {k: c(v[0]) for k, v in run.sites.items()}
        scales = {k: c(v[0]) for k, v in run.scales.items()}
        inputs = sites[self.input_site]  # [L, P, d]
        tc = self.transcoder
        L = self.model.facts.n_layers
        pre = torch.stack([tc.pre_activations(l, inputs[l]) for l in range(L)])  # [L, P, F]
        acts = torch.stack([tc.activate(l, pre[l]) for l in range(L)])
        acts[:, ~self.feature_mask(len(tokens))] = 0.0
        nz = acts.nonzero(as_tuple=False)  # sorted by (layer, pos, feature)
        value = acts[nz[:, 0], nz[:, 1], nz[:, 2]]
        # Only the active features' decoder rows are read (a lazy transcoder loads no others).
        recon = tc.affine((len(tokens),), inputs) + tc.decode_sparse(
            nz[:, 0], nz[:, 1], nz[:, 2], value, n_pos=len(tokens)
        )  # [L, P, d]
        errors = sites["mlp_out"] - recon
        return PromptState(
            tokens=tokens.clone(),
            logits=c(run.logits[0]),
            sites=sites,
            patterns=c(run.patterns[0]),
            scales=scales,
            inputs=inputs,
            pre=pre,
            feat_layer=nz[:, 0],
            feat_pos=nz[:, 1],
            feat_index=nz[:, 2],
            feat_value=value,
            recon=recon,
            errors=errors,
        )

    def generate(self, prompt, interventions=(), **options):
        """Steered generation: continue ``prompt`` with ``interventions`` applied at every step;
        see :func:`tracer.steer.generate` (options: max_new_tokens, temperature, top_k, seed)."""
        from tracer.steer import generate  # steer builds on this module

        return generate(self, prompt, interventions, **options)

    def forward_logits(self, state: PromptState) -> torch.Tensor:
        """Logits [P, vocab] of the replacement (frozen attention and norms, MLP out = recon +
        error). Equal to the real model's logits up to float rounding."""
        L = self.model.facts.n_layers
        out = state.recon + state.errors
        edits = {("mlp_out", l): (lambda x, l=l: out[l].expand_as(x)) for l in range(L)}
        with torch.no_grad():
            return self.model.run(state.tokens, edits=edits, freeze=state.freeze()).logits[0]
