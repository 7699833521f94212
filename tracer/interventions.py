"""The one intervention mechanism: perturb feature, error and token nodes of the replacement model.

Interventions (any number at once, composed in the order given):

- :class:`FeatureEdit` set / scale / ablate / clamp / add on feature (layer, position, index)
  (position ``None``: every position whose features are nodes, i.e. all but the start token
  when it is excluded, including generated ones when steering)
- :class:`VectorEdit` add a vector at an error node (``mlp_out`` of a layer) or a token node
  (``resid_pre`` of layer 0) at one position
- :class:`FeatureSwap` put one feature's activation in another's place
- :class:`KeepOnly` zero every feature activation except a listed set (a circuit)

Modes:

- ``constrained``: attention patterns, norm denominators and the MLP outputs frozen; features
  keep their recorded activations except where edited. The model is then linear in the node
  values, and the change of every target equals the graph's edge columns exactly.
- ``free``: attention patterns frozen; norms and everything downstream live: each layer's
  features are recomputed by the transcoder from the live MLP input, edited, decoded, and the
  recorded error is added (the replacement model as in the graph).
- ``free_mlp``: attention patterns frozen; the real MLPs run live, and a feature edit adds the
  difference it makes to the decoded output.
- ``live``: nothing frozen (the real model, any number of positions, as for generation); like
  ``free_mlp``, a feature edit adds the difference it makes to the decoded output. Needs only
  token ids, no record.

In every mode a layer's MLP output is a base plus the decoded *difference* between the
activations used and a baseline: base = recorded MLP output, baseline = recorded activations
(``constrained``, ``free``); base = the live MLP output, baseline = the live unedited
activations (``free_mlp``, ``live``). So an intervention that changes nothing adds exactly zero,
and each active feature's decoder row is read once per run (lazy decoders read only those rows).

Runs are batched: :func:`intervene_batch` takes B independent lists of interventions and runs
them in one forward pass over B copies of the prompt; :func:`intervene` is the one-list case.
Everything goes through :func:`tracer.hooks.run_hooked` edits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tracer.hooks import SITES, Freeze
from tracer.replacement import PromptState, ReplacementModel
from transcoders.clt import compute_dtype

Mode = Literal["constrained", "free", "free_mlp", "live"]
MODES = ("constrained", "free", "free_mlp", "live")
FEATURE_OPS = ("set", "scale", "ablate", "clamp", "add")


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


@dataclass(frozen=True, eq=False)
class KeepOnly:
    """Zero every feature activation (all layers, all positions) except the listed ones.

    nodes: [n, 3] integer (layer, position, feature). ``KeepOnly(empty)`` ablates every feature.
    In the free modes features that would newly activate are zeroed too: only the listed
    features may be active (the circuit-only model of sufficiency).
    """

    nodes: torch.Tensor


Intervention = FeatureEdit | VectorEdit | FeatureSwap | KeepOnly


@dataclass
class InterventionResult:
    """One run. logits [P, vocab]; inputs [L, P, d] at the transcoder's input site; pre
    [L, P, F] pre-activations and acts [L, P, F] activations as they were used; sites recorded
    (site -> [L, P, d]; resid_final [P, d])."""

    logits: torch.Tensor
    inputs: torch.Tensor
    pre: torch.Tensor
    acts: torch.Tensor
    sites: dict[str, torch.Tensor]


@dataclass
class BatchInterventionResult:
    """B runs of one prompt. logits [B, P, vocab]; sites: recorded sites (site -> [B, L, P, d];
    resid_final [B, P, d]); watched_pre / watched_acts [B, n_watch] pre-activations and used
    activations of the watched (layer, position, feature) triples (None when none watched);
    inputs [B, L, P, d], pre / acts [B, L, P, F] only with ``keep_features``."""

    logits: torch.Tensor
    sites: dict[str, torch.Tensor]
    watched_pre: torch.Tensor | None = None
    watched_acts: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    pre: torch.Tensor | None = None
    acts: torch.Tensor | None = None

    def row(self, b: int) -> InterventionResult:
        """Run ``b`` as an :class:`InterventionResult` (needs ``keep_features``)."""
        if self.pre is None or self.acts is None or self.inputs is None:
            raise ValueError("row() needs a batch run with keep_features=True")
        return InterventionResult(
            logits=self.logits[b],
            inputs=self.inputs[b],
            pre=self.pre[b],
            acts=self.acts[b],
            sites={k: v[b] for k, v in self.sites.items()},
        )


# --- checks ----------------------------------------------------------------------------------


def check_interventions(rm: ReplacementModel, n_pos: int, items: Sequence[Intervention]) -> None:
    """Clear errors for edits that name a layer, feature or position that does not exist."""
    L, F, d = rm.model.facts.n_layers, rm.transcoder.cfg.n_features, rm.model.facts.d_model
    for it in items:
        if not isinstance(it, (FeatureEdit, VectorEdit, FeatureSwap, KeepOnly)):
            raise InterventionError(
                f"{type(it).__name__} is not an intervention: use FeatureEdit, VectorEdit, "
                "FeatureSwap or KeepOnly"
            )
        if isinstance(it, KeepOnly):
            _check_keep_only(it, L, F, n_pos)
            continue
        if not 0 <= it.layer < L:
            raise InterventionError(f"{_short(it)}: layer {it.layer} out of range 0..{L - 1}")
        feats = (it.src, it.dst) if isinstance(it, FeatureSwap) else ()
        feats += (it.feature,) if isinstance(it, FeatureEdit) else ()
        for f in feats:
            if not 0 <= f < F:
                raise InterventionError(
                    f"{_short(it)}: feature index {f} out of range 0..{F - 1} for this transcoder"
                )
        if isinstance(it, FeatureEdit) and it.op not in FEATURE_OPS:
            raise InterventionError(f"unknown feature op {it.op!r}: use one of {FEATURE_OPS}")
        pos = it.position
        if pos is not None and not 0 <= pos < n_pos:
            raise InterventionError(
                f"{_short(it)}: position {pos} is past the prompt "
                f"({n_pos} tokens, positions 0..{n_pos - 1})"
            )
        if (
            pos is not None
            and not isinstance(it, VectorEdit)
            and not bool(rm.feature_mask(n_pos)[pos])
        ):
            raise InterventionError(
                f"{_short(it)}: position {pos} is the start token, whose features are not "
                "nodes (exclude_bos): edit a later position or build the replacement model "
                "with exclude_bos=False"
            )
        if isinstance(it, VectorEdit):
            if it.site not in ("mlp_out", "resid_pre"):
                raise InterventionError(
                    f"vector site {it.site!r}: use 'mlp_out' (error node) or 'resid_pre' (token)"
                )
            if it.site == "resid_pre" and it.layer != 0:
                raise InterventionError("token-node vectors go at resid_pre of layer 0")
            if tuple(it.vector.shape) != (d,):
                raise InterventionError(f"vector has shape {tuple(it.vector.shape)}, need ({d},)")


def _check_keep_only(it: KeepOnly, L: int, F: int, n_pos: int) -> None:
    n = it.nodes
    if not isinstance(n, torch.Tensor) or n.dim() != 2 or n.shape[1] != 3:
        raise InterventionError("KeepOnly.nodes must be an integer tensor [n, 3] (layer, pos, f)")
    if n.dtype.is_floating_point:
        raise InterventionError("KeepOnly.nodes must hold integers (layer, position, feature)")
    for col, (name, hi) in enumerate((("layer", L), ("position", n_pos), ("feature", F))):
        if len(n) and not (0 <= int(n[:, col].min()) and int(n[:, col].max()) < hi):
            raise InterventionError(f"KeepOnly: a {name} is out of range 0..{hi - 1}")


def _short(it: Intervention) -> str:
    if isinstance(it, VectorEdit):
        return f"VectorEdit(site={it.site!r}, layer={it.layer}, position={it.position})"
    return repr(it)


# --- editing activations -----------------------------------------------------------------------


class _Plan:
    """B lists of interventions sorted by where they act: per layer the feature edits (with
    their batch row, in the order given) and per (site, layer) the vectors to add."""

    def __init__(self, batch: Sequence[Sequence[Intervention]], mask: torch.Tensor):
        self.mask = mask  # [P] positions whose features are nodes
        self.layers: dict[int, list[tuple[int, Intervention]]] = defaultdict(list)
        self.keep: list[tuple[int, int, KeepOnly]] = []  # (row, order, item): every layer
        self.vectors: dict[tuple[str, int], list[tuple[int, VectorEdit]]] = defaultdict(list)
        self.order: dict[int, list[tuple[int, int, Intervention]]] = defaultdict(list)
        for b, items in enumerate(batch):
            for k, it in enumerate(items):
                if isinstance(it, VectorEdit):
                    self.vectors[(it.site, it.layer)].append((b, it))
                elif isinstance(it, KeepOnly):
                    self.keep.append((b, k, it))
                else:
                    self.order[it.layer].append((b, k, it))

    def layer_items(self, layer: int) -> list[tuple[int, Intervention]]:
        """Feature edits of one layer, KeepOnly included, in (row, given order)."""
        items = list(self.order.get(layer, [])) + self.keep
        return [(b, it) for b, _, it in sorted(items, key=lambda t: (t[0], t[1]))]

    def edit(self, acts: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply the edits of one layer to its activations [B, P, F] (in place; returned)."""
        every = self.mask.nonzero().squeeze(1)  # position None: all node positions
        for b, it in self.layer_items(layer):
            if isinstance(it, KeepOnly):
                sel = it.nodes[:, 0] == layer
                keep = torch.zeros_like(acts[b], dtype=torch.bool)
                keep[it.nodes[sel, 1], it.nodes[sel, 2]] = True
                acts[b] = torch.where(keep, acts[b], torch.zeros((), dtype=acts.dtype))
                continue
            pos = every if it.position is None else it.position
            if isinstance(it, FeatureSwap):
                v = acts[b, pos, it.src].clone()
                acts[b, pos, it.src] = 0.0
                acts[b, pos, it.dst] = v
            elif it.op == "ablate":
                acts[b, pos, it.feature] = 0.0
            elif it.op in ("set", "clamp"):
                acts[b, pos, it.feature] = it.value
            elif it.op == "scale":
                acts[b, pos, it.feature] *= it.value
            else:  # add
                acts[b, pos, it.feature] += it.value
        return acts


# --- the run ---------------------------------------------------------------------------------


def _as_watch(watch) -> torch.Tensor | None:
    if watch is None:
        return None
    w = torch.as_tensor(watch, dtype=torch.long)
    if w.dim() != 2 or w.shape[1] != 3:
        raise InterventionError("watch must be [n, 3] (layer, position, feature)")
    return w


def _batch_tokens(prompt, n_lists: int, mode: Mode):
    """(recorded state or None, token ids [B, P]) of a batch's prompt, checked for the mode."""
    if isinstance(prompt, PromptState):
        return prompt, prompt.tokens.expand(n_lists, -1)
    if mode != "live":
        raise InterventionError(
            f"mode {mode!r} freezes parts of a recorded run: pass rm.record(tokens), not "
            "token ids (only mode 'live' runs from token ids)"
        )
    tokens = torch.as_tensor(prompt).long()
    tokens = tokens.expand(n_lists, -1) if tokens.dim() == 1 else tokens
    if tokens.dim() != 2 or tokens.shape[0] != n_lists or tokens.shape[1] == 0:
        raise InterventionError(
            f"token ids of shape {tuple(tokens.shape)}: give [n_pos] or [{n_lists}, n_pos] "
            "(one row per intervention list)"
        )
    return None, tokens


class _BatchRun:
    """The hooks of one batched intervention run: at each layer's transcoder input, read the
    pre-activations, apply the edits and queue the decoded differences; at each MLP output,
    write the (frozen or live) output plus those differences and any vector edits.

    B lists, P positions, L layers, d = d_model, F features per layer. The queued
    differences ``pending[l]`` are [B, P, d]; ``inputs``, ``kept_pre``, ``kept_acts`` hold
    per-layer [B, P, d] / [B, P, F] tensors when asked for.
    """

    def __init__(self, rm, state, plan, mode, tokens, watch, keep_features):
        self.rm, self.state, self.plan, self.mode = rm, state, plan, mode
        self.tc, model = rm.transcoder, rm.model
        L = model.facts.n_layers
        self.B, self.P = tokens.shape
        self.d = model.facts.d_model
        self.mask = rm.feature_mask(self.P)
        self.frozen_out = mode in ("constrained", "free")
        self.watch, self.keep_features = watch, keep_features
        self.pending: list[torch.Tensor | None] = [None] * L
        self.inputs: list[torch.Tensor | None] = [None] * L
        self.kept_pre: list[torch.Tensor | None] = [None] * L
        self.kept_acts: list[torch.Tensor | None] = [None] * L
        n_watch = 0 if watch is None else len(watch)
        cd = compute_dtype(model.dtype)
        self.watched_pre = torch.zeros(self.B, n_watch, device=model.device, dtype=cd)
        self.watched_acts = torch.zeros(self.B, n_watch, device=model.device, dtype=cd)
        self.recorded = _recorded_acts(state, self.tc.cfg.n_features) if state is not None else None

    def edits(self) -> dict:
        """The hook table for :meth:`LanguageModel.run`."""
        edits = {("resid_pre", 0): self.embed_edit}
        for l in range(len(self.pending)):
            edits[(self.rm.input_site, l)] = self.read_input(l)
            edits[("mlp_out", l)] = self.write_output(l)
        return edits

    def add_decoded(self, layer: int, diff: torch.Tensor) -> None:
        """Decode diff [B, P, F] into every layer it writes to: one matrix product over the
        features that changed anywhere in the batch (rows share most of them)."""
        cols = (diff != 0).any(0).any(0).nonzero().squeeze(1)
        if len(cols) == 0:
            return
        B, P, d = self.B, self.P, self.d
        w = self.tc.decoder_rows(layer, cols).to(diff.dtype)  # [u, T, d]
        T = w.shape[1]
        out = (diff[:, :, cols].reshape(B * P, -1) @ w.reshape(len(cols), T * d)).view(B, P, T, d)
        for t in range(T):
            prev = self.pending[layer + t]
            self.pending[layer + t] = out[:, :, t] if prev is None else prev + out[:, :, t]

    def read_input(self, l: int):
        def fn(x):
            tc = self.tc
            self.inputs[l] = x
            pre = tc.pre_activations(l, x)  # [B, P, F]
            if self.mode == "constrained":
                unedited = self.recorded[l].expand(self.B, -1, -1)
            else:
                unedited = tc.activate(l, pre)
                unedited[:, ~self.mask] = 0.0
            used = self.plan.edit(unedited.clone(), l)
            baseline = self.recorded[l] if self.frozen_out else unedited
            self.add_decoded(l, used - baseline)
            watch = self.watch
            if watch is not None:
                sel = (watch[:, 0] == l).nonzero().squeeze(1)
                self.watched_pre[:, sel] = pre[:, watch[sel, 1], watch[sel, 2]]
                self.watched_acts[:, sel] = used[:, watch[sel, 1], watch[sel, 2]]
            if self.keep_features:
                self.kept_pre[l], self.kept_acts[l] = pre, used
            return x

        return fn

    def write_output(self, l: int):
        def fn(x):
            state, tc = self.state, self.tc
            if self.frozen_out:
                out = state.sites["mlp_out"][l].expand(self.B, -1, -1)
                if tc.W_skip is not None:  # the skip path is live (linear) in the replacement
                    dx = self.inputs[l].to(out.dtype) - state.inputs[l]
                    out = out + dx @ tc.W_skip[l].to(out.dtype).T
            else:
                out = x
            if self.pending[l] is not None:
                out = out + self.pending[l]
            return _add_vectors(out, self.plan.vectors.get(("mlp_out", l)))

        return fn

    def embed_edit(self, x):
        return _add_vectors(x, self.plan.vectors.get(("resid_pre", 0)))

    def freeze(self) -> Freeze | None:
        """What the mode holds fixed: everything recorded (constrained), the attention
        patterns (free), nothing (live)."""
        if self.mode == "constrained":
            return self.state.freeze()
        if self.mode == "live":
            return None
        return Freeze(patterns=self.state.pattern_store)

    def result(self, run) -> BatchInterventionResult:
        out = BatchInterventionResult(logits=run.logits, sites=run.sites)
        if self.watch is not None:
            out.watched_pre, out.watched_acts = self.watched_pre, self.watched_acts
        if self.keep_features:
            out.inputs = torch.stack(self.inputs, dim=1)
            out.pre = torch.stack(self.kept_pre, dim=1)
            out.acts = torch.stack(self.kept_acts, dim=1)
        return out


def _add_vectors(x: torch.Tensor, vecs) -> torch.Tensor:
    """x [B, P, d] with each (row b, VectorEdit) added at its position (a copy when any)."""
    if not vecs:
        return x
    x = x.clone()
    for b, it in vecs:
        x[b, it.position] += it.vector.to(x)
    return x


def intervene_batch(
    rm: ReplacementModel,
    prompt: PromptState | torch.Tensor,
    batch: Sequence[Sequence[Intervention]],
    mode: Mode = "constrained",
    *,
    watch: torch.Tensor | None = None,
    keep_features: bool = False,
    record_sites: tuple[str, ...] = SITES,
) -> BatchInterventionResult:
    """Run B = len(batch) independent intervention lists on one prompt in one forward pass.

    prompt: a recorded :class:`PromptState` (every mode), or token ids [P] or [B, P] (one
    row per list; ``live`` only: nothing is frozen, so no record is needed). watch: [n, 3]
    (layer, position, feature) whose pre-activations and used activations are returned per run
    (cheap; the full [B, L, P, F] tensors are kept only with ``keep_features``). record_sites:
    sites to return.

    Device and dtype: the run is on the model's device; logits and sites come back there in the
    model's dtype, pre-activations, activations and watched values in float32 (the
    transcoder's compute dtype). Token ids and watch/KeepOnly indices may be on the CPU.
    """
    if mode not in MODES:
        raise InterventionError(f"unknown mode {mode!r}: use one of {MODES}")
    if len(batch) == 0:
        raise InterventionError("empty batch: give at least one list of interventions")
    state, tokens = _batch_tokens(prompt, len(batch), mode)
    P = tokens.shape[1]
    for items in batch:
        check_interventions(rm, P, items)
    watch = _as_watch(watch)
    if watch is not None and len(watch):
        _check_keep_only(KeepOnly(watch), rm.model.facts.n_layers, rm.transcoder.cfg.n_features, P)
    hooks = _BatchRun(
        rm, state, _Plan(batch, rm.feature_mask(P)), mode, tokens, watch, keep_features
    )
    with torch.no_grad():
        run = rm.model.run(
            tokens,
            edits=hooks.edits(),
            freeze=hooks.freeze(),
            record=bool(record_sites),
            record_sites=record_sites,
        )
    return hooks.result(run)


def _recorded_acts(state: PromptState, n_features: int) -> torch.Tensor:
    """The recorded activations as a dense [L, P, F] tensor (the record's device and dtype)."""
    L = state.inputs.shape[0]
    v = state.feat_value
    a = torch.zeros(L, state.n_pos, n_features, device=v.device, dtype=v.dtype)
    a[state.feat_layer, state.feat_pos, state.feat_index] = state.feat_value
    return a


def intervene(
    rm: ReplacementModel,
    state: PromptState,
    items: Sequence[Intervention] = (),
    mode: Mode = "constrained",
) -> InterventionResult:
    """Run the prompt of ``state`` with ``items`` applied in ``mode``. See the module doc."""
    return intervene_batch(rm, state, [list(items)], mode, keep_features=True).row(0)
