"""The ``circuit-atlas`` command line: the only place that wires transcoders, tracer and
graphstore together. Each command group lives in its own module with a ``register(subparsers)``
function; add a module to COMMAND_MODULES to add commands."""

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
]


class CLIError(Exception):
    """An error the CLI prints as one line (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuit-atlas",
        description="Attribution graphs with cross-layer transcoders, stored in a graph database.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        # Our errors carry a message naming the problem and the fix; show it, not a traceback.
        print(f"circuit-atlas: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
