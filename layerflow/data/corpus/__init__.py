"""The shipped public-domain English corpus (default_corpus.txt.gz; see SOURCES.md and build_corpus.py)."""
