"""Feature labels kept per feature identity (graphstore.labels through GraphStore)."""

from __future__ import annotations

import pytest

from graphstore.labels import MAX_LABEL


def test_labels_round_trip_per_transcoder(store):
    tc, other = "clt-label-test@0001", "clt-label-test@0002"
    try:
        assert store.set_feature_label(tc, 3, 17, "  capital   cities ") == "capital cities"
        store.set_feature_label(tc, 4, 2, "France")
        store.set_feature_label(other, 3, 17, "another transcoder's")
        assert store.feature_labels(tc) == {(3, 17): "capital cities", (4, 2): "France"}
        assert store.feature_labels(tc, [(3, 17), (9, 9)]) == {(3, 17): "capital cities"}
        assert store.feature_labels(other) == {(3, 17): "another transcoder's"}
        store.set_feature_label(tc, 3, 17, "replaced")  # one label per feature identity
        assert store.feature_labels(tc)[(3, 17)] == "replaced"
        assert store.cypher(
            "MATCH (l:FeatureLabel {key: $k}) RETURN count(l) AS c", {"k": f"{tc}/3/17"}
        ).rows == [[1]]
        store.set_feature_label(tc, 3, 17, "")  # empty: removed
        assert store.feature_labels(tc) == {(4, 2): "France"}
        with pytest.raises(ValueError, match="at most"):
            store.set_feature_label(tc, 1, 1, "x" * (MAX_LABEL + 1))
        assert store.feature_labels(tc) == {(4, 2): "France"}
    finally:
        for t, layer, i in ((tc, 4, 2), (other, 3, 17), (tc, 3, 17)):
            store.set_feature_label(t, layer, i, "")
