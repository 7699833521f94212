"""Transcoder identity: a readable name plus a content fingerprint that follows the weights and
the computational config, not the folder, format or load dtype."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch
from model_fixtures import make_random_clt

from transcoders.formats import convert_transcoder, load_transcoder, save_transcoder
from transcoders.identity import (
    COMPUTATIONAL_FIELDS,
    DECODER_ROWS,
    ENCODER_ROWS,
    TranscoderIdentity,
    default_name,
    fingerprint,
    is_identity,
)


def _independent_fingerprint(clt) -> str:
    """The documented recipe, written out again: config JSON, full biases and thresholds, then
    per layer the evenly spread encoder / decoder rows, all as bfloat16 bytes."""
    cfg = clt.cfg
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({k: getattr(cfg, k) for k in COMPUTATIONAL_FIELDS}, sort_keys=True,
                        default=str).encode())  # fmt: skip

    def feed(t):
        t = t.detach().to(torch.bfloat16).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())

    for t in (clt.b_enc, clt.b_dec, clt.threshold):
        feed(t)
    F = cfg.n_features
    enc = torch.arange(F) if F <= ENCODER_ROWS else None
    dec = torch.arange(F) if F <= DECODER_ROWS else None
    for layer in range(cfg.n_layers):
        feed(clt.W_enc[layer][enc])
        feed(clt.decoder(layer)[dec])
    return h.hexdigest()


def test_fingerprint_follows_documented_recipe():
    clt = make_random_clt(3, 16, 32, seed=1)
    assert fingerprint(clt) == _independent_fingerprint(clt)
    ident = clt.identity
    assert ident.name == default_name(clt.cfg) == "model-clt-32"
    assert is_identity(ident.id) and TranscoderIdentity.parse(ident.id) == ident


def test_identity_changes_with_weights_and_config_only():
    a = make_random_clt(3, 16, 32, seed=1)
    base = a.identity.id
    assert make_random_clt(3, 16, 32, seed=2).identity.id != base  # a retrain
    with torch.no_grad():
        a.b_enc[2, 7] += 0.01
    assert a.identity.id != base  # one bias moved
    with torch.no_grad():
        a.b_enc[2, 7] -= 0.01
    assert a.identity.id == base
    a.cfg = replace(a.cfg, input_site="resid_mid")  # reads another site: computes otherwise
    assert a.identity.fingerprint != TranscoderIdentity.parse(base).fingerprint
    a.cfg = replace(a.cfg, input_site="mlp_in", training={"nmse": 0.3}, name="my-clt")
    assert a.identity.fingerprint == TranscoderIdentity.parse(base).fingerprint
    assert a.identity.name == "my-clt"


def test_identity_survives_copy_format_and_dtype(tmp_path):
    clt = make_random_clt(3, 16, 300, seed=4)  # wider than the row samples
    want = clt.identity
    save_transcoder(clt, tmp_path / "a")
    stored = json.loads((tmp_path / "a" / "circuit_atlas.json").read_text())
    assert stored["fingerprint"] == want.fingerprint
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    for path in ("a", "copy"):
        loaded = load_transcoder(tmp_path / path, lazy=True)
        assert loaded.identity == want
        assert all(not loaded.decoder_loaded(i) for i in range(3))  # fingerprint read rows only
    # Without our config file (a plain circuit-tracer folder) it is computed from the weights.
    (tmp_path / "copy" / "circuit_atlas.json").unlink()
    bare = load_transcoder(tmp_path / "copy", model_name=None)
    assert bare.identity.fingerprint == fingerprint(bare)
    # Stored in bfloat16: the same identity (values are hashed at bfloat16 precision).
    convert_transcoder(tmp_path / "a", tmp_path / "bf16", dtype="bfloat16")
    assert load_transcoder(tmp_path / "bf16").identity == want


def test_parse_refuses_bare_names():
    with pytest.raises(ValueError, match="not a transcoder identity.*store migrate"):
        TranscoderIdentity.parse("smollm2-135m-instruct")
    assert not is_identity("smollm2") and not is_identity("@abc") and is_identity("a@b")


def test_published_name_is_repository_subfolder_and_revision():
    """A published transcoder's readable name (transcoders.identity.hub_name): key-safe, a
    commit shortened to 12 hex digits, a branch kept; identities parse back."""
    from transcoders.identity import hub_name

    commit = "0123456789abcdef0123456789abcdef01234567"
    name = hub_name("mntss/clt-gemma-2-2b-2.5M", None, commit)
    assert name == "mntss--clt-gemma-2-2b-2.5M+0123456789ab"
    assert hub_name("mwhanna/gemma-scope-2-1b-pt", "transcoder_all/width_16k_l0_small_affine",
                    "main") == "mwhanna--gemma-scope-2-1b-pt--transcoder_all--width_16k_l0_small_affine+main"  # fmt: skip # noqa: E501
    ident = TranscoderIdentity(name, "f" * 16)
    assert TranscoderIdentity.parse(ident.id) == ident and "/" not in ident.id
    assert hub_name("o/r", None, None) == "o--r"
