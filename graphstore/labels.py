"""Feature labels people write in the explorer, one per feature identity, shown in every graph
that has the feature.

Schema: ``(:FeatureLabel {key, transcoder, layer, index, label, updated_ms})`` with ``key`` the
feature's key (:func:`graphstore.schema.feature_key`: transcoder identity, layer, index), so a
label belongs to one transcoder's feature, not to a graph. A label node exists without the
``(:Feature)`` node (a feature seen only in a folder graph can be labelled); Cypher joins them
by key: ``MATCH (f:Feature), (l:FeatureLabel {key: f.key}) RETURN f.layer, f.index, l.label``.
Saving an empty label removes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from graphstore.errors import StoreWriteError
from graphstore.schema import feature_key

MAX_LABEL = 200

SAVE = """
MERGE (l:FeatureLabel {key: $key})
SET l.transcoder = $transcoder, l.layer = $layer, l.index = $index, l.label = $label,
    l.updated_ms = $now
RETURN l.key AS key
"""

DELETE = "MATCH (l:FeatureLabel {key: $key}) DELETE l"

LIST = """
MATCH (l:FeatureLabel {transcoder: $transcoder})
RETURN l.layer AS layer, l.index AS index, l.label AS label
"""


def check_label(label: str) -> str:
    """The label stripped; ValueError for one that is not a string or too long."""
    if not isinstance(label, str):
        raise ValueError("a feature label must be a string")
    label = " ".join(label.split())
    if len(label) > MAX_LABEL:
        raise ValueError(f"a feature label of {len(label)} characters: at most {MAX_LABEL}")
    return label


def set_label(session, transcoder: str, layer: int, index: int, label: str) -> str:
    """Store ``label`` for feature (layer, index) of ``transcoder`` (replacing any earlier one;
    an empty label removes it). Returns the label as stored. StoreWriteError if the write
    fails (nothing is written)."""
    import neo4j

    label = check_label(label)
    key = feature_key(transcoder, layer, index)
    try:
        if label:
            session.execute_write(
                lambda tx: tx.run(SAVE, key=key, transcoder=transcoder, layer=int(layer),
                                  index=int(index), label=label,
                                  now=int(time.time() * 1000)).consume()
            )  # fmt: skip
        else:
            session.execute_write(lambda tx: tx.run(DELETE, key=key).consume())
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
        raise StoreWriteError(
            f"saving the label of feature {layer}/{index} failed ({err}); nothing was written: "
            "save it again once the server is back"
        ) from err
    return label


def labels(
    session, transcoder: str, features: Iterable[tuple[int, int]] | None = None
) -> dict[tuple[int, int], str]:
    """``{(layer, index): label}`` of ``transcoder``'s labelled features (only those in
    ``features`` when given)."""
    rows = session.execute_read(lambda tx: tx.run(LIST, transcoder=transcoder).data())
    out = {(int(r["layer"]), int(r["index"])): str(r["label"]) for r in rows if r["label"]}
    if features is not None:
        want = {(int(a), int(b)) for a, b in features}
        out = {k: v for k, v in out.items() if k in want}
    return out
