"""Token sources: text in, fixed-length token sequences out, with explicit BOS handling.

A source is one of:
- a shipped corpus by name (`CORPORA`; see data/corpus/SOURCES.md): `default` (= `mixed`: fiction,
  drama, technical documentation, a reference glossary and code), `novels` (eight public-domain
  novels, the first default) or `ood` (registers the mix does not emphasise, for evaluation only);
- a path to a local `.txt` or `.txt.gz` file;
- `hf:NAME[:CONFIG]`: a Hugging Face dataset (streamed; needs the hub), column `text`, split `train`;
- `random`: uniform random token ids (for twins, which have no tokenizer, and for benchmarks).

Sequences are cut from one token stream (dataset rows joined by the tokenizer's EOS), then a
seeded permutation picks which ones are used. Files up to 64 MB (the shipped corpus included) are
tokenized whole, once per tokenizer, and cached, so even a small capture samples the whole corpus.
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

from layerflow.cache import cache_dir, cache_entry
from layerflow.errors import LayerflowError

DEFAULT_SOURCE = "default"
OOD_SOURCE = "ood"  # the out-of-domain evaluation text
CORPORA = {DEFAULT_SOURCE: "mixed.txt.gz", "mixed": "mixed.txt.gz", "novels": "novels.txt.gz", OOD_SOURCE: "ood.txt.gz"}
CORPUS_DESCRIPTIONS = {
    "mixed.txt.gz": "fiction, drama, technical documentation, a reference glossary and Python code; public domain "
                    "and BSD-3-Clause",
    "novels.txt.gz": "eight novels; public domain",
    "ood.txt.gz": "out-of-domain evaluation text: verse, another project's documentation and code, the glossary's "
                  "other half; public domain and BSD-3-Clause",
}
RANDOM_SOURCE = "random"
HF_PREFIX = "hf:"
# Files up to this size are tokenized whole (once, then cached) and sampled uniformly.
SMALL_FILE_BYTES = 64 * 2**20
# Larger sources: sample sequences from a prefix this many times larger than needed.
POOL_FACTOR = 8


@dataclass(frozen=True)
class TokenPlan:
    """Everything that determines the token sequences of a capture."""

    source: str
    context_size: int
    prepend_bos: bool
    bos_token_id: int | None
    seed: int


def corpus_path(name: str) -> Path:
    """The file of a shipped corpus (`CORPORA`)."""
    return Path(str(resources.files("layerflow.data.corpus") / CORPORA[name]))


def describe_source(source: str) -> str:
    if source in CORPORA:
        return (f"layerflow corpus '{source}' ({CORPORA[source]}: {CORPUS_DESCRIPTIONS[CORPORA[source]]}; "
                "see layerflow/data/corpus/SOURCES.md)")
    if source == RANDOM_SOURCE:
        return "uniform random token ids"
    if source.startswith(HF_PREFIX):
        return f"Hugging Face dataset {source[len(HF_PREFIX):]} (split train, column text)"
    return f"local file {Path(source).resolve()}"


def _source_file(source: str) -> Path | None:
    """The file behind a file source (None for 'random' and hf: sources); a clear error if missing."""
    if source == RANDOM_SOURCE or source.startswith(HF_PREFIX):
        return None
    path = corpus_path(source) if source in CORPORA else Path(source)
    if not path.is_file():
        raise LayerflowError(
            f"Text source '{source}' is not a file. Valid sources: a shipped corpus ({', '.join(CORPORA)}), "
            "'random', a path to a .txt/.txt.gz file, or hf:DATASET[:CONFIG]."
        )
    return path


def source_fingerprint(source: str) -> str:
    """A content hash for file sources, so a changed corpus is not mistaken for the same run."""
    path = _source_file(source)
    return source if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def _is_small_file(source: str) -> bool:
    path = _source_file(source)
    return path is not None and path.stat().st_size <= SMALL_FILE_BYTES


def iter_documents(source: str) -> Iterator[str]:
    if source.startswith(HF_PREFIX):
        yield from _iter_hf_dataset(source[len(HF_PREFIX):])
        return
    path = _source_file(source)
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


def count_documents(source: str) -> int | None:
    """How many documents `iter_documents(source)` yields, for a file small enough to read through;
    None for datasets and large files (streams)."""
    return sum(1 for _ in iter_documents(source)) if _is_small_file(source) else None


def _iter_hf_dataset(spec: str) -> Iterator[str]:
    """Stream the `text` column of a dataset's train split: a hub name, or a local dataset folder."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        for row in datasets.load_dataset(name, config or None, split="train", streaming=True):
            yield row["text"]
    except LayerflowError:
        raise
    except Exception as err:  # datasets raises many types for "unreachable", "no such dataset", "no column"
        raise LayerflowError(
            f"Could not stream Hugging Face dataset '{spec}' (split train, column text): {type(err).__name__}: {err}\n"
            f"Offline sources: a shipped corpus ({', '.join(CORPORA)}), a local text file, or hf:<local dataset folder>."
        ) from None


def _token_stream(tokenizer: Any, source: str, max_tokens: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    for i, doc in enumerate(iter_documents(source)):
        if source.startswith(HF_PREFIX) and i > 0 and eos is not None:
            tokens.append(eos)  # dataset rows are separate documents
        tokens.extend(tokenizer.encode(doc, add_special_tokens=False))
        if len(tokens) >= max_tokens:
            break
    return torch.tensor(tokens, dtype=torch.long)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _whole_file_tokens(tokenizer: Any, source: str) -> torch.Tensor:
    """All tokens of a file source, cached per (file content, tokenizer) in the layerflow cache."""
    path = cache_dir() / "tokens" / f"{source_fingerprint(source)[:16]}-{_tokenizer_fingerprint(tokenizer)}.pt"
    if path.exists():
        return torch.load(path).long()
    tokens = _token_stream(tokenizer, source, max_tokens=1 << 62)
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache_entry(path) as tmp:
        torch.save(tokens.to(torch.int32), tmp)
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
        if _is_small_file(plan.source):  # sample from the whole file: tokenized once, then cached
            stream = _whole_file_tokens(tokenizer, plan.source)
        else:  # large files and datasets: sample from a prefix a few times larger than needed
            stream = _token_stream(tokenizer, plan.source, max_tokens=n_seqs * body * POOL_FACTOR)
        if not len(stream):
            raise LayerflowError(f"Text source '{plan.source}' is empty: it yields no tokens.")
        pool = len(stream) // body
        if pool < n_seqs:
            raise LayerflowError(
                f"Text source '{plan.source}' is too short: it yields {len(stream)} tokens, "
                f"{pool} sequences of {body} tokens, but {n_seqs} are needed ({n_seqs * ctx} tokens). "
                "Use a longer text, fewer tokens or a shorter context size."
            )
        chunks = stream[: pool * body].view(pool, body)
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
