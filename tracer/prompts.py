"""Prompt lists: the shipped set (``tracer/data/prompts.jsonl``) and user files.

A prompt file is either JSON Lines, one object per line with ``prompt`` and optional
``category`` and ``answer`` (the expected next token, with its leading space), or plain text
with one prompt per line (blank lines and lines starting with ``#`` are skipped; write a
newline inside a prompt as ``\\n``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# The demo's five prompts (also the prompt set of the training metric
# tracer.analyses.prompt_scores).
# Chosen from benchmarks/prompts.md: each answered top-1 with p >= 0.3 by SmolLM2 (the Dallas
# two-hop prompt is not: ' Austin' p 0.004, rank 26).
DEMO_PROMPTS = (
    "The capital of the country where the Eiffel Tower stands is",  # two-hop: Paris p 0.55
    "The capital of France is",  # fact recall: Paris p 0.75
    'The opposite of "hot" is "',  # antonym: cold p 0.58
    "def add(a, b):\n    return a",  # code completion: + p 0.74
    "Mary had a little lamb, its fleece was white as",  # rhyme / memorised text: snow p 0.80
)


class PromptFileError(ValueError):
    """A prompt file that cannot be read."""


@dataclass(frozen=True)
class Prompt:
    prompt: str
    category: str = ""
    answer: str = ""  # the expected next token's text ("" when not given)


def default_prompts_path() -> Path:
    """The shipped prompt set."""
    return Path(str(resources.files("tracer") / "data" / "prompts.jsonl"))


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read a prompt file (the shipped set when ``path`` is None)."""
    path = Path(path) if path is not None else default_prompts_path()
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path} is not UTF-8 text: {err}") from err
    out: list[Prompt] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt = rec["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise PromptFileError(
                    f"{path} line {n}: expected a JSON object with a 'prompt' string ({err})"
                ) from err
            if not isinstance(prompt, str) or not prompt:
                raise PromptFileError(f"{path} line {n}: 'prompt' must be a non-empty string")
            out.append(Prompt(prompt, str(rec.get("category", "")), str(rec.get("answer", ""))))
    else:
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(Prompt(line.replace("\\n", "\n")))
    if not out:
        raise PromptFileError(f"{path} holds no prompts")
    return out
