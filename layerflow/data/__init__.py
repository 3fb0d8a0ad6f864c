"""Which tokens: text sources in, fixed-length token sequences out, with explicit BOS handling.

    tokens.py   sources (the shipped corpus, a local file, a Hugging Face dataset, random ids),
                seeded sequences, the special tokens training and evaluation leave out
    corpus/     the shipped public-domain English corpus (see corpus/SOURCES.md)
"""

from layerflow.data.tokens import (DEFAULT_SOURCE, RANDOM_SOURCE, TokenPlan, describe_source, iter_documents,
                                   make_sequences, source_fingerprint, special_token_ids)

__all__ = ["DEFAULT_SOURCE", "RANDOM_SOURCE", "TokenPlan", "describe_source", "iter_documents", "make_sequences",
           "source_fingerprint", "special_token_ids"]
