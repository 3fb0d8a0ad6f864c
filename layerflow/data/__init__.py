"""Which tokens: text sources in, fixed-length token sequences out, with explicit BOS handling.

    tokens.py   sources (the shipped corpus, a local file, a Hugging Face dataset, random ids),
                seeded sequences, the special tokens training and evaluation leave out
    corpus/     the shipped corpora: the default mix, the novels, the out-of-domain text (corpus/SOURCES.md)
"""

from layerflow.data.tokens import (CORPORA, DEFAULT_SOURCE, OOD_SOURCE, RANDOM_SOURCE, TokenPlan, describe_source, iter_documents,
                                   make_sequences, source_fingerprint, special_token_ids)

__all__ = ["CORPORA", "DEFAULT_SOURCE", "OOD_SOURCE", "RANDOM_SOURCE", "TokenPlan", "describe_source", "iter_documents", "make_sequences",
           "source_fingerprint", "special_token_ids"]
