"""The ``circuit-atlas`` command line: the only place that wires transcoders, tracer and
graphstore together. Each command group lives in its own module with a ``register(subparsers)``
function; add a module to COMMAND_MODULES to add commands.

A call imports only the module of the command it names (``COMMANDS``), so a light command
(``cypher``, ``query``, ``store``) loads no torch; ``--help`` or an unlisted command builds the
whole parser.

What it may import: everything (transcoders, tracer, graphstore): with the explorer, the
only room that wires the three together."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "tracer.cli.model_cmd",
    "tracer.cli.trace_cmd",
    "tracer.cli.report_cmd",
    "tracer.cli.transcoders_cmd",
    "tracer.cli.train_cmd",
    "tracer.cli.store_cmd",
    "tracer.cli.validate_cmd",
    "tracer.cli.demo_cmd",
    "tracer.cli.serve_cmd",
    "tracer.cli.supernodes_cmd",
    "tracer.cli.contrast_cmd",
    "tracer.cli.weights_cmd",
    "tracer.cli.swap_cmd",
    "tracer.cli.paths_cmd",
    "tracer.cli.qk_cmd",
]

# command -> the module that registers it (the rest are found by building the whole parser)
COMMANDS = {
    "model": "tracer.cli.model_cmd",
    "trace": "tracer.cli.trace_cmd",
    "report": "tracer.cli.report_cmd",
    "transcoders": "tracer.cli.transcoders_cmd",
    "corpus": "tracer.cli.train_cmd",
    "store": "tracer.cli.store_cmd",
    "query": "tracer.cli.store_cmd",
    "cypher": "tracer.cli.store_cmd",
    "validate": "tracer.cli.validate_cmd",
    "steer": "tracer.cli.validate_cmd",
    "demo": "tracer.cli.demo_cmd",
    "serve": "tracer.cli.serve_cmd",
    "supernodes": "tracer.cli.supernodes_cmd",
    "contrast": "tracer.cli.contrast_cmd",
    "weights": "tracer.cli.weights_cmd",
    "swap": "tracer.cli.swap_cmd",
    "paths": "tracer.cli.paths_cmd",
    "qk": "tracer.cli.qk_cmd",
}


class CLIError(Exception):
    """An error the CLI prints as one line (no traceback)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (``command`` listed in COMMANDS) of that one alone."""
    parser = argparse.ArgumentParser(
        prog="circuit-atlas",
        description="Attribution graphs with cross-layer transcoders, stored in a graph database.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        # Our errors carry a message naming the problem and the fix; show it, not a traceback.
        print(f"circuit-atlas: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
