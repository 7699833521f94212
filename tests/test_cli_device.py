"""--device / --dtype on every computing command: a bad value is one clear line, exit 2,
before any model or transcoder is loaded (the paths given here do not even exist)."""

from __future__ import annotations

import pytest
import torch

from tracer.cli import build_parser, main

COMMANDS = {
    "trace": ["trace", "hello", "--transcoders", "no-such-clt"],
    "validate": ["validate", "no-such-graph.parquet", "--transcoders", "no-such-clt"],
    "steer": ["steer", "hello", "--transcoders", "no-such-clt", "--set", "1/2=3"],
    "model info": ["model", "info", "no-such-model"],
    "transcoders train": ["transcoders", "train", "--model", "no-such-model"],
    "demo": ["demo", "--out", "no-such-folder/demo"],
    "supernodes": ["supernodes", "no-such-graph.parquet", "--transcoders", "no-such-clt"],
    "weights": ["weights", "--transcoders", "no-such-clt"],
    "swap": ["swap", "a.parquet", "b.parquet", "--remove", "s0", "--transcoders", "no-such-clt"],
}


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("name", COMMANDS)
def test_unknown_dtype_exits_2_with_one_line(name, capsys):
    assert main([*COMMANDS[name], "--dtype", "float8"]) == 2
    assert _error_line(capsys) == (
        "circuit-atlas: error: unknown dtype 'float8': use one of float32, bfloat16, float16"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; a GPU is present")
@pytest.mark.parametrize("name", COMMANDS)
def test_cuda_without_gpu_exits_2_with_one_line(name, capsys):
    assert main([*COMMANDS[name], "--device", "cuda"]) == 2
    assert _error_line(capsys) == (
        "circuit-atlas: error: device 'cuda' asked for, but no CUDA GPU is visible to torch: "
        "use --device cpu (or auto)"
    )


def test_unknown_device_exits_2(capsys):
    assert main([*COMMANDS["trace"], "--device", "tpu"]) == 2
    assert _error_line(capsys) == (
        "circuit-atlas: error: unknown device 'tpu': use auto (CUDA when present), cpu, cuda "
        "or cuda:N"
    )


def test_every_computing_command_has_both_flags():
    parser = build_parser()
    for name, argv in COMMANDS.items():
        args = parser.parse_args(argv)
        assert (args.device, args.dtype) == ("auto", "float32"), name
