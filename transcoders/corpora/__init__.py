"""Token corpora: public-domain texts, WordNet glosses, text sampled from the model
itself, and mixes of them, each with its licence in a manifest. May import the
transcoders core, never tracer or graphstore."""

from __future__ import annotations

from transcoders.lazy_exports import install

# public name -> the module that holds it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "TokenCorpus": "transcoders.corpora.corpus",
    "TokenizerSpec": "transcoders.corpora.corpus",
    "CorpusError": "transcoders.corpora.corpus",
    "fetch_corpus": "transcoders.corpora.corpus",
    "prepare_corpus": "transcoders.corpora.corpus",
    "parse_mix": "transcoders.corpora.corpus",
    "mix_corpora": "transcoders.corpora.corpus",
    "GenerateConfig": "transcoders.corpora.generate",
    "generate_corpus": "transcoders.corpora.generate",
    "sample_batch": "transcoders.corpora.generate",
    "read_synsets": "transcoders.corpora.wordnet",
    "category_members": "transcoders.corpora.wordnet",
    "wordnet_paragraphs": "transcoders.corpora.wordnet",
}

install(__name__, _EXPORTS)
