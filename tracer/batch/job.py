"""A batch-tracing job: its settings (:class:`TraceJob`, hashed into output names so a re-run
finds earlier results), the prompts it reads, and one prompt traced and written to Parquet.

Used by ``circuit-atlas trace`` and the demo; :mod:`tracer.batch.run` runs a job over many
prompts (worker processes, ranks, one writer)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from transcoders.device import DeviceSetting


def slug(text: str, n: int = 48) -> str:
    """A file-name-safe short name for a prompt."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n] or "prompt"


def load_replacement(
    model_src: str,
    transcoder_src: str,
    setting: DeviceSetting | None = None,
    exclude_bos: bool = True,
):
    """The model and transcoder, checked against each other, as a ReplacementModel, both on
    ``setting``'s device in its dtype (default: CPU, float32)."""
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    setting = setting or DeviceSetting()
    model = LanguageModel.load(model_src, device=setting)
    f = model.facts
    clt = load_transcoder(transcoder_src, n_layers=f.n_layers, d_model=f.d_model, device=setting,
                          target_model=f.name, mlp_norm_gain=model.mlp_norm_gain)  # fmt: skip
    return ReplacementModel(model, clt, exclude_bos=exclude_bos)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; '#' comments) or JSONL ({"prompt": ...})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{path}:{n}: not a JSON object with a 'prompt' field") from err
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


@dataclass(frozen=True)
class TraceJob:
    """Everything a worker needs to trace prompts; hashed into each output's file name so a
    re-run with the same settings finds its earlier results.

    ``transcoder_id`` is the transcoder's identity (``name@fingerprint``, see
    ``transcoders.identity``): the cache key uses it, not the path, so a retrained transcoder
    at the same path never reuses old graphs and a copy at another path does."""

    model: str
    transcoders: str
    out: str
    transcoder_id: str
    max_feature_nodes: int | None = None
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 1024
    edge_tolerance: float = 0.0
    target_tokens: tuple[str, ...] | None = None
    logit_diff: tuple[str, str] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    fit_budget: bool = False  # the default budget: lowered to the memory plan's suggestion
    memory_limit_gb: float | None = None

    @property
    def setting(self) -> DeviceSetting:
        return DeviceSetting.parse(self.device, self.dtype)

    convention: str = "circuit-tracer"
    heads: bool = False  # head loadings of the circuit's edges (tracer.attention), both files

    def key(self, prompt: str) -> str:
        # The device does not change a graph (beyond float rounding); the dtype does. A float32
        # job keeps the key it had before dtypes existed, so earlier results are still found.
        skip = {"out", "transcoders", "device"} | ({"dtype"} if self.dtype == "float32" else set())
        skip |= set() if self.heads else {"heads"}  # jobs without head loadings keep their keys
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        blob = json.dumps([prompt, settings], sort_keys=True)
        return f"{slug(prompt, 40)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def paths(self, prompt: str) -> tuple[Path, Path]:
        """(pruned, full) graph files of a prompt."""
        k = self.key(prompt)
        return Path(self.out) / f"{k}.parquet", Path(self.out) / f"{k}.full.parquet"


def trace_one(job: TraceJob, prompt: str, rm, progress: bool = False):
    """Attribute and prune one prompt and write both graphs (Parquet).

    Returns (pruned graph, full graph, pruned path, full path)."""
    from tracer.attribution import attribute
    from tracer.prune import prune

    graph = attribute(
        rm,
        prompt,
        max_feature_nodes=job.max_feature_nodes,
        max_n_logits=job.max_n_logits,
        desired_logit_prob=job.desired_logit_prob,
        batch_size=job.batch_size,
        edge_tolerance=job.edge_tolerance,
        target_tokens=list(job.target_tokens) if job.target_tokens else None,
        logit_diff=job.logit_diff,
        convention=job.convention,
        progress=progress,
        fit_budget=job.fit_budget,
        memory_limit_gb=job.memory_limit_gb,
    )
    pruned = prune(graph, job.node_threshold, job.edge_threshold, job.convention)
    if job.heads:  # which heads carry each circuit edge (tracer.attention)
        from tracer.attention import add_head_loadings

        add_head_loadings(rm, graph, pruned, progress=progress)
    pruned_path, full_path = job.paths(prompt)
    graph.save(full_path)
    pruned.save(pruned_path)
    return pruned, graph, pruned_path, full_path


def transcoder_identity_at(path: str) -> str:
    """The identity string of the transcoder at ``path`` (reads encoders, not decoders)."""
    from transcoders.formats import load_transcoder

    return load_transcoder(path, lazy=True).identity.id
