"""The one device/dtype setting: parsing, clear errors, what auto picks."""

from __future__ import annotations

import argparse

import pytest
import torch

from transcoders.device import (
    DeviceError,
    DeviceSetting,
    add_device_arguments,
    parse_device,
    parse_dtype,
    setting_from_args,
)


def test_dtype_names_and_errors():
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(None) is torch.float32
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(DeviceError, match="unknown dtype 'float8'.*float32, bfloat16, float16"):
        parse_dtype("float8")
    with pytest.raises(DeviceError, match="not supported"):
        parse_dtype(torch.int8)


def test_device_auto_cpu_and_errors():
    auto = parse_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is visible.*--device cpu"):
            parse_device("cuda")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            parse_device("cuda:1")


def test_setting_from_command_line():
    p = argparse.ArgumentParser()
    add_device_arguments(p)
    s = setting_from_args(p.parse_args(["--device", "cpu", "--dtype", "bfloat16"]))
    assert s == DeviceSetting(torch.device("cpu"), torch.bfloat16)
    assert s.compute_dtype is torch.float32
    assert s.to_dict() == {"device": "cpu", "dtype": "bfloat16"}
    assert DeviceSetting.parse(s) is s
    assert DeviceSetting.parse(s, "float16").dtype is torch.float16
    with pytest.raises(DeviceError):
        setting_from_args(p.parse_args(["--dtype", "int4"]))
