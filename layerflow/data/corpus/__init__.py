"""The shipped corpora (mixed, novels, ood .txt.gz; see SOURCES.md and build_corpus.py)."""
