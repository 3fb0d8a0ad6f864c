"""Token sources: text in, fixed-length token sequences out, with explicit BOS handling.

A source is one of:
- `default`: the English corpus shipped with layerflow (public domain; see corpus/SOURCES.md);
- a path to a local `.txt` or `.txt.gz` file;
- `hf:NAME[:CONFIG]`: a Hugging Face dataset (streamed; needs the hub), column `text`, split `train`;
- `random`: uniform random token ids (for twins, which have no tokenizer, and for benchmarks).

Sequences are cut from one token stream (documents joined by the tokenizer's EOS), then a seeded
permutation picks which ones are used, so a small capture still samples the whole corpus.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from jaxtyping import Int

from layerflow.errors import LayerflowError

DEFAULT_SOURCE = "default"
RANDOM_SOURCE = "random"
HF_PREFIX = "hf:"
# Sample sequences from a pool this many times larger than needed (bounded by the corpus).
POOL_FACTOR = 8


@dataclass(frozen=True)
class TokenPlan:
    """Everything that determines the token sequences of a capture."""

    source: str
    context_size: int
    prepend_bos: bool
    bos_token_id: int | None
    seed: int


def default_corpus_path() -> Path:
    return Path(str(resources.files("layerflow.corpus") / "default_corpus.txt.gz"))


def describe_source(source: str) -> str:
    if source == DEFAULT_SOURCE:
        return f"layerflow default corpus ({default_corpus_path().name}, public domain; see layerflow/corpus/SOURCES.md)"
    if source == RANDOM_SOURCE:
        return "uniform random token ids"
    if source.startswith(HF_PREFIX):
        return f"Hugging Face dataset {source[len(HF_PREFIX):]} (split train, column text)"
    return f"local file {Path(source).resolve()}"


def source_fingerprint(source: str) -> str:
    """A content hash for file sources, so a changed corpus is not mistaken for the same run."""
    if source == RANDOM_SOURCE or source.startswith(HF_PREFIX):
        return source
    path = default_corpus_path() if source == DEFAULT_SOURCE else Path(source)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iter_documents(source: str) -> Iterator[str]:
    if source.startswith(HF_PREFIX):
        yield from _iter_hf_dataset(source[len(HF_PREFIX):])
        return
    path = default_corpus_path() if source == DEFAULT_SOURCE else Path(source)
    if not path.is_file():
        raise LayerflowError(
            f"Text source '{source}' is not a file. Valid sources: 'default', 'random', "
            "a path to a .txt/.txt.gz file, or hf:DATASET[:CONFIG]."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        # One document per file; read in paragraph-aligned chunks so huge files stream.
        buffer: list[str] = []
        size = 0
        for line in f:
            buffer.append(line)
            size += len(line)
            if size > 1 << 16 and not line.strip():
                yield "".join(buffer)
                buffer, size = [], 0
        if buffer:
            yield "".join(buffer)


def _iter_hf_dataset(spec: str) -> Iterator[str]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for row in ds:
            yield row["text"]
    except (OSError, ConnectionError, ValueError) as err:
        raise LayerflowError(
            f"Could not stream Hugging Face dataset '{spec}': {err}\n"
            "Offline sources: 'default' (shipped corpus) or a local text file."
        ) from None


def _token_stream(tokenizer: Any, source: str, max_tokens: int) -> list[int]:
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    for i, doc in enumerate(iter_documents(source)):
        if source.startswith(HF_PREFIX) and i > 0 and eos is not None:
            tokens.append(eos)  # dataset rows are separate documents
        tokens.extend(tokenizer.encode(doc, add_special_tokens=False))
        if len(tokens) >= max_tokens:
            break
    return tokens


def make_sequences(
    n_seqs: int,
    plan: TokenPlan,
    tokenizer: Any | None = None,
    d_vocab: int | None = None,
) -> Int[torch.Tensor, "n_seqs context"]:
    """`n_seqs` sequences of exactly `plan.context_size` tokens, BOS first when `plan.prepend_bos`."""
    ctx = plan.context_size
    body = ctx - 1 if plan.prepend_bos else ctx
    if body < 1:
        raise LayerflowError(f"Context size {ctx} is too short: use at least 2 tokens (BOS + one).")
    generator = torch.Generator().manual_seed(plan.seed)
    if plan.source == RANDOM_SOURCE:
        if d_vocab is None:
            raise LayerflowError("The 'random' source needs the model's vocabulary size.")
        bodies = torch.randint(0, d_vocab, (n_seqs, body), generator=generator)
    else:
        if tokenizer is None:
            raise LayerflowError(
                f"This model has no tokenizer (a random-init twin), so it cannot read text source "
                f"'{plan.source}'. Use --source random."
            )
        stream = _token_stream(tokenizer, plan.source, max_tokens=n_seqs * body * POOL_FACTOR)
        if not stream:
            raise LayerflowError(f"Text source '{plan.source}' is empty: it yields no tokens.")
        pool = len(stream) // body
        if pool < n_seqs:
            raise LayerflowError(
                f"Text source '{plan.source}' is too short: it yields {len(stream)} tokens, "
                f"{pool} sequences of {body} tokens, but {n_seqs} are needed ({n_seqs * ctx} tokens). "
                "Use a longer text, fewer tokens or a shorter context size."
            )
        chunks = torch.tensor(stream[: pool * body], dtype=torch.long).view(pool, body)
        bodies = chunks[torch.randperm(pool, generator=generator)[:n_seqs]]
    if not plan.prepend_bos:
        return bodies
    if plan.bos_token_id is None:
        raise LayerflowError("The tokenizer has no BOS token: use --no-prepend-bos.")
    bos = torch.full((n_seqs, 1), plan.bos_token_id, dtype=torch.long)
    return torch.cat([bos, bodies], dim=1)


def special_token_ids(tokenizer: Any | None, plan: TokenPlan) -> list[int]:
    """Token ids whose positions training/eval exclude by default (BOS and other specials)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    if plan.bos_token_id is not None and plan.prepend_bos:
        ids.add(plan.bos_token_id)
    return sorted(ids)
