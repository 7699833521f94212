"""Renamed: the prompt check lives in tracer.analyses.prompt_check and scripts/check_prompts.py
(this
name forwards there so old commands keep working).

    .venv/bin/python scripts/eval_prompts.py [--model smollm2] [--prompts FILE]
"""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("check_prompts.py")), run_name="__main__")
