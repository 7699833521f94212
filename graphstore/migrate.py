"""Migrating a store written before transcoder identities.

Stores written before identities keyed ``(:Transcoder)`` by a bare name (in practice the model
name, shared by every transcoder of that model) and ``(:Feature)`` by ``<name>/<layer>/<index>``,
so features of different transcoders could merge. :func:`legacy_transcoders` finds such names;
:func:`migrate_identities` renames each to an identity ``name@fingerprint`` (given by the caller,
who computes it from the transcoder's files, or ``name@unverified`` when the files are gone) in
one transaction per transcoder: the ``(:Transcoder)`` node, every ``(:Feature)`` key and
``transcoder`` property, and every ``(:Graph)``'s ``transcoder``. Nothing is deleted; graph ids
stay as they were. A failed migration leaves that transcoder's records as they were.

Only the command-line layer computes identities from files (it may import torch); this module
takes strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphstore.errors import StoreError
from transcoders.names import is_identity

_LIST = "MATCH (t:Transcoder) RETURN t.name AS name, t.model AS model"
_FEATURE_KEYS = "MATCH (f:Feature {transcoder: $old}) RETURN f.key AS key"
_RENAME_TRANSCODER = """
MATCH (t:Transcoder {name: $old})
SET t.name = $new, t.legacy_name = $old, t.fingerprint = $fingerprint, t.readable = $readable
RETURN count(t) AS n
"""
_RENAME_FEATURES = """
UNWIND $rows AS r
MATCH (f:Feature {key: r[0]})
SET f.key = r[1], f.transcoder = $new
RETURN count(f) AS n
"""
_RENAME_GRAPHS = "MATCH (g:Graph {transcoder: $old}) SET g.transcoder = $new RETURN count(g) AS n"
_BATCH = 5000


def legacy_transcoders(session) -> dict[str, str | None]:
    """Bare transcoder names in the store (no ``@fingerprint``) -> their model."""
    rows = session.execute_read(lambda tx: [r.data() for r in tx.run(_LIST)])
    return {r["name"]: r["model"] for r in rows if not is_identity(r["name"])}


def migrate_command(names: dict[str, str | None]) -> str:
    """The command that migrates these legacy names (shown in the refusal)."""
    args = " ".join(f"--transcoder {n}=PATH" for n in sorted(names))
    return f"circuit-atlas store migrate {args} (or --unverified when the files are gone)"


@dataclass
class MigrationResult:
    old: str
    new: str
    features: int
    graphs: int


def migrate_identities(session, mapping: dict[str, str]) -> list[MigrationResult]:
    """Rename each legacy transcoder ``old`` -> identity ``new`` (see the module docstring).
    One write transaction per transcoder; a failure rolls that transcoder back whole."""
    results = []
    for old, new in mapping.items():
        if not is_identity(new):
            raise StoreError(f"{new!r} is not a transcoder identity 'name@fingerprint'")
        readable, _, fingerprint = new.rpartition("@")

        def work(tx, old=old, new=new, readable=readable, fingerprint=fingerprint):
            n = tx.run(
                _RENAME_TRANSCODER, old=old, new=new, fingerprint=fingerprint, readable=readable
            ).single()["n"]
            if n != 1:
                raise StoreError(f"the store holds no transcoder named {old!r}")
            keys = [r["key"] for r in tx.run(_FEATURE_KEYS, old=old)]
            done = 0
            for i in range(0, len(keys), _BATCH):
                rows = [[k, new + k[len(old) :]] for k in keys[i : i + _BATCH]]
                done += tx.run(_RENAME_FEATURES, rows=rows, new=new).single()["n"]
            graphs = tx.run(_RENAME_GRAPHS, old=old, new=new).single()["n"]
            return MigrationResult(old, new, done, graphs)

        results.append(session.execute_write(work))
    return results
