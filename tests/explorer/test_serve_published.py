"""`circuit-atlas serve --transcoders` takes what every other command takes: a folder, or a
published name (preset, hub id, hf://), resolved only when an intervention needs the model."""

from __future__ import annotations

import pytest

from tracer.cli import build_parser
from tracer.cli.serve_cmd import build


def _args(tmp_path, transcoders):
    graphs = tmp_path / "graphs"
    graphs.mkdir(exist_ok=True)
    return build_parser("serve").parse_args(
        ["serve", "--graphs", str(graphs), "--transcoders", transcoders, "--no-token"]
    )


@pytest.mark.parametrize("name", ["gemma", "mntss/clt-gemma-2-2b-426k", "hf://org/repo/layer_0"])
def test_published_names_are_not_refused_as_missing_folders(tmp_path, name):
    app, store = build(_args(tmp_path, name))
    assert store is None and app is not None
    # interventions are offered; the name is resolved (and, offline, refused) only when used
    assert app.state.explorer.interventions.available


def test_a_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(_args(tmp_path, str(tmp_path / "no-such-clt")))
