"""The meaning score: exact AUROC, a planted concept feature scores 1.0, a transcoder whose
inputs carry no information about the text scores about 0.5, a category absent from the probe
text is refused with one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from transcoders import meaning
from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.corpora.corpus import TokenizerSpec

pytest.importorskip("transcoders.corpora.wordnet")
if not (meaning.wordnet.WORDNET_DIR / "data.noun").is_file():  # installed by scripts/setup
    pytest.fail("WordNet (Debian wordnet-base) is missing: run scripts/setup", pytrace=False)

D = 24


class WordTokenizer:
    """Words (with their leading space) and punctuation as tokens; ids assigned on first sight."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in re.findall(r" ?[\w'-]+| ?[^\w\s]+|\s+", text):
            out.append(self.ids.setdefault(piece, 3 + len(self.ids)))
        return out

    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(encode=self.encode, bos_id=1, name="words", vocab_size=100_000)


def sentences(n: int = 120, with_months: bool = True) -> list[str]:
    rng = np.random.default_rng(0)
    months = ["January", "March", "April", "June", "October", "December"]
    colours = ["red", "blue", "green", "yellow", "purple"]
    things = ["meeting", "harvest", "festival", "trip", "school year", "sale", "survey"]
    out = []
    for i in range(n):
        t, c = things[i % len(things)], colours[rng.integers(len(colours))]
        if with_months and i % 2 == 0:
            m = months[rng.integers(len(months))]
            out.append(f"The {t} was moved to {m} because of the {c} flags, said report {i}.")
        else:
            out.append(f"A {c} banner marked the {t} near the old bridge, said report {i}.")
    return out


def planted_model(probe: meaning.Probe, category: str, n_layers: int = 2):
    """Activations whose dimension 0 is 1 exactly at the category's positive tokens (the rest
    random), and a transcoder whose layer-1 feature 5 reads dimension 0 (threshold 0.5)."""
    pos_ids = set(probe.tokens[probe.positive[category]].tolist())
    g = torch.Generator().manual_seed(1)
    table = torch.randn(4096, D, generator=g) * 0.3  # rows by token id modulo 4096

    def activations(tokens):
        x = table[tokens.reshape(-1) % 4096].clone()
        x[:, 0] = torch.tensor([float(t in pos_ids) for t in tokens.reshape(-1).tolist()])
        x = x.expand(n_layers, -1, -1).contiguous()
        return x, x

    cfg = TranscoderConfig(n_layers=n_layers, d_model=D, n_features=16, activation="jumprelu")
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        clt.W_enc.normal_(0, 0.3, generator=g)
        clt.b_enc.zero_()
        clt.threshold.fill_(0.2)
        clt.W_enc[1, 5] = 0
        clt.W_enc[1, 5, 0] = 1.0
        clt.threshold[1, 5] = 0.5
    return activations, clt


def test_auroc_matches_pairwise_count():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 4, (60, 5), generator=g).float()  # many ties
    y = torch.rand(60, generator=g) < 0.3
    got = meaning.auroc(v, y)
    for j in range(5):
        p, n = v[y, j][:, None], v[~y, j][None, :]
        want = ((p > n).float() + 0.5 * (p == n).float()).mean()
        assert got[j].item() == pytest.approx(want.item(), abs=1e-6)


def test_firing_f1_matches_counts():
    v = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 1.0], [0.0, 0.0], [1.0, 5.0]])
    y = torch.tensor([True, True, False, False, True])
    # column 0 fires on rows 1, 2, 4: tp 2, fp 1, fn 1 -> F1 4/6; column 1: rows 0, 2, 4: same
    got = meaning.firing_f1(v, y)
    assert got.tolist() == pytest.approx([4 / 6, 4 / 6])
    assert meaning.firing_f1(torch.zeros(5, 1), y).tolist() == [0.0]


def test_planted_feature_scores_one_and_the_rest_about_half():
    tok = WordTokenizer().spec()
    probe = meaning.build_probe(tok, categories=("months", "colours"), text=sentences())
    assert int(probe.positive["months"].sum()) == 60  # one month in every other sentence
    activations, clt = planted_model(probe, "months")
    res = meaning.score_probe(clt, activations, probe)
    months = next(c for c in res.categories if c.name == "months")
    assert months.best_layer == 1 and months.feature[1] == 5
    assert months.best_auroc == 1.0 and months.auroc[1] == 1.0
    assert months.best_f1 == 1.0 and months.best_f1_layer == 1 and months.f1_feature[1] == 5
    # Frequency statistics against a direct count of the planted feature's firings.
    n_valid = int(probe.valid.sum())
    layer1 = res.layers[1]
    assert sum(layer1.frequency_histogram) == 16
    x, _ = activations(probe.tokens)
    acts = clt.activate(1, clt.pre_activations(1, x[1]))[probe.valid.reshape(-1)]
    freq = (acts > 0).float().mean(0)
    assert freq[5].item() == pytest.approx(60 / n_valid)
    assert layer1.median_frequency == pytest.approx(freq.median().item())
    assert layer1.dead_share == pytest.approx((freq == 0).float().mean().item())
    # JSON round trip of the typed result.
    back = meaning.MeaningResult.from_dict(json.loads(res.to_json()))
    assert back == res
    assert "months" in "\n".join(res.lines())


def test_uninformative_transcoder_scores_about_half():
    tok = WordTokenizer().spec()
    probe = meaning.build_probe(tok, categories=("months", "colours"), text=sentences(400))
    g = torch.Generator().manual_seed(2)

    def noise(tokens):  # inputs independent of the text
        x = torch.randn(2, tokens.numel(), D, generator=g)
        return x, x

    cfg = TranscoderConfig(n_layers=2, d_model=D, n_features=64, activation="jumprelu")
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        clt.W_enc.normal_(0, 0.3, generator=g)
        clt.threshold.fill_(0.3)
    res = meaning.score_probe(clt, noise, probe)
    for c in res.categories:
        assert abs(c.best_auroc - 0.5) < 0.15, (c.name, c.best_auroc)
        assert max(c.auroc_selection) > c.best_auroc  # selection on the other half is optimistic
    assert abs(res.mean_best - 0.5) < 0.1
    # Firing F1: at best the positives' base rate for features that know nothing.
    assert res.summary()["mean_best_f1"] < 0.25


def test_category_without_held_out_member_is_refused():
    tok = WordTokenizer().spec()
    with pytest.raises(meaning.MeaningError, match="category 'months' has 0 held-out member"):
        meaning.build_probe(
            tok, categories=("months", "colours"), text=sentences(with_months=False)
        )
    with pytest.raises(meaning.MeaningError, match="unknown probe category planets"):
        meaning.build_probe(tok, categories=("planets",), text=sentences())


@pytest.mark.slow
def test_default_probe_covers_every_category():
    probe = meaning.build_probe(WordTokenizer().spec(), per_category=20, background=20)
    assert set(probe.positive) == set(meaning.CATEGORY_NAMES) and len(meaning.CATEGORY_NAMES) >= 10
    for c in meaning.CATEGORY_NAMES:
        assert int(probe.positive[c][0::2].sum()) > 0 and int(probe.positive[c][1::2].sum()) > 0


def test_multi_word_member_marks_its_last_token():
    words = WordTokenizer()
    text = ["They drove to New York and then to Texas.", "We flew to New York and to Texas."]
    probe = meaning.build_probe(
        words.spec(), categories=("us_states",), text=text, background=0, seq_len=16
    )
    assert len(probe.tokens) == 2  # one sentence per row
    row = probe.tokens[0].tolist()
    york, new, texas = words.ids[" York"], words.ids[" New"], words.ids[" Texas"]
    assert probe.positive["us_states"][0].nonzero().flatten().tolist() == [
        row.index(york),
        row.index(texas),
    ]
    assert probe.ignore["us_states"][0].nonzero().flatten().tolist() == [row.index(new)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from model_fixtures import save_tiny_folder

    root = save_tiny_folder(tmp_path_factory.mktemp("meaning"))
    return root / "model", root / "clt"


def test_cli_scores_saves_and_info_shows(tiny_folder, tmp_path, capsys):
    from tracer.cli import main

    model, clt = tiny_folder
    out = tmp_path / "m.json"
    rc = main(["transcoders", "meaning", str(clt), "--model", str(model),
               "--categories", "months,colours", "--json", str(out)])  # fmt: skip
    assert rc == 0
    res = meaning.MeaningResult.from_dict(json.loads(out.read_text()))
    assert [c.name for c in res.categories] == ["months", "colours"]
    assert len(res.layers) == 2 and 0.0 <= res.mean_best <= 1.0
    assert meaning.load_meaning(clt) == res
    capsys.readouterr()
    assert main(["transcoders", "info", str(clt)]) == 0
    assert "mean best-layer AUROC" in capsys.readouterr().out


def test_cli_category_without_member_is_one_line_exit_2(tiny_folder, tmp_path, capsys):
    from tracer.cli import main

    model, clt = tiny_folder
    text = tmp_path / "t.txt"
    text.write_text("\n".join(sentences(40, with_months=False)))
    rc = main(["transcoders", "meaning", str(clt), "--model", str(model),
               "--categories", "months,colours", "--text", str(text), "--no-save"])  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "it/s]" not in ln]
    assert rc == 2 and len(err) == 1 and "category 'months' has 0 held-out member" in err[0]
