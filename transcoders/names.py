"""Transcoder identity strings, torch-free: ``name@fingerprint``.

The identity itself (the fingerprint of weights and config) is computed in
:mod:`transcoders.identity`, which needs torch; this module holds only the rule for reading the
string, so the graph store can check names without loading torch.
"""

from __future__ import annotations


def is_identity(text: str | None) -> bool:
    """Whether ``text`` has the ``name@fingerprint`` form (both parts non-empty)."""
    if not text:
        return False
    name, sep, fp = str(text).rpartition("@")
    return bool(sep and name and fp)
