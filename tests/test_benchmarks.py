"""The results folder stays an honest index: every file in benchmarks/ is listed in
benchmarks/README.md (with its command, machine, date and commit), and no file holds an absolute
path of the machine that wrote it (results are read on other machines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# An absolute path into a machine's own folders (system tools such as /usr/bin/time are fine).
MACHINE_PATH = re.compile(r"(?<![\w<>$.~/-])/(?:work|tmp|root|home|mnt|srv|var|opt)/\S*")
FILES = sorted(p for p in BENCH.iterdir() if p.is_file() and p.name != "README.md")


def index_text() -> str:
    return (BENCH / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_absolute_machine_paths(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    found = sorted(set(MACHINE_PATH.findall(text)))
    assert found == [], f"{path.name} holds machine paths {found[:5]}: write them relative"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_result_is_indexed(path):
    # A row names `stem.json` or `stem.md` (or `stem.json`, `.md` for the pair).
    assert f"`{path.stem}." in index_text(), f"{path.name} has no row in benchmarks/README.md"


def test_index_rows_name_command_machine_date_and_commit():
    rows = [ln for ln in index_text().splitlines() if ln.startswith("| `")]
    assert rows, "benchmarks/README.md has no index rows"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7, f"an index row needs 7 cells: {row[:80]}"
        _files, _question, command, machine, date, commit, _headline = cells
        assert command.startswith("`") or "`" in command, f"no command in: {row[:80]}"
        assert machine, f"no machine in: {row[:80]}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), f"bad date {date!r}"
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), f"bad commit {commit!r}"


def test_the_path_check_catches_a_machine_path():
    text = '{"out": "/work/clt60", "tool": "/usr/bin/time"}'
    assert MACHINE_PATH.findall(text) == ['/work/clt60",']
    assert MACHINE_PATH.findall("$CIRCUIT_ATLAS_HOME/x <scratch>/y runs/z") == []
