"""The shipped corpora: each name reads its own file, the mix holds every register, and the
out-of-domain text shares no document with the training mix."""

import gzip
import hashlib

import pytest

from layerflow.data.tokens import (CORPORA, corpus_path, count_documents, describe_source, iter_documents,
                                   source_fingerprint)
from layerflow.errors import LayerflowError

FIRST_CORPUS_SHA256 = "5970355fba068637598ac5542a80f6aa82eadc872f163461513b0fc3071a9925"  # default_corpus.txt.gz of 0.x


def _text(name: str) -> str:
    return gzip.decompress(corpus_path(name).read_bytes()).decode("utf-8")


def test_novels_is_the_first_corpus_byte_for_byte():
    # runs captured from the first default corpus keep their content hash under the name `novels`
    assert hashlib.sha256(corpus_path("novels").read_bytes()).hexdigest() == FIRST_CORPUS_SHA256
    assert source_fingerprint("novels") == FIRST_CORPUS_SHA256
    assert source_fingerprint("default") == source_fingerprint("mixed") != FIRST_CORPUS_SHA256


def test_the_mix_holds_every_register_and_fiction_is_under_half():
    text = _text("default")
    headings = {"drama": "by William Shakespeare", "documentation": "Flask documentation: quickstart.rst",
                "code": "# Flask: flask/app.py", "reference": "kluge:", "fiction": "by Jane Austen"}
    for register, heading in headings.items():
        assert heading in text, register
    novels = _text("novels")
    # the mix takes the opening of each novel, not all of it
    assert len(text.encode()) < len(novels.encode()) and "Call me Ishmael" in text
    fiction = sum(len(p) for p in novels.split("\n\n") if p in text)
    assert 0.3 < fiction / len(text) < 0.5


def test_the_out_of_domain_text_shares_no_document_with_the_mix():
    mix, ood = _text("mixed"), _text("ood")
    for heading in ("by Walt Whitman", "Click documentation:", "# Click: click/core.py", "mainframe:"):
        assert heading in ood
    long_paragraphs = [p for p in ood.split("\n\n") if len(p) > 200]
    assert long_paragraphs and not any(p in mix for p in long_paragraphs)


def test_names_and_errors():
    for name in CORPORA:
        assert corpus_path(name).is_file() and f"'{name}'" in describe_source(name)
        assert next(iter_documents(name)).strip()
    with pytest.raises(LayerflowError, match="shipped corpus \\(default, mixed, novels, ood\\)"):
        source_fingerprint("novel")


def test_count_documents_for_spreading_cross_model_words():
    # cross_model_runs spreads its words over this many documents (a stream: over CROSS_MODEL_DOCUMENTS)
    for name in ("novels", "default"):
        assert count_documents(name) == len(list(iter_documents(name))) > 10
    assert count_documents("hf:some/dataset") is None
