"""Feature information for reports: the dict/JSON shape and the feature-contexts table."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracer.reports.feature_book import (
    CONTEXTS_FILE,
    Context,
    FeatureBook,
    FeatureInfoError,
    load_features,
)


def _table() -> pa.Table:
    """Two features in the columns the transcoder training step writes."""
    return pa.table({
        "layer": [0, 2],
        "feature": [5, 7],
        "frequency": [0.0125, 0.0],
        "max_activation": [4.0, 0.0],
        "mean_activation": [1.5, 0.0],
        "top_activations": [[4.0, 2.5], []],
        "top_contexts": [["the state of «Texas», which", "«Austin» is"], []],
        "top_tokens": [["Texas", "Austin"], []],
        "hist_edges": [[0.0, 2.0, 4.0], []],
        "hist_counts": [[30, 4], []],
        "promoted_tokens": [[" Austin", " Texas"], [" the", " a"]],
        "promoted_logits": [[0.9, 0.7], [0.2, 0.1]],
        "suppressed_tokens": [[" Paris"], [" of"]],
        "suppressed_logits": [[-0.5], [-0.1]],
    })  # fmt: skip


def test_contexts_table_from_file_and_folder(tmp_path):
    pq.write_table(_table(), tmp_path / CONTEXTS_FILE)
    for source in (tmp_path, tmp_path / CONTEXTS_FILE, str(tmp_path)):
        book = load_features(source)
        assert len(book) == 2 and (0, 5) in book and (2, 7) in book
    info = book.get(0, 5)
    assert info.top_contexts[0] == Context(["the state of ", "Texas", ", which"], [0.0, 4.0, 0.0])
    assert info.top_contexts[0].peak == 1
    assert info.top_contexts[1] == Context(["Austin", " is"], [2.5, 0.0])
    assert info.histogram_edges == [0.0, 2.0, 4.0] and info.histogram_counts == [30, 4]
    assert info.promoted_tokens == [(" Austin", 0.9), (" Texas", 0.7)]
    assert info.suppressed_tokens == [(" Paris", -0.5)]
    assert info.frequency == pytest.approx(0.0125)
    assert info.short_label() == "→  Austin  Texas"
    dead = book.get(2, 7)
    assert dead.top_contexts == [] and dead.histogram_counts == []
    assert book.get(1, 1) is None


def test_dict_and_json_shapes(tmp_path):
    rec = {"layer": 1, "index": 3, "label": "Texas things",
           "top_contexts": [{"tokens": ["in", " Dallas"], "activations": [0.1, 3.0]}],
           "histogram": {"edges": [0, 1, 2], "counts": [5, 1]},
           "promoted_tokens": [[" Austin", 0.4]]}  # fmt: skip
    book = load_features({"features": [rec]})
    info = book.get(1, 3)
    assert info.label == "Texas things" and info.short_label() == "Texas things"
    assert info.top_contexts[0].peak == 1
    keyed = load_features({"features": {"1/3": {k: v for k, v in rec.items()
                                               if k not in ("layer", "index")}}})  # fmt: skip
    assert keyed.get(1, 3) == info
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"features": [rec]}))
    assert load_features(path).get(1, 3) == info
    assert load_features(None).get(1, 3) is None


def test_bad_feature_information_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureInfoError, match="'features' entry"):
        FeatureBook.from_dict({"layers": []})
    with pytest.raises(FeatureInfoError, match="record 0 .* integer 'layer' and 'index'"):
        FeatureBook.from_dict({"features": [{"layer": "x", "index": 1}]})
    with pytest.raises(FeatureInfoError, match="2 tokens but 1 activations"):
        FeatureBook.from_dict({"features": [
            {"layer": 0, "index": 0, "top_contexts": [{"tokens": ["a", "b"], "activations": [1]}]}
        ]})  # fmt: skip
    with pytest.raises(FeatureInfoError, match="one more edge than counts"):
        FeatureBook.from_dict(
            {
                "features": [
                    {"layer": 0, "index": 0, "histogram": {"edges": [0, 1], "counts": [1, 2]}}
                ]
            }
        )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FeatureInfoError, match="not a JSON feature-information file"):
        load_features(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_features(tmp_path / "nope")  # a folder without the contexts file
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(FeatureInfoError, match="not a readable Parquet"):
        load_features(tmp_path / "x.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "y.parquet")
    with pytest.raises(FeatureInfoError, match="not a feature-contexts table"):
        load_features(tmp_path / "y.parquet")
