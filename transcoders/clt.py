"""Cross-layer transcoders (CLT) and their special cases (per-layer and skip transcoders).

Layer ``i`` has an encoder reading the MLP input site of layer ``i`` and decoders writing to
the MLP output of layers ``i .. i + n_targets(i) - 1``: ``n_layers - i`` targets for a CLT, one
for a per-layer transcoder (PLT). Shapes, with L layers, F features per layer, d = d_model:

- ``W_enc[i]``  [F, d]        ``b_enc[i]`` [F]     ``threshold[i]`` [F] (JumpReLU)
- ``W_dec[i]``  [F, T_i, d]   (T_i = L - i for a CLT, 1 for a PLT)
- ``b_dec[i]``  [d]           output bias of layer i's reconstruction
- ``W_skip[i]`` [d, d] optional affine skip: out_i += x_i @ W_skip[i].T

Decoders can be supplied lazily (a callable per layer) so a large CLT reads only the decoder
rows it needs from disk.

Device and dtype: the weights live on one device in one dtype (float32 by default; bfloat16 or
float16 to halve their memory), given at construction or by ``.to(device, dtype)``. A lazy
decoder is moved to that device and dtype when it is read (whole, or row by row). Products are
computed in float32 whatever the weights' dtype (``compute_dtype``: float32, or float64 for
float64 inputs): ``pre_activations`` of bfloat16 activations from a bfloat16 model against
bfloat16 encoders returns float32, and so do ``affine``/``decode_sparse``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from transcoders.activations import ActivationKind, apply_activation

# Decoded vectors built at once by decode_sparse ([active features, targets, d] chunks).
DECODE_CHUNK_BYTES = 64 * 2**20

InputSite = Literal["resid_mid", "mlp_in"]


@dataclass
class TranscoderConfig:
    """Everything needed to rebuild a transcoder, saved as ``circuit_atlas.json`` beside it.

    input_site: ``resid_mid`` reads the residual before the MLP's norm, ``mlp_in`` after it
    (the MLP's actual input). Output is always what the MLP adds to the residual.
    """

    n_layers: int
    d_model: int
    n_features: int
    kind: Literal["clt", "plt"] = "clt"
    activation: ActivationKind = "jumprelu"
    topk: int | None = None
    skip: bool = False
    input_site: InputSite = "mlp_in"
    model_name: str | None = None
    # The readable half of the transcoder's identity (``transcoders.identity``); None: derived
    # from model, kind and width. ``fingerprint`` is written at save time for reference (the
    # loaders recompute it from the weights; the weights are the truth).
    name: str | None = None
    fingerprint: str | None = field(default=None, compare=False)  # a record, not config
    # How inputs/outputs were normalised during training (folded into the weights at export).
    normalization: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    # Transcoders assembled from per-layer files (SAELens, GemmaScope) may cover only some model
    # layers. ``model_layers[i]`` is the model layer that transcoder layer i reads and writes when
    # the transcoder was loaded compactly (None: transcoder layer i is model layer i).
    # ``empty_layers`` lists layers filled with inert zeros (no feature ever activates, no bias)
    # because the source had no transcoder for them.
    model_layers: list[int] | None = None
    empty_layers: list[int] = field(default_factory=list)
    format_version: int = 1

    def n_targets(self, layer: int) -> int:
        return self.n_layers - layer if self.kind == "clt" else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> TranscoderConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype products are computed in: float32, or float64 when an operand is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class CrossLayerTranscoder(nn.Module):
    """A CLT or PLT. Weights on ``device`` in ``dtype`` (default: CPU, float32); parameters are
    trainable unless frozen by the caller. Outputs of the encode/decode methods are float32
    (see the module doc)."""

    def __init__(
        self,
        cfg: TranscoderConfig,
        *,
        init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        L, F, d = cfg.n_layers, cfg.n_features, cfg.d_model
        kw = {"device": device, "dtype": dtype or torch.float32}
        self.W_enc = nn.Parameter(torch.empty(L, F, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(L, F, **kw))
        self.b_dec = nn.Parameter(torch.zeros(L, d, **kw))
        self.threshold = nn.Parameter(torch.zeros(L, F, **kw))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(F, cfg.n_targets(i), d, **kw)) for i in range(L)]
        )
        self.W_skip = nn.Parameter(torch.zeros(L, d, d, **kw)) if cfg.skip else None
        self._lazy_dec: list[Callable[[], torch.Tensor] | None] = [None] * L
        self._lazy_rows: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None] * L
        self._identity = None  # see the ``identity`` property
        self.keep_identity = False  # loaders set it: compute the identity once, then keep it
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        F, d = self.cfg.n_features, self.cfg.d_model
        bound = 1.0 / d**0.5
        nn.init.uniform_(self.W_enc, -bound, bound)
        for i, w in enumerate(self.W_dec):
            # Each feature's summed output norm starts comparable across CLT and PLT.
            b = 1.0 / (F * self.cfg.n_targets(i)) ** 0.5
            nn.init.uniform_(w, -b, b)

    # --- identity -------------------------------------------------------------------------------

    @property
    def identity(self):
        """The :class:`~transcoders.identity.TranscoderIdentity` (readable name + content
        fingerprint). A loaded transcoder computes it on first access and keeps it (its weights
        are frozen; values are hashed at bfloat16 precision, so the load dtype does not matter);
        a transcoder built in memory computes it from its current weights on each access."""
        from transcoders.identity import identity_of

        if self._identity is not None:
            return self._identity
        ident = identity_of(self)
        if self.keep_identity:
            self._identity = ident
        return ident

    @property
    def device(self) -> torch.device:
        """Where the weights are (and where lazy decoders are moved when read)."""
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (lazy decoders are converted to it when read)."""
        return self.W_enc.dtype

    # --- lazy decoders ---------------------------------------------------------------------------

    def set_lazy_decoder(
        self,
        layer: int,
        loader: Callable[[], torch.Tensor],
        rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Defer loading layer ``layer``'s decoder [F, T, d] until first use.

        ``rows(features)`` optionally reads only the given decoder rows [n, T, d] (features is a
        1-D index tensor), so a sparse decode of a few active features need not read the whole
        decoder from disk.
        """
        self._lazy_dec[layer] = loader
        self._lazy_rows[layer] = rows
        self.W_dec[layer] = nn.Parameter(
            torch.empty(0, device=self.device, dtype=self.dtype), requires_grad=False
        )

    def decoder_loaded(self, layer: int) -> bool:
        """Whether layer ``layer``'s decoder is in memory (False while it is still lazy)."""
        return self._lazy_dec[layer] is None

    def check_decoder_shape(self, layer: int, shape: tuple[int, ...], n: int | None = None):
        """Raise a clear error unless ``shape`` is layer ``layer``'s decoder shape [F, T, d]
        (or [n, T, d] for n rows)."""
        expected = (
            self.cfg.n_features if n is None else n,
            self.cfg.n_targets(layer),
            self.cfg.d_model,
        )
        if tuple(shape) != expected:
            raise ValueError(
                f"decoder of layer {layer} has shape {tuple(shape)}, expected {expected}: "
                "the weight files do not match the transcoder's config; re-convert them"
            )

    def decoder(self, layer: int, *, cache: bool = True) -> torch.Tensor:
        """Decoder of source layer ``layer``: [F, T_layer, d].

        A lazy decoder is read on first use, moved to the transcoder's device and dtype, and kept
        (``cache=False`` reads it without keeping it, for one pass over a large transcoder, e.g.
        when converting it).
        """
        loader = self._lazy_dec[layer]
        if loader is None:
            return self.W_dec[layer]
        w = loader()
        self.check_decoder_shape(layer, tuple(w.shape))
        w = w.to(device=self.device, dtype=self.dtype)
        if cache:
            self.W_dec[layer] = nn.Parameter(w, requires_grad=False)
            self._lazy_dec[layer] = None
            self._lazy_rows[layer] = None
        return w

    def decoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows of the given features of layer ``layer``: [n, T_layer, d], on the
        transcoder's device in its dtype.

        When the decoder is still lazy and its source can read single rows, only those rows are
        read (nothing is cached); otherwise this indexes ``decoder(layer)``.
        """
        rows = self._lazy_rows[layer]
        if self._lazy_dec[layer] is not None and rows is not None:
            w = rows(features.cpu())
            self.check_decoder_shape(layer, tuple(w.shape), n=len(features))
            return w.to(device=self.device, dtype=self.dtype)
        return self.decoder(layer)[features.to(self.device)]

    def load_all(self) -> CrossLayerTranscoder:
        for i in range(self.cfg.n_layers):
            self.decoder(i)
        return self

    # --- encode / decode ---------------------------------------------------------------------

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] at layer's input site (any float dtype, on the transcoder's device) ->
        pre-activations [..., F] in float32 (float64 for float64 x). With float32 weights and
        inputs the casts are no-ops (gradients flow as before)."""
        cd = compute_dtype(x.dtype, self.dtype)
        return x.to(cd) @ self.W_enc[layer].to(cd).T + self.b_enc[layer].to(cd)

    def activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        return apply_activation(
            self.cfg.activation, pre, threshold=self.threshold[layer].to(pre.dtype), k=self.cfg.topk
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, ..., d] (every layer's input site) -> activations [L, ..., F]."""
        return torch.stack([self.activate(i, self.pre_activations(i, x[i])) for i in range(len(x))])

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Activations [L, ..., F] -> reconstructed MLP outputs [L, ..., d] (bias included).

        ``x`` [L, ..., d] (the inputs) is needed only for the skip term.
        """
        out = self.affine(acts.shape[1:-1], x)
        for i in range(self.cfg.n_layers):
            w = self.decoder(i).to(acts.dtype)  # [F, T, d]
            contrib = torch.einsum("...f,ftd->t...d", acts[i], w)
            out[i : i + w.shape[1]] += contrib
        return out

    def affine(
        self, batch_shape: tuple | torch.Size, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The part of the reconstruction that is not features: the output bias plus, for a skip
        transcoder, W_skip x. Returns a new float32 tensor [L, *batch_shape, d] (float64 for
        float64 x); ``x`` [L, ..., d]."""
        L = self.cfg.n_layers
        cd = compute_dtype(self.dtype, *(() if x is None else (x.dtype,)))
        out = (
            self.b_dec.to(cd)
            .view(L, *([1] * len(batch_shape)), -1)
            .expand(L, *batch_shape, self.cfg.d_model)
            .clone()
        )
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder's decode needs the inputs x")
            out = out + torch.einsum("l...d,led->l...e", x.to(cd), self.W_skip.to(cd))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [L, ..., d] -> (reconstruction [L, ..., d], activations [L, ..., F])."""
        acts = self.encode(x)
        return self.decode(acts, x), acts

    def decode_sparse(
        self,
        layers: torch.Tensor,
        positions: torch.Tensor,
        features: torch.Tensor,
        values: torch.Tensor,
        n_pos: int,
    ) -> torch.Tensor:
        """Decode a sparse set of active features, no output bias. Each argument is [n_active];
        returns the summed decoded vectors [L, n_pos, d]."""
        L, d = self.cfg.n_layers, self.cfg.d_model
        out = torch.zeros(L, n_pos, d, dtype=values.dtype, device=values.device)
        flat_out = out.view(L * n_pos, d)
        for i in torch.unique(layers).tolist():
            sel = (layers == i).nonzero().squeeze(1)
            # Read each distinct feature's decoder row once, even if it fires at many positions.
            uniq, inv = torch.unique(features[sel], return_inverse=True)
            rows = self.decoder_rows(i, uniq).to(values.dtype)  # [n_unique, T, d]
            T = rows.shape[1]
            targets = torch.arange(i, i + T, device=out.device)[None, :] * n_pos
            # Chunks of active features: [chunk, T, d] stays under DECODE_CHUNK_BYTES (a 1,024-
            # token prompt has ~23k active features per layer: 1.5 GiB unchunked at layer 0).
            # index_add_ adds in index order, so chunking leaves the sums unchanged.
            step = max(1, DECODE_CHUNK_BYTES // (T * d * values.element_size()))
            for c0 in range(0, len(sel), step):
                s = sel[c0 : c0 + step]
                vecs = rows[inv[c0 : c0 + step]].mul_(values[s, None, None])  # [chunk, T, d]
                # out[i + t, pos] += vecs[:, t], as one scatter into out as [L * n_pos, d].
                flat = (targets + positions[s][:, None]).reshape(-1)
                flat_out.index_add_(0, flat, vecs.reshape(-1, d))
        return out

    def check_model(self, n_layers: int, d_model: int, model_name: str = "the model") -> None:
        """Raise a clear error when this transcoder does not fit a model's shape."""
        if d_model != self.cfg.d_model:
            raise ValueError(
                f"transcoder has d_model {self.cfg.d_model} but {model_name} has {d_model}: "
                "it was trained for another model"
            )
        if n_layers != self.cfg.n_layers:
            raise ValueError(
                f"transcoder covers {self.cfg.n_layers} layers but {model_name} has {n_layers}: "
                "use the transcoder trained for this model"
            )
