"""The one intervention mechanism: perturb feature, error and token nodes of the replacement model.

Interventions (any number at once, composed in the order given):

- :class:`FeatureEdit` set / scale / ablate / clamp / add on feature (layer, position, index)
  (position ``None``: every position, including generated ones when steering)
- :class:`VectorEdit` add a vector at an error node (``mlp_out`` of a layer) or a token node
  (``resid_pre`` of layer 0) at one position
- :class:`FeatureSwap` put one feature's activation in another's place

Modes:

- ``constrained``: attention patterns, norm denominators and the MLP outputs frozen; features
  keep their recorded activations except where edited. The model is then linear in the node
  values, and the change of every target equals the graph's edge columns exactly.
- ``free``: attention patterns frozen; norms and everything downstream live: each layer's
  features are recomputed by the transcoder from the live MLP input, edited, decoded, and the
  recorded error is added (the replacement model as in the graph).
- ``free_mlp``: attention patterns frozen; the real MLPs run live, and a feature edit adds the
  difference it makes to the decoded output.

Everything goes through :func:`tracer.hooks.run_hooked` edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tracer.hooks import Freeze
from tracer.replacement import PromptState, ReplacementModel

Mode = Literal["constrained", "free", "free_mlp"]


class InterventionError(ValueError):
    """An intervention that does not fit the model or prompt."""


@dataclass(frozen=True)
class FeatureEdit:
    """op: 'set' (activation := value), 'scale' (x value), 'ablate' (:= 0), 'clamp' (same as
    set, named for steering), 'add' (+= value)."""

    layer: int
    feature: int
    position: int | None = None
    op: Literal["set", "scale", "ablate", "clamp", "add"] = "ablate"
    value: float = 0.0


@dataclass(frozen=True)
class VectorEdit:
    """Add ``vector`` [d] at an error node (site 'mlp_out', layer l) or a token node (site
    'resid_pre', layer 0) at ``position``."""

    site: Literal["mlp_out", "resid_pre"]
    layer: int
    position: int
    vector: torch.Tensor


@dataclass(frozen=True)
class FeatureSwap:
    """Feature ``dst`` takes the activation feature ``src`` has (same layer and position);
    ``src`` is zeroed."""

    layer: int
    src: int
    dst: int
    position: int | None = None


Intervention = FeatureEdit | VectorEdit | FeatureSwap


@dataclass
class InterventionResult:
    """logits [P, vocab]; inputs [L, P, d] at the transcoder's input site; pre [L, P, F]
    pre-activations and acts [L, P, F] activations as they were used; sites recorded."""

    logits: torch.Tensor
    inputs: torch.Tensor
    pre: torch.Tensor
    acts: torch.Tensor
    sites: dict[str, torch.Tensor]


def check_interventions(rm: ReplacementModel, n_pos: int, items: Sequence[Intervention]) -> None:
    """Clear errors for edits that name a layer, feature or position that does not exist."""
    L, F, d = rm.model.facts.n_layers, rm.transcoder.cfg.n_features, rm.model.facts.d_model
    for it in items:
        if not 0 <= it.layer < L:
            raise InterventionError(f"{it}: layer {it.layer} out of range 0..{L - 1}")
        feats = (it.src, it.dst) if isinstance(it, FeatureSwap) else ()
        feats += (it.feature,) if isinstance(it, FeatureEdit) else ()
        for f in feats:
            if not 0 <= f < F:
                raise InterventionError(
                    f"{it}: feature index {f} out of range 0..{F - 1} for this transcoder"
                )
        pos = it.position
        if pos is not None and not 0 <= pos < n_pos:
            raise InterventionError(
                f"{it}: position {pos} is past the prompt "
                f"({n_pos} tokens, positions 0..{n_pos - 1})"
            )
        if isinstance(it, VectorEdit):
            if it.site == "resid_pre" and it.layer != 0:
                raise InterventionError("token-node vectors go at resid_pre of layer 0")
            if tuple(it.vector.shape) != (d,):
                raise InterventionError(f"vector has shape {tuple(it.vector.shape)}, need ({d},)")


def _edit_acts(acts: torch.Tensor, layer: int, items: Sequence[Intervention]) -> torch.Tensor:
    """Apply feature edits and swaps of one layer to its activations [B, P, F]."""
    for it in items:
        if isinstance(it, VectorEdit) or it.layer != layer:
            continue
        pos = slice(None) if it.position is None else it.position
        if isinstance(it, FeatureSwap):
            v = acts[:, pos, it.src].clone()
            acts[:, pos, it.src] = 0.0
            acts[:, pos, it.dst] = v
        elif it.op == "ablate":
            acts[:, pos, it.feature] = 0.0
        elif it.op in ("set", "clamp"):
            acts[:, pos, it.feature] = it.value
        elif it.op == "scale":
            acts[:, pos, it.feature] *= it.value
        elif it.op == "add":
            acts[:, pos, it.feature] += it.value
        else:
            raise InterventionError(f"unknown feature op {it.op!r}")
    return acts


def _vector_edits(items: Sequence[Intervention], site: str, layer: int):
    return [
        it for it in items if isinstance(it, VectorEdit) and it.site == site and it.layer == layer
    ]


def intervene(
    rm: ReplacementModel,
    state: PromptState,
    items: Sequence[Intervention] = (),
    mode: Mode = "constrained",
) -> InterventionResult:
    """Run the prompt of ``state`` with ``items`` applied in ``mode``. See the module doc."""
    check_interventions(rm, state.n_pos, items)
    tc, model = rm.transcoder, rm.model
    L = model.facts.n_layers
    site = rm.input_site
    mask = rm.feature_mask(state.n_pos)
    # Activations as recorded (constrained) or as recomputed live (free modes), per layer.
    acts_used: list[torch.Tensor | None] = [None] * L
    acts_unedited: list[torch.Tensor | None] = [None] * L
    pre_used: list[torch.Tensor | None] = [None] * L
    inputs: list[torch.Tensor | None] = [None] * L

    def read_input(l):
        def fn(x):
            inputs[l] = x
            pre = tc.pre_activations(l, x[0])
            pre_used[l] = pre
            if mode == "constrained":
                a = _recorded_acts(l)
            else:
                a = tc.activate(l, pre)
                a[~mask] = 0.0
            acts_unedited[l] = a
            acts_used[l] = _edit_acts(a[None].clone(), l, items)[0]
            return x

        return fn

    def _recorded_acts(l):
        a = torch.zeros(state.n_pos, tc.cfg.n_features)
        sel = state.feat_layer == l
        a[state.feat_pos[sel], state.feat_index[sel]] = state.feat_value[sel]
        return a

    def write_output(l):
        def fn(x):
            if mode == "free_mlp":
                delta = _decoded(l, edited=True) - _decoded(l, edited=False)
                out = x + delta
            else:
                out = _decoded(l, edited=True) + tc.b_dec[l] + state.errors[l]
                if tc.W_skip is not None:
                    out = out + inputs[l][0] @ tc.W_skip[l].T
            for it in _vector_edits(items, "mlp_out", l):
                out = out.clone()
                out[..., it.position, :] += it.vector
            return out.expand_as(x) if out.dim() == 2 else out

        return fn

    def _decoded(l, edited: bool):
        """Sum over source layers i <= l of acts_i @ W_dec[i][:, l - i] -> [P, d]."""
        total = torch.zeros(state.n_pos, model.facts.d_model)
        for i in range(l + 1):
            if l - i >= tc.cfg.n_targets(i):
                continue
            a = acts_used[i] if edited else acts_unedited[i]
            total += a @ tc.decoder(i)[:, l - i]
        return total

    def embed_edit(x):
        vecs = _vector_edits(items, "resid_pre", 0)
        if not vecs:
            return x
        x = x.clone()
        for it in vecs:
            x[:, it.position] += it.vector
        return x

    edits = {("resid_pre", 0): embed_edit}
    for l in range(L):
        edits[(site, l)] = read_input(l)
        edits[("mlp_out", l)] = write_output(l)
    if mode == "constrained":
        freeze = state.freeze()
    else:
        freeze = Freeze(patterns=state.patterns)
    with torch.no_grad():
        run = model.run(state.tokens, edits=edits, freeze=freeze)
    return InterventionResult(
        logits=run.logits[0],
        inputs=torch.stack([x[0] for x in inputs]),
        pre=torch.stack(pre_used),
        acts=torch.stack(acts_used),
        sites={k: v[0] for k, v in run.sites.items()},
    )
