"""The packages' import directions (DESIGN.md: transcoders -> tracer -> graphstore; only the apps
wire all three) and the light core: ``import graphstore`` loads neither torch nor transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# graphstore reads the graph type only: these tracer modules are numpy/pyarrow, no torch.
TORCH_FREE_CORE = {"tracer.graph", "tracer.subgraph"}
APPS = ("tracer/cli/", "tracer/explorer/")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included), absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "node_modules" not in p.parts)


def offenders(package: str, allowed) -> list[str]:
    bad = []
    for path in package_files(package):
        rel = path.relative_to(ROOT).as_posix()
        for name in sorted(imported_modules(path)):
            top = name.split(".")[0]
            if top in ("tracer", "transcoders", "graphstore") and not allowed(rel, name):
                bad.append(f"{rel} imports {name}")
    return bad


def test_transcoders_import_neither_tracer_nor_graphstore():
    assert offenders("transcoders", lambda rel, name: name.startswith("transcoders")) == []


def test_graphstore_imports_only_the_torch_free_graph_core_of_tracer():
    def allowed(rel, name):
        if name.startswith(("graphstore", "transcoders.names")):
            return True
        # ``from tracer.graph import Graph`` records both "tracer.graph" and "tracer.graph.Graph"
        return any(name == m or name.startswith(m + ".") for m in TORCH_FREE_CORE)

    assert offenders("graphstore", allowed) == []


def test_only_the_apps_import_graphstore():
    def allowed(rel, name):
        return not name.startswith("graphstore") or rel.startswith(APPS)

    assert offenders("tracer", allowed) == []


@pytest.mark.parametrize("module", ["graphstore", "tracer.graph", "tracer.subgraph", "tracer"])
def test_light_core_loads_no_torch(module):
    code = (
        f"import sys, {module}; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_lazy_names_are_the_functions_even_after_their_modules_load():
    """``tracer.prune`` (function and module of one name) stays the function after its
    module is imported; the package names that live in rooms are the rooms' functions."""
    code = (
        "import tracer.prune, tracer.analyses.validate, tracer.analyses.paths, "
        "transcoders.training.run; "
        "import tracer, transcoders; "
        "from tracer.prune import prune; from tracer.analyses.validate import validate; "
        "from transcoders.training.run import train; from tracer.analyses.paths import paths; "
        "assert tracer.prune is prune and tracer.validate is validate; "
        "assert transcoders.train is train and tracer.paths is paths; "
        "from tracer import Graph; from tracer.graph import Graph as G; assert Graph is G; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


ROOMS = [
    "transcoders/formats", "transcoders/training", "transcoders/corpora", "tracer/analyses",
    "tracer/reports", "tracer/attribution", "tracer/attention", "tracer/batch", "tracer/cli",
    "tracer/explorer", "tracer", "transcoders", "graphstore",
]  # fmt: skip


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_says_what_it_holds_and_may_import(room):
    text = (ROOT / room / "__init__.py").read_text()
    doc = " ".join((ast.get_docstring(ast.parse(text)) or "").split())
    assert len(doc.split()) >= 12, f"{room}/__init__.py: say what the room holds"
    assert "may import" in doc.lower() or "knows nothing of" in doc.lower(), (
        f"{room}/__init__.py: say what the room may import"
    )


def test_light_commands_load_no_torch():
    """`circuit-atlas cypher/query/store` build only their own parser: no torch import."""
    code = (
        "import sys; from tracer.cli import build_parser; "
        "p = build_parser('cypher'); p.parse_args(['cypher', 'RETURN 1']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_the_command_table_names_each_commands_module():
    """COMMANDS (which module a call imports) agrees with what each module registers, so a
    light command never builds the whole parser and a new command is not forgotten."""
    import argparse
    import importlib

    from tracer.cli import COMMAND_MODULES, COMMANDS

    registered = {}
    for name in COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        importlib.import_module(name).register(parser.add_subparsers(dest="command"))
        registered.update(dict.fromkeys(parser._subparsers._group_actions[0].choices, name))
    assert registered == COMMANDS
