"""Text sampled from the model itself: a corpus in the model's own distribution.

A batched sampling loop over a plain Hugging Face causal LM (``model(input_ids, attention_mask,
position_ids, past_key_values)``) and its tokenizer: a batch of topic openings (left-padded),
one prefill, then one token per step through the KV cache, temperature and nucleus (top-p)
sampling from a generator seeded per batch. Continuations stop at an end-of-sequence token or
after ``max_new`` tokens. Degenerate texts (too few distinct 4-grams of tokens, or a token run)
are dropped, and near-duplicates of a kept text (MinHash estimate of the word 5-gram Jaccard
similarity at or above ``near_dup``, candidates found by banded LSH) too.

On disk (``out``): ``shard_XXXX.jsonl`` (one ``{"text", "batch", "row", "tokens"}`` per kept
text) and ``manifest.json`` (model fingerprint, seed, sampling settings, filters, openings,
shards, counts), written atomically after every shard. A killed run resumes from the last
complete shard and produces the same texts as an uninterrupted run: batch ``i`` depends only on
the seed and ``i``, and the duplicate filter is rebuilt from the kept shards.

This module never imports the engine (``tracer``): the caller passes the model, the tokenizer
and a fingerprint string identifying the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = "circuit-atlas generated text v1"

# Neutral topic openings: science, geography, history, everyday life, code. None is a demo or
# benchmark prompt (tests/transcoders/test_generate.py checks them against the prompt set).
OPENINGS: tuple[str, ...] = (
    # science
    "Photosynthesis is the process by which",
    "In physics, energy is defined as",
    "The human immune system protects the body by",
    "Water boils at a lower temperature at high altitude because",
    "A chemical reaction happens when",
    "The theory of evolution explains how",
    "Earthquakes are caused by",
    "The solar system consists of",
    "Cells are the basic units of life. Each cell",
    "Scientists measure the age of rocks using",
    "Electricity flows through a circuit when",
    "The water cycle describes how",
    "Vaccines work by",
    "Gravity is the force that",
    "An atom is made up of",
    "Climate and weather are different because",
    # geography
    "The Amazon rainforest covers",
    "Mountains form when",
    "Deserts are regions that receive",
    "Many of the world's largest cities are built near rivers because",
    "The Pacific Ocean is",
    "Islands can form in several ways. For example,",
    "A map shows",
    "The climate of a region depends on",
    "Rivers shape the land around them by",
    "Farmers in dry regions often rely on",
    # history
    "The invention of the printing press changed",
    "Ancient Egypt was a civilization that",
    "During the Industrial Revolution,",
    "The Roman Empire was known for",
    "In the Middle Ages, most people lived",
    "The first railways were built",
    "Historians study the past by",
    "The Silk Road connected",
    "World War I began in 1914 when",
    "The history of writing begins with",
    # everyday life
    "A healthy breakfast usually includes",
    "To plant a vegetable garden, you should first",
    "Saving money each month is easier when",
    "Here are some tips for getting a good night's sleep:",
    "When you cook pasta, it is important to",
    "Learning a new language takes time, but",
    "A good way to stay organized at work is",
    "Before a long road trip, drivers should check",
    "Many people enjoy walking in the park because",
    "To make a cup of tea,",
    "Children learn best when",
    "Recycling helps the environment by",
    # code
    "In Python, a list comprehension lets you",
    "The following function reads a file line by line:\n\n```python\n",
    "A for loop in JavaScript looks like this:\n\n```javascript\n",
    "To sort a dictionary by its values in Python,",
    "Here is a simple class that represents a bank account:\n\n```python\n",
    "SQL queries use the SELECT statement to",
    "Recursion is a technique in programming where",
    "A hash table stores data by",
    "To install a package with pip, run",
    "The difference between a list and a tuple in Python is",
    "Unit tests check that",
    "```python\nfrom collections import Counter\n\n",
)


class GenerateError(ValueError):
    """A generated corpus that cannot be used or continued; the message says what to do."""


@dataclass
class GenerateConfig:
    """``tokens``: tokens of kept text to reach (openings included; the run stops at the first
    shard boundary at or past it). ``batch``: openings sampled together; ``max_new``: tokens
    per continuation; ``temperature`` and ``top_p``: the sampling; ``shard_batches``: batches
    per shard (the unit of resumption). Filters: ``min_distinct`` (least share of distinct token
    4-grams), ``max_run`` (longest run of one token), ``near_dup`` (MinHash Jaccard at which a
    text is a near-duplicate of a kept one)."""

    tokens: int
    batch: int = 16
    max_new: int = 192
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    shard_batches: int = 4
    min_new: int = 24
    min_distinct: float = 0.6
    max_run: int = 8
    near_dup: float = 0.5
    openings: tuple[str, ...] = OPENINGS

    def __post_init__(self):
        if self.max_new < self.min_new:
            raise GenerateError(
                f"max_new {self.max_new} is below min_new {self.min_new} (the shortest "
                "continuation kept): every text would be dropped; raise --max-new"
            )

    def settings(self) -> dict:
        """What determines the texts (the manifest's record; ``tokens`` is only a target)."""
        d = asdict(self)
        d.pop("tokens")
        d["openings"] = hashlib.sha1("\n".join(self.openings).encode()).hexdigest()[:12]
        return d


# --- sampling --------------------------------------------------------------------------------


# transformers 5.x names the KV cache ``cache`` (``past_key_values`` before, now deprecated).
_CACHE_ARG = "cache"


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
    """Token ids [B] from logits [B, V]: softmax at ``temperature`` (0: greedy), restricted to
    the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # tokens after the nucleus is already full
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def sample_batch(
    model,
    prompts: list[list[int]],
    *,
    max_new: int,
    temperature: float,
    top_p: float,
    gen: torch.Generator,
    eos_ids: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new`` sampled tokens with a KV cache:
    prompts left-padded into one [B, T] prefill, then one [B, 1] step per token. Returns each
    continuation's ids (stopping before an end-of-sequence id). The model runs on its own
    device and dtype; sampling happens on the CPU with ``gen``."""
    dev = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
        use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    past = _cache_of(out)
    logits = out.logits[:, -1].float().cpu()
    next_pos = pos[:, -1] + 1
    done = torch.zeros(B, dtype=torch.bool)
    result: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new):
        tok = sample_next(logits, temperature, top_p, gen)
        for b in range(B):
            if not done[b]:
                if int(tok[b]) in eos_ids:
                    done[b] = True
                else:
                    result[b].append(int(tok[b]))
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
        out = model(
            input_ids=tok[:, None].to(dev), attention_mask=mask.to(dev),
            position_ids=next_pos[:, None].to(dev), use_cache=True, **{_CACHE_ARG: past},
        )  # fmt: skip
        past = _cache_of(out)
        logits = out.logits[:, -1].float().cpu()
        next_pos = next_pos + 1
    return result


# --- filters ---------------------------------------------------------------------------------


def degenerate(ids: list[int], min_distinct: float, max_run: int) -> bool:
    """Whether a token sequence is degenerate: a run of more than ``max_run`` equal tokens, or
    fewer than ``min_distinct`` of its 4-grams distinct (loops such as "the the the" or a
    repeated sentence)."""
    run = 1
    for a, b in zip(ids, ids[1:], strict=False):
        run = run + 1 if a == b else 1
        if run > max_run:
            return True
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return bool(grams) and len(set(grams)) < min_distinct * len(grams)


class NearDuplicates:
    """MinHash signatures (``n_hash`` = bands x rows) of word 5-gram shingles with banded LSH:
    :meth:`add` keeps a text unless a kept text's estimated Jaccard similarity is at least
    ``threshold``."""

    def __init__(self, threshold: float = 0.5, bands: int = 16, rows: int = 4, seed: int = 0):
        self.threshold = threshold
        self.bands, self.rows = bands, rows
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.a = rng.integers(1, (1 << 61) - 1, n, dtype=np.uint64)
        self.b = rng.integers(0, (1 << 61) - 1, n, dtype=np.uint64)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = text.lower().split()
        shingles = {" ".join(words[i : i + 5]) for i in range(max(1, len(words) - 4))}
        h = np.array(
            [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
             for s in shingles],
            dtype=np.uint64,
        )  # fmt: skip
        with np.errstate(over="ignore"):
            return (h[:, None] * self.a[None, :] + self.b[None, :]).min(0)

    def add(self, text: str) -> bool:
        """Keep ``text`` (True) or reject it as a near-duplicate of a kept text (False)."""
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        cands = {j for i, k in enumerate(keys) for j in self.tables[i].get(k, ())}
        for j in sorted(cands):
            if float((self.signatures[j] == sig).mean()) >= self.threshold:
                return False
        n = len(self.signatures)
        self.signatures.append(sig)
        for i, k in enumerate(keys):
            self.tables[i].setdefault(k, []).append(n)
        return True


# --- the resumable run -----------------------------------------------------------------------


@dataclass
class GenerateStats:
    kept: int = 0
    kept_tokens: int = 0
    generated_tokens: int = 0
    dropped_short: int = 0
    dropped_degenerate: int = 0
    dropped_near_duplicate: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _read_manifest(out: Path) -> dict | None:
    p = out / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def check_generated(out: str | os.PathLike, model_id: str) -> dict:
    """The manifest of the generated corpus at ``out``, refused (GenerateError) unless it was
    generated by the model with fingerprint ``model_id``."""
    m = _read_manifest(Path(out))
    if m is None:
        raise GenerateError(
            f"{out} holds no generated corpus (no {MANIFEST}): run "
            "'circuit-atlas corpus generate --model MODEL --tokens N' first"
        )
    if m.get("model_id") != model_id:
        raise GenerateError(
            f"{out} was generated by model {m.get('model')!r} ({m.get('model_id')}), not by this "
            f"model ({model_id}): generate a corpus for this model (another --out, or --force to "
            "replace it)"
        )
    return m


def read_generated(out: str | os.PathLike) -> list[str]:
    """The kept texts of a generated corpus, in order."""
    out = Path(out)
    m = _read_manifest(out)
    if m is None:
        raise GenerateError(f"{out} holds no generated corpus (no {MANIFEST})")
    texts = []
    for s in m["shards"]:
        with (out / s).open(encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    return texts


def generate_corpus(
    model,
    tokenizer,
    out: str | os.PathLike,
    cfg: GenerateConfig,
    *,
    model_id: str,
    model_name: str = "model",
    bos_id: int | None = None,
    progress: bool = True,
    force: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> GenerateStats:
    """Generate (or continue generating) text from ``model`` into ``out`` until ``cfg.tokens``
    tokens of kept text. ``tokenizer(text, add_special_tokens=False)["input_ids"]`` and
    ``tokenizer.decode(ids)`` are used; ``bos_id`` starts every prompt when given. An existing
    corpus at ``out`` is continued if it has the same model fingerprint and settings, refused
    otherwise (``force`` deletes it first). ``on_batch(i)`` is called after each batch."""
    out = Path(out)
    settings = cfg.settings()
    m = _read_manifest(out)
    if m is not None and force:
        for f in out.iterdir():
            f.unlink()
        m = None
    if m is not None:
        check_generated(out, model_id)
        if m["settings"] != settings:
            changed = sorted(k for k in settings if m["settings"].get(k) != settings[k])
            raise GenerateError(
                f"{out} was generated with other settings ({', '.join(changed)} differ): use "
                "another --out, the same settings, or --force to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = {int(eos)} if eos is not None else set()
    pad_id = int(eos if eos is not None else 0)
    open_ids = [
        ([bos_id] if bos_id is not None else [])
        + tokenizer(o, add_special_tokens=False)["input_ids"]
        for o in cfg.openings
    ]
    dedup = NearDuplicates(cfg.near_dup, seed=cfg.seed)
    stats = GenerateStats()
    if m is None:
        m = {
            "format": FORMAT,
            "model": model_name,
            "model_id": model_id,
            "seed": cfg.seed,
            "settings": settings,
            "filters": {
                "min_new_tokens": cfg.min_new,
                "min_distinct_4grams": cfg.min_distinct,
                "max_token_run": cfg.max_run,
                "near_duplicate_jaccard": cfg.near_dup,
                "near_duplicate_method": "MinHash 16x4 bands over word 5-grams",
            },
            "licence": "text generated by the model (its licence applies; SmolLM2: Apache-2.0)",
            "shards": [],
            "next_batch": 0,
            "stats": asdict(stats),
        }
    else:
        for t in read_generated(out):
            dedup.add(t)
        stats = GenerateStats(**m["stats"])
    if stats.kept_tokens >= cfg.tokens:
        return stats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.tokens, initial=stats.kept_tokens, unit="tok", desc="generating",
                   file=sys.stderr, mininterval=2.0)  # fmt: skip
    t_run = time.perf_counter()
    gen_run = 0
    empty_shards = 0
    model.eval()
    while stats.kept_tokens < cfg.tokens:
        shard = len(m["shards"])
        rows = []
        t0 = time.perf_counter()
        for k in range(cfg.shard_batches):
            i = m["next_batch"] + k
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
            pick = torch.randint(len(open_ids), (cfg.batch,), generator=gen).tolist()
            conts = sample_batch(
                model, [open_ids[j] for j in pick], max_new=cfg.max_new,
                temperature=cfg.temperature, top_p=cfg.top_p, gen=gen, eos_ids=eos_ids,
                pad_id=pad_id,
            )  # fmt: skip
            for r, (j, c) in enumerate(zip(pick, conts, strict=True)):
                stats.generated_tokens += len(c)
                gen_run += len(c)
                if len(c) < cfg.min_new:
                    stats.dropped_short += 1
                    continue
                if degenerate(c, cfg.min_distinct, cfg.max_run):
                    stats.dropped_degenerate += 1
                    continue
                text = (cfg.openings[j] + tokenizer.decode(c)).strip()
                if not dedup.add(text):
                    stats.dropped_near_duplicate += 1
                    continue
                n_tok = len(open_ids[j]) + len(c)
                rows.append({"text": text, "batch": i, "row": r, "tokens": n_tok})
                stats.kept += 1
                stats.kept_tokens += n_tok
                if bar is not None:
                    bar.update(n_tok)
            if bar is not None:
                rate = gen_run / max(1e-9, time.perf_counter() - t_run)
                bar.set_postfix_str(f"{rate:.0f} generated tok/s", refresh=False)
            if on_batch is not None:
                on_batch(i)
        empty_shards = 0 if rows else empty_shards + 1
        if empty_shards >= 8:
            raise GenerateError(
                f"the last 8 shards kept no text ({stats.dropped_short} short, "
                f"{stats.dropped_degenerate} degenerate, {stats.dropped_near_duplicate} "
                "near-duplicates so far): the model's samples fail the filters; check the model "
                "or loosen the filters"
            )
        name = f"shard_{shard:04d}.jsonl"
        tmp = out / (name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out / name)
        stats.seconds += time.perf_counter() - t0
        m["shards"].append(name)
        m["next_batch"] += cfg.shard_batches
        m["stats"] = asdict(stats)
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(m, indent=2))
        os.replace(tmp, out / MANIFEST)
    if bar is not None:
        bar.close()
    return stats
