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

import mmap
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from tracer.hooks import SITES, Freeze, run_hooked
from tracer.model import LanguageModel, PromptError
from transcoders.clt import CrossLayerTranscoder, compute_dtype
from transcoders.device import DeviceError, DeviceSetting

PATTERN_PLACEMENTS = ("memory", "disk", "recompute")
# The residual sites attribution reads (with the transcoder's input site): the embedding
# (resid_pre of layer 0), the MLP outputs (error nodes) and the final residual (logits).
ATTRIBUTION_SITES = ("resid_pre", "mlp_out", "resid_final")
# ``PatternStore.pattern_rows`` blocks: about this many bytes of one layer's pattern at once.
PATTERN_BLOCK_BYTES = 64 * 2**20


class PatternStore:
    """The frozen attention patterns of one prompt, ``[L, H, P, P]`` in all, kept one layer at a
    time: nothing ever stacks them, and :meth:`pattern` is the one way to read them.

    ``placement``: ``memory`` (each layer's tensor on ``device``, as recorded), ``disk`` (an
    unlinked, memory-mapped temporary file in ``spill_dir``; :meth:`pattern` copies one layer
    out onto ``device`` and hands the file's pages back to the kernel, so a long prompt's
    patterns, which grow with the square of its length, never sit in resident memory beyond the
    layer in use) or ``recompute`` (nothing quadratic is kept: each layer's queries and keys,
    :class:`~tracer.hooks.QKRecord`, and the pattern recomputed by the same eager attention
    function when read, in blocks of query rows with :meth:`pattern_rows`). ``memory`` and
    ``disk`` hold the recorded values; ``recompute`` gives them again up to float rounding
    (a block of rows computed alone may round differently in the last bit: about 1e-7
    relative in float32).
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        n_pos: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        placement: str = "memory",
        spill_dir: str | os.PathLike | None = None,
    ):
        if placement not in PATTERN_PLACEMENTS:
            raise ValueError(
                f"unknown attention pattern placement {placement!r}: use {PATTERN_PLACEMENTS}"
            )
        self.shape = (n_layers, n_heads, n_pos, n_pos)
        self.device, self.dtype, self.placement = torch.device(device), dtype, placement
        self._layers: list[torch.Tensor | None] = [None] * n_layers
        self._file = self._map = self._flat = None
        self._itemsize = torch.empty(0, dtype=dtype).element_size()
        if placement == "disk":
            self._file = tempfile.TemporaryFile(dir=spill_dir, prefix="circuit-atlas-patterns-")
            size = max(1, self.nbytes)
            os.ftruncate(self._file.fileno(), size)
            self._map = mmap.mmap(self._file.fileno(), size)
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self._flat = np.frombuffer(self._map, dtype=np_dtype, count=self.numel)
        self._stored = [False] * n_layers
        self._qk: list = [None] * n_layers

    @property
    def numel(self) -> int:
        L, H, P, _ = self.shape
        return L * H * P * P

    @property
    def nbytes(self) -> int:
        """All layers' patterns, in bytes (where they live: memory or the spill file)."""
        return self.numel * self._itemsize

    @property
    def layer_bytes(self) -> int:
        """One layer's pattern [H, P, P] in bytes: what :meth:`pattern` holds at once."""
        return self.nbytes // max(1, self.shape[0])

    def __len__(self) -> int:
        return self.shape[0]

    def _span(self, layer: int) -> tuple[int, int]:
        n = self.numel // max(1, self.shape[0])
        return layer * n, (layer + 1) * n

    def _release(self, layer: int) -> None:
        lo, hi = (x * self._itemsize for x in self._span(layer))
        lo = lo // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def put(self, layer: int, pattern: torch.Tensor) -> None:
        """Store layer ``layer``'s pattern [H, P, P] (or [1, H, P, P]), cast to ``dtype``."""
        pattern = pattern.detach()
        if pattern.dim() == 4:
            pattern = pattern[0]
        if tuple(pattern.shape) != self.shape[1:]:
            raise ValueError(
                f"pattern of layer {layer} has shape {tuple(pattern.shape)}, expected "
                f"{self.shape[1:]}"
            )
        pattern = pattern.to(self.dtype)
        if self.placement == "memory":
            self._layers[layer] = pattern.to(self.device)
        else:
            a, b = self._span(layer)
            view = torch.from_numpy(self._flat[a:b]).view(self.shape[1:])
            view.copy_(pattern.cpu())
            del view
            self._release(layer)
        self._stored[layer] = True

    def put_qk(self, layer: int, record) -> None:
        """``recompute`` placement: keep what recomputes layer ``layer``'s pattern (a
        :class:`~tracer.hooks.QKRecord`)."""
        if self.placement != "recompute":
            raise ValueError(f"put_qk needs the recompute placement, not {self.placement!r}")
        self._qk[layer] = record
        self._stored[layer] = True

    @property
    def resident_bytes(self) -> int:
        """What the store holds in memory now: the patterns (``memory``), the queries, keys
        and shared masks (``recompute``), nothing (``disk``)."""
        if self.placement == "memory":
            return self.nbytes
        if self.placement == "disk":
            return 0
        seen, total = set(), 0
        for r in self._qk:
            if r is None:
                continue
            total += (r.query.numel() + r.key.numel()) * r.query.element_size()
            if r.allowed is not None and r.allowed.data_ptr() not in seen:
                seen.add(r.allowed.data_ptr())
                total += r.allowed.numel()
        return total

    def block_rows(self, n_keys: int | None = None) -> int:
        """Query rows per :meth:`pattern_rows` block over ``n_keys`` keys (the whole layer when
        it is within ``PATTERN_BLOCK_BYTES``, or when the patterns are in memory)."""
        n = self.shape[-1] if n_keys is None else int(n_keys)
        if self.placement == "memory":
            return max(n, 1)
        return max(1, int(PATTERN_BLOCK_BYTES // max(1, self.shape[1] * n * self._itemsize)))

    def pattern_rows(self, layer: int, q0: int, q1: int, n_keys: int | None = None):
        """Query rows q0 .. q1-1 of layer ``layer``'s pattern over its first ``n_keys`` keys:
        [H, q1 - q0, n_keys] on ``device`` in the compute dtype."""
        if not self._stored[layer]:
            raise ValueError(f"no attention pattern was recorded for layer {layer}")
        n = self.shape[-1] if n_keys is None else int(n_keys)
        if self.placement == "memory":
            return self._layers[layer][:, q0:q1, :n]
        if self.placement == "recompute":
            return self._qk[layer].rows(q0, q1, n)[0].to(self.device, self.dtype)
        a, b = self._span(layer)
        whole = self._flat[a:b].reshape(self.shape[1:])
        out = torch.from_numpy(np.ascontiguousarray(whole[:, q0:q1, :n]))
        del whole
        self._release(layer)
        return out.to(self.device)

    def pattern(self, layer: int, n_pos: int | None = None) -> torch.Tensor:
        """Layer ``layer``'s frozen pattern [H, P, P] (queries x keys) on ``device`` in the
        compute dtype; ``n_pos``: only the first n_pos queries and keys ([H, n_pos, n_pos],
        all a causal sweep over those positions needs). In memory: a view, no copy; on disk:
        a copy (the file's pages are released)."""
        if not self._stored[layer]:
            raise ValueError(f"no attention pattern was recorded for layer {layer}")
        n = self.shape[-1] if n_pos is None else int(n_pos)
        if self.placement == "memory":
            t = self._layers[layer]
            return t if n == self.shape[-1] else t[:, :n, :n]
        if self.placement == "recompute":
            return self._qk[layer].rows(0, n, n)[0].to(self.device, self.dtype)
        a, b = self._span(layer)
        whole = self._flat[a:b].reshape(self.shape[1:])
        out = torch.from_numpy(np.ascontiguousarray(whole[:, :n, :n]))
        del whole
        self._release(layer)
        return out.to(self.device)

    def whole(self) -> torch.Tensor:
        """Every layer stacked, [L, H, P, P] (L x H x P x P values at once: short prompts and
        tests only)."""
        return torch.stack([self.pattern(l) for l in range(self.shape[0])])

    def close(self) -> None:
        """Drop the patterns (and the spill file)."""
        self._layers = [None] * self.shape[0]
        self._qk = [None] * self.shape[0]
        self._stored = [False] * self.shape[0]
        self._flat = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive: the GC unmaps it later
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class PromptState:
    """What one prompt's run leaves behind. Unbatched; P = n_pos, L = n_layers.

    tokens [P]; logits [P, vocab] (or [1, vocab], the last position's, when recorded with
    ``all_logits=False``); sites: site -> [L, P, d] (resid_final: [P, d]);
    pattern_store: the frozen attention patterns [L, H, P, P], read one layer at a time with
    :meth:`pattern` (in memory or spilled to disk: :class:`PatternStore`);
    scales: norm -> [L, P] (final_norm: [P]); inputs [L, P, d] (transcoder input site);
    pre [L, P, F] pre-activations (None when recorded with ``keep_pre=False``: attribution
    does not read them); active features as parallel [n_active] arrays (sorted by layer,
    position, feature); recon / errors [L, P, d].

    Device and dtype: every tensor but ``tokens`` (CPU ids) is on the model's device. Floating
    tensors are in the compute dtype (float32; float64 for a float64 model) whatever the
    model's weights are, so a bfloat16 model's record meets float32 transcoder products and
    attribution sums without casts (its values are the bfloat16 activations, exactly).
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    sites: dict[str, torch.Tensor]
    pattern_store: PatternStore
    scales: dict[str, torch.Tensor]
    inputs: torch.Tensor
    pre: torch.Tensor | None
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

    def pattern(self, layer: int, n_pos: int | None = None) -> torch.Tensor:
        """The frozen attention pattern of ``layer``: [H, P, P] (queries x keys), on the model's
        device, in the compute dtype. The one way code outside the recording reads patterns
        (they may live on disk; see :class:`PatternStore`). ``n_pos``: only the first n_pos
        queries and keys."""
        return self.pattern_store.pattern(layer, n_pos)

    def pattern_rows(self, layer: int, q0: int, q1: int, n_keys: int | None = None):
        """Query rows q0 .. q1-1 of :meth:`pattern` over the first ``n_keys`` keys, [H, q1 - q0,
        n_keys] (how a long prompt's pattern is read in bounded blocks:
        :meth:`PatternStore.block_rows` rows at a time)."""
        return self.pattern_store.pattern_rows(layer, q0, q1, n_keys)

    @property
    def patterns(self) -> torch.Tensor:
        """Every layer's pattern stacked, [L, H, P, P]: L x H x P^2 values at once, for short
        prompts and tests; long-prompt code reads :meth:`pattern` per layer."""
        return self.pattern_store.whole()

    def freeze(self, norms: bool = True) -> Freeze:
        """Attention patterns (read one layer at a time as each layer runs) and, with ``norms``,
        every norm denominator, fixed at this prompt's values."""
        return Freeze(patterns=self.pattern_store, scales=dict(self.scales) if norms else {})


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
    def record(
        self,
        tokens: torch.Tensor,
        *,
        patterns: str = "memory",
        spill_dir: str | os.PathLike | None = None,
        keep_pre: bool = True,
        all_logits: bool = True,
        sites: tuple[str, ...] | None = None,
    ) -> PromptState:
        """Run the real model on tokens [P] and keep everything attribution freezes (on the
        model's device, in the compute dtype: see :class:`PromptState`).

        ``patterns``: where the attention patterns go as each layer computes them (``memory``,
        ``disk`` or ``recompute``: :class:`PatternStore`; never all layers stacked; with
        ``recompute`` the record pass computes attention in blocks of query rows, so no
        layer's whole pattern is formed). ``keep_pre``: keep the
        pre-activations [L, P, F] (attribution does not need them). ``all_logits``: keep the
        logits of every position (else the last position's only, [1, vocab]). ``sites``: the
        residual sites to keep (default all; attribution needs ``ATTRIBUTION_SITES`` and the
        transcoder's input site).
        """
        tokens = torch.as_tensor(tokens).long().cpu()
        if tokens.dim() != 1 or len(tokens) == 0:
            raise PromptError("token ids must be a non-empty 1-D tensor [n_pos]")
        self.model._check_tokens(tokens)  # the context length and the vocabulary
        f = self.model.facts
        cd = compute_dtype(self.model.dtype)
        P = len(tokens)
        store = PatternStore(
            f.n_layers, f.n_heads, P, device=self.model.device, dtype=cd, placement=patterns,
            spill_dir=spill_dir,
        )  # fmt: skip
        run = run_hooked(
            self.model.hf, self.model.arch, tokens[None].to(self.model.device),
            pattern_sink=None if patterns == "recompute" else store.put,
            qk_sink=store.put_qk if patterns == "recompute" else None,
            logits_to_keep=0 if all_logits else 1,
            record_sites=SITES if sites is None else tuple(
                dict.fromkeys((*sites, "mlp_out", self.input_site))),
        )  # fmt: skip

        def c(t: torch.Tensor) -> torch.Tensor:
            return t.to(cd)  # a no-op for a float32 model

        if not all(store._stored):
            raise RuntimeError("the attention function recorded no pattern for some layer")
        sites = {k: c(v[0]) for k, v in run.sites.items()}
        scales = {k: c(v[0]) for k, v in run.scales.items()}
        logits = c(run.logits[0])
        del run
        inputs = sites[self.input_site]  # [L, P, d]
        tc = self.transcoder
        L = f.n_layers
        mask = self.feature_mask(P).to(inputs.device)
        pre = [] if keep_pre else None
        found = []
        for l in range(L):  # one layer's [P, F] at a time
            pre_l = tc.pre_activations(l, inputs[l])
            acts = tc.activate(l, pre_l)
            acts[~mask] = 0.0
            nz = acts.nonzero(as_tuple=False)  # sorted by (pos, feature)
            found.append((nz, acts[nz[:, 0], nz[:, 1]]))
            if keep_pre:
                pre.append(pre_l)
            del pre_l, acts
        counts = [len(nz) for nz, _ in found]
        feat_layer = torch.repeat_interleave(
            torch.arange(L, device=inputs.device), torch.tensor(counts, device=inputs.device)
        )  # sorted by (layer, pos, feature)
        feat_pos = torch.cat([nz[:, 0] for nz, _ in found])
        feat_index = torch.cat([nz[:, 1] for nz, _ in found])
        value = torch.cat([v for _, v in found])
        del found
        # Only the active features' decoder rows are read (a lazy transcoder loads no others).
        recon = tc.affine((P,), inputs) + tc.decode_sparse(
            feat_layer, feat_pos, feat_index, value, n_pos=P
        )  # [L, P, d]
        errors = sites["mlp_out"] - recon
        return PromptState(
            tokens=tokens.clone(),
            logits=logits,
            sites=sites,
            pattern_store=store,
            scales=scales,
            inputs=inputs,
            pre=torch.stack(pre) if keep_pre else None,
            feat_layer=feat_layer,
            feat_pos=feat_pos,
            feat_index=feat_index,
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
