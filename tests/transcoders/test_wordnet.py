"""The WordNet source: the database lines parse to their synsets, known glosses come out
as expected, category members are found below their roots, and the held-out tenth is fixed."""

from __future__ import annotations

import pytest

from transcoders.corpora import wordnet

if not (wordnet.WORDNET_DIR / "data.noun").is_file():  # installed by scripts/setup
    pytest.fail("WordNet (Debian wordnet-base) is missing: run scripts/setup", pytrace=False)

# A line of data.noun as WordNet 3.0 ships it (the synset of Paris, France).
PARIS_LINE = (
    "08932568 15 n 04 Paris 0 City_of_Light 0 French_capital 0 capital_of_France 0 004 "
    "@i 08692592 n 0000 #p 08696085 n 0000 %m 08932950 n 0000 -c 01043734 n 0000 | the "
    "capital and largest city of France; and international center of culture and commerce  "
)


def test_parse_line_splits_lemmas_pointers_and_gloss():
    s = wordnet.parse_line(PARIS_LINE)
    assert s.offset == 8932568 and s.pos == "n"
    assert s.lemmas == ["Paris", "City of Light", "French capital", "capital of France"]
    assert s.pointers[0] == ("@i", 8692592, "n") and len(s.pointers) == 4
    assert s.definition == (
        "the capital and largest city of France; and international center of culture and commerce"
    )
    assert s.examples == []
    assert wordnet.parse_line("  1 This software and database is being provided") is None


def test_split_gloss_separates_examples():
    d, ex = wordnet.split_gloss('move fast; "He ran to the store"; "run for your life"')
    assert d == "move fast" and ex == ["He ran to the store", "run for your life"]


def test_installed_database_has_the_expected_glosses():
    nouns = wordnet.nouns()
    paris = nouns[wordnet.senses("Paris")[0]]
    assert paris.lemmas[0] == "Paris"
    assert paris.definition.startswith("the capital and largest city of France")
    dog = nouns[wordnet.senses("dog")[0]]
    assert dog.definition.startswith("a member of the genus Canis")
    assert "the dog barked all night" in dog.examples
    counts = {p: sum(1 for _ in wordnet.read_synsets(pos=p)) for p in "nvar"}
    assert counts == {"n": 82115, "v": 13767, "a": 18156, "r": 3621}
    assert sum(counts.values()) == 117659  # WordNet 3.0's synsets


def test_category_members_below_roots():
    countries = wordnet.category_members([("country", 2)], first_sense_only=False)
    assert {"France", "Germany", "Japan", "Italy"} <= set(countries)
    states = wordnet.category_members([("american_state", 1)], first_sense_only=False)
    assert {"Texas", "California", "New York"} <= set(states) and "Paris" not in states
    months = wordnet.category_members([("gregorian_calendar_month", 1)], first_lemma_only=True)
    assert months == sorted(
        ["January", "February", "March", "April", "May", "June", "July", "August",
         "September", "October", "November", "December"]
    )  # fmt: skip
    animals = wordnet.category_members([("animal", 1)], instances=False, nouns_only=True)
    assert {"dog", "horse", "duck"} <= set(animals) and "male" not in animals  # also an adjective
    body = wordnet.category_members([("body_part", 1)], instances=False, nouns_only=True)
    assert "hand" in body and "small" not in body
    assert "small" in wordnet.category_members([("body_part", 1)], instances=False)
    with pytest.raises(wordnet.WordNetError, match="no sense 9"):
        wordnet.category_members([("month", 9)])


@pytest.mark.slow
def test_heldout_tenth_is_fixed_and_left_out_of_the_corpus_source():
    syns = list(wordnet.read_synsets(pos="n"))
    held = [s for s in syns if wordnet.is_heldout(s)]
    assert 0.09 < len(held) / len(syns) < 0.11
    train = wordnet.wordnet_paragraphs(heldout=False)
    held_text = wordnet.wordnet_paragraphs(heldout=True)
    assert len(held_text) == sum(1 for s in wordnet.read_synsets() if wordnet.is_heldout(s))
    held_sentences = {t for s in wordnet.read_synsets() if wordnet.is_heldout(s)
                      for t in wordnet.sentences(s)}  # fmt: skip
    assert "Aberdeen: a town in northeastern Maryland." in held_sentences
    assert not any(
        t in p for p in train[:3000] for t in ["Aberdeen: a town in northeastern Maryland."]
    )
    assert len(train) > 100_000
    assert "Paris: the capital and largest city of France" in "\n".join(train + held_text)
