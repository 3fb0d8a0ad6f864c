"""Word alignment: two models' activations at the same words of the same text.

Two tokenizers cut a text differently; a word is where both agree. Definitions:

- Word: a maximal run of non-space characters (regex `\\S+`) of a text. Its end is the character
  offset just past its last character.
- Word position in a model: the index, in the token sequence the model reads (BOS, when
  prepended, at index 0 with no character span, then the text's tokens without special tokens),
  of the last token whose character span ends exactly at the word's end. Spans that include a
  leading space (GPT-style "Ġword", SentencePiece "▁word") do not matter: only the end offset
  is compared. A word is aligned when it has a position in both models; the others are dropped
  (a token runs past the word's end in at least one tokenizer, e.g. Gemma-3's single token
  "> </" in "x> </y" swallows the end of "x>"). SmolLM2 and Gemma-3 drop no word of the shipped
  corpus: both tokenizers end tokens at every whitespace boundary.
- Chunks: a document is cut into chunks of whole words (the text from one word's start to a later
  word's end, taken verbatim) so that BOS + chunk tokens fit in `context_size` for both models.
  Each chunk is tokenized on its own, exactly as the models read it. A single word longer than a
  chunk is dropped.
- Split: documents are numbered in the order given; document i is held out when
  i % heldout_every == heldout_every - 1 (with the default 3: documents 2, 5, 8, ...), else it is
  train. Every word carries its document's split.
- Junk words (`junk`): a word with no letter or digit, or the first word of a chunk (next to the
  BOS, where activations are outliers); paired SVCCA leaves out features that fire mostly there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from layerflow import defaults
from layerflow.errors import LayerflowError
from layerflow.models.load import LoadedModel
from layerflow.models.sites import Site, parse_hook_name, prepare_hooks, site_at

WORD = re.compile(r"\S+")


# --- word alignment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedText:
    ids: Int[np.ndarray, " tokens"]
    ends: Int[np.ndarray, " tokens"]  # end character of each token's span; -1 for BOS


def tokenize_text(tokenizer: Any, text: str, prepend_bos: bool = True) -> TokenizedText:
    """The tokens a model reads for `text` (BOS first when `prepend_bos`), with each token's end offset."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, ends = list(enc["input_ids"]), [end for _, end in enc["offset_mapping"]]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise LayerflowError(f"Tokenizer '{tokenizer.name_or_path}' has no BOS token: use prepend_bos=False.")
        ids, ends = [tokenizer.bos_token_id, *ids], [-1, *ends]
    return TokenizedText(np.array(ids, dtype=np.int64), np.array(ends, dtype=np.int64))


def word_ends(text: str) -> Int[np.ndarray, " words"]:
    return np.array([m.end() for m in WORD.finditer(text)], dtype=np.int64)


def word_positions(tokens: TokenizedText, ends: Int[np.ndarray, " words"]) -> Int[np.ndarray, " words"]:
    """For each word end, the last token whose span ends there; -1 where no token does."""
    last = {int(end): i for i, end in enumerate(tokens.ends)}
    return np.array([last.get(int(e), -1) for e in ends], dtype=np.int64)


def _align(a: TokenizedText, b: TokenizedText, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in a, positions in b) of the words that align, and which words those are."""
    pos_a, pos_b = word_positions(a, ends), word_positions(b, ends)
    keep = (pos_a >= 0) & (pos_b >= 0)
    return pos_a[keep], pos_b[keep], keep


def _junk_words(text: str) -> np.ndarray:
    """Per word of `text`: no letter or digit, or the first word."""
    junk = np.array([not any(ch.isalnum() for ch in m.group()) for m in WORD.finditer(text)], dtype=bool)
    junk[:1] = True
    return junk


def align_words(
    tok_a: Any, tok_b: Any, text: str, prepend_bos: tuple[bool, bool] = (True, True)
) -> tuple[Int[np.ndarray, " aligned"], Int[np.ndarray, " aligned"]]:
    """Positions of the words of `text` that end on a token boundary in both tokenizations.

    Indices into BOS + tokens (BOS only when prepended); the dropped words are the others:
    `len(word_ends(text)) - len(pos_a)`.
    """
    ends = word_ends(text)
    return _align(tokenize_text(tok_a, text, prepend_bos[0]), tokenize_text(tok_b, text, prepend_bos[1]), ends)[:2]


def split_document(text: str, tokenizers: Sequence[Any], max_tokens: Sequence[int]) -> list[str]:
    """Cut `text` into chunks of whole words that each tokenizer reads in at most its `max_tokens`.

    Chunk sizes are estimated from the whole text's tokenization, then each chunk is re-tokenized
    on its own and shortened until it fits. Words too long for a chunk on their own are skipped.
    """
    words = list(WORD.finditer(text))
    if not words:
        return []
    ends = np.array([w.end() for w in words])
    # counts[m][k]: tokenizer m's tokens ending at or before word k's end, in the whole-text tokenization.
    counts = [np.searchsorted(np.sort(tokenize_text(t, text, False).ends), ends, side="right") for t in tokenizers]
    chunks, start = [], 0
    while start < len(words):
        before = [c[start - 1] if start else 0 for c in counts]
        fits = np.ones(len(words) - start, dtype=bool)
        for c, b, limit in zip(counts, before, max_tokens):
            fits &= c[start:] - b + 2 <= limit  # +2: tokens can merge differently at the chunk's edges
        stop = start + int(np.argmin(fits)) if not fits.all() else len(words)  # exclusive
        stop = max(stop, start + 1)
        while stop > start:
            chunk = text[words[start].start():words[stop - 1].end()]
            if all(len(tokenize_text(t, chunk, False).ids) <= limit for t, limit in zip(tokenizers, max_tokens)):
                chunks.append(chunk)
                break
            stop = start + (stop - start) * 3 // 4 if stop - start > 4 else stop - 1
        start = max(stop, start + 1)  # a word that fits nowhere is skipped
    return chunks


# --- paired capture ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AlignedActivations:
    """Both models' activations at the same words. Rows are words, in document order."""

    model_a: str  # zoo names
    model_b: str
    n_layers_a: int
    n_layers_b: int
    acts_a: dict[str, Float[Tensor, "words d_a"]]  # hook -> float32 CPU
    acts_b: dict[str, Float[Tensor, "words d_b"]]
    heldout: Bool[Tensor, " words"]  # the per-word split label: True = held-out, False = train
    document: Int[Tensor, " words"]  # index of each word's document
    n_dropped: int  # words of the documents read that did not align (or fit in no chunk)
    context_size: int
    heldout_every: int
    junk: Bool[Tensor, " words"] | None = None  # a word of punctuation only, or the first word of its chunk

    @property
    def n_words(self) -> int:
        return len(self.heldout)

    @property
    def n_heldout(self) -> int:
        return int(self.heldout.sum())

    @property
    def n_train(self) -> int:
        return self.n_words - self.n_heldout

    @property
    def split(self) -> list[str]:
        return ["heldout" if h else "train" for h in self.heldout.tolist()]

    def site(self, side: str, hook_name: str) -> Site:
        model, n_layers, acts = ((self.model_a, self.n_layers_a, self.acts_a) if side == "a"
                                 else (self.model_b, self.n_layers_b, self.acts_b))
        if hook_name not in acts:
            raise LayerflowError(f"No activations of {model} at '{hook_name}'. Captured: {', '.join(acts)}.")
        return site_at(model, hook_name, n_layers=n_layers)


@dataclass(frozen=True)
class _Chunk:
    document: int
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    pos_a: np.ndarray
    pos_b: np.ndarray
    junk: np.ndarray  # per aligned word: punctuation only, or the chunk's first word (an attention sink's neighbour)


def _chunks(loaded_a: LoadedModel, loaded_b: LoadedModel, documents: Iterable[str], context_size: int,
            max_words: int | None, max_words_per_document: int | None) -> tuple[list[_Chunk], int]:
    tok_a, tok_b = loaded_a.tokenizer, loaded_b.tokenizer
    bos_a, bos_b = loaded_a.model.cfg.default_prepend_bos, loaded_b.model.cfg.default_prepend_bos
    limits = (context_size - int(bos_a), context_size - int(bos_b))
    chunks, n_words, n_dropped = [], 0, 0
    for doc_index, text in enumerate(documents):
        doc_words = 0
        # Only the words that can be kept are read: causal attention makes their activations the same
        # as in the whole document's chunks, and a long document is not tokenized for a few words.
        wanted = min(max_words - n_words if max_words is not None else math.inf,
                     max_words_per_document if max_words_per_document is not None else math.inf)
        ends = word_ends(text)
        if wanted < len(ends):
            text = text[:ends[int(wanted) - 1]] if wanted > 0 else ""
        pieces = split_document(text, [tok_a, tok_b], limits)
        n_dropped += len(word_ends(text)) - sum(len(word_ends(p)) for p in pieces)
        for piece in pieces:
            ta, tb = tokenize_text(tok_a, piece, bos_a), tokenize_text(tok_b, piece, bos_b)
            ends = word_ends(piece)
            pos_a, pos_b, aligned = _align(ta, tb, ends)
            n_dropped += len(ends) - len(pos_a)
            budget = len(pos_a)
            if max_words is not None:
                budget = min(budget, max_words - n_words)
            if max_words_per_document is not None:
                budget = min(budget, max_words_per_document - doc_words)
            if budget > 0:
                chunks.append(_Chunk(doc_index, ta.ids, tb.ids, pos_a[:budget], pos_b[:budget],
                                     _junk_words(piece)[aligned][:budget]))
                n_words, doc_words = n_words + budget, doc_words + budget
            if budget < len(pos_a):
                break
        if max_words is not None and n_words >= max_words:
            break
    return chunks, n_dropped


def _stop_layer(hooks: list[str]) -> int | None:
    try:
        return max(parse_hook_name(h)[0] for h in hooks) + 1
    except LayerflowError:  # a hook outside the blocks (e.g. hook_embed... or ln_final): run the whole model
        return None


@torch.no_grad()
def _gather(loaded: LoadedModel, hooks: list[str], tokens: list[np.ndarray], positions: list[np.ndarray],
            batch_size: int) -> dict[str, Tensor]:
    """Activations at `positions[i]` of sequence `tokens[i]`, for each hook, concatenated over sequences."""
    model = loaded.model
    prepare_hooks(model, hooks)
    device, stop = model.cfg.device, _stop_layer(hooks)
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for i in range(0, len(tokens), batch_size):
        seqs, pos = tokens[i:i + batch_size], positions[i:i + batch_size]
        width = max(len(s) for s in seqs)
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):  # right padding: causal attention keeps real positions exact
            batch[row, :len(seq)] = torch.from_numpy(seq)
            mask[row, :len(seq)] = 1
        _, cache = model.run_with_cache(batch.to(device), attention_mask=mask.to(device), stop_at_layer=stop,
                                        names_filter=lambda name: name in out)
        rows = torch.cat([torch.full((len(p),), r) for r, p in enumerate(pos)])
        cols = torch.from_numpy(np.concatenate(pos))
        for hook in hooks:
            out[hook].append(cache[hook][rows, cols].float().cpu())
    return {h: torch.cat(v) for h, v in out.items()}


def capture_aligned(
    loaded_a: LoadedModel,
    hooks_a: list[str],
    loaded_b: LoadedModel,
    hooks_b: list[str],
    documents: Iterable[str],
    context_size: int = 128,
    max_words: int | None = 20_000,
    max_words_per_document: int | None = 1000,
    heldout_every: int = defaults.HELDOUT_EVERY,
    batch_size: int = 8,
) -> AlignedActivations:
    """Run both models on the same chunks of `documents` and keep their activations at aligned words.

    Reading stops after `max_words` aligned words, and after `max_words_per_document` within each
    document, so that a small budget still spans many documents and both splits: the statistics
    permute whole held-out documents, so their number bounds what a p-value can mean
    (`cross_model_runs` spreads its words over every document of a file source: the shipped mix has
    50, 16 of them held out).
    """
    for loaded in (loaded_a, loaded_b):
        if loaded.tokenizer is None:
            raise LayerflowError(f"Model '{loaded.name}' has no tokenizer (a random-init twin): it cannot read text.")
    if context_size < 2:
        raise LayerflowError(f"context_size {context_size} is too short: use at least 2 tokens (BOS + one).")
    if heldout_every < 2:
        raise LayerflowError(f"heldout_every {heldout_every} must be at least 2 (1 would hold out every document).")
    chunks, n_dropped = _chunks(loaded_a, loaded_b, documents, context_size, max_words, max_words_per_document)
    if not chunks:
        raise LayerflowError("The documents contain no word that aligns between the two tokenizers.")
    document = torch.from_numpy(np.concatenate([np.full(len(c.pos_a), c.document) for c in chunks]))
    return AlignedActivations(
        model_a=loaded_a.name, model_b=loaded_b.name,
        n_layers_a=loaded_a.model.cfg.n_layers, n_layers_b=loaded_b.model.cfg.n_layers,
        acts_a=_gather(loaded_a, list(hooks_a), [c.tokens_a for c in chunks], [c.pos_a for c in chunks], batch_size),
        acts_b=_gather(loaded_b, list(hooks_b), [c.tokens_b for c in chunks], [c.pos_b for c in chunks], batch_size),
        heldout=document % heldout_every == heldout_every - 1,
        document=document, n_dropped=n_dropped, context_size=context_size, heldout_every=heldout_every,
        junk=torch.from_numpy(np.concatenate([c.junk for c in chunks])),
    )
