"""The command line's model group: `circuit-atlas model info|fetch`, through tracer.cli.main."""

from __future__ import annotations

import pytest

from tracer.cli import main


def test_model_info_smollm2(capsys):
    assert main(["model", "info", "smollm2", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "model smollm2: llama, 30 layers, d_model 576, vocab 49152"
    assert out[1].startswith("prompt 'The capital of France is': 6 tokens [")
    assert out[2].startswith("forward pass: ") and out[2].endswith("top next tokens:")
    tops = out[3:]
    assert len(tops) == 3
    probs = [float(line.split()[0]) for line in tops]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    assert "' Paris'" in tops[0]


def test_model_info_custom_prompt(capsys):
    assert main(["model", "info", "smollm2", "--prompt", "One, two, three,", "--top", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("prompt 'One, two, three,':") and len(out) == 4
    assert "' four'" in out[3]


def test_model_fetch_is_quick_when_cached(capsys):
    from tracer.fetch import fetch_smollm2

    assert main(["model", "fetch", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(fetch_smollm2(verbose=False))


def _one_line_error(capsys) -> str:
    """The error, printed as exactly one line (transformers' weight-loading progress bars may
    come before it on stderr), and no traceback."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("circuit-atlas: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert "Traceback" not in captured.err
    return errors[0]


def test_missing_model_path_exits_2_with_one_line(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    assert main(["model", "info", str(missing)]) == 2
    line = _one_line_error(capsys)
    assert f"model path '{missing}' does not exist" in line
    assert "Give a folder with config.json" in line


def test_unsupported_architecture_exits_2(capsys, tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    vocab_size=50, max_position_embeddings=32, word_embed_proj_dim=16)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["model", "info", str(tmp_path)]) == 2
    assert "unknown architecture 'opt'" in _one_line_error(capsys)


def test_empty_prompt_exits_2(capsys):
    assert main(["model", "info", "smollm2", "--prompt", "  "]) == 2
    assert "empty prompt" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["model"],
        ["model", "info"],
        ["model", "fetch", "gpt5"],
        ["model", "info", "x", "--top", "0"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "usage: circuit-atlas model" in capsys.readouterr().err
