"""Batches of stored or live activations: shuffled training batches for many sites at once
([sites, tokens, d] per step), and the held-out split in order (`heldout_batches`).

Two sources feed the same mixer:
- a capture store: shards are read in a seeded random order, several epochs allowed;
- online: the model runs on token sequences and hooks collect every site in one pass.

Chunks are pooled in a mixing buffer of about `buffer_bytes`, special-token positions dropped
(when excluded), shuffled with a seeded generator, and cut into batches. The whole stream is a
function of the seed, so a resumed run skips the batches it has already used and sees exactly
the data an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor

from layerflow.capture.store import ActivationStore, read_tensor
from layerflow.files import TOKENS_KEY

BUFFER_BYTES = 1 << 30  # mixing buffer: about 1 GiB of activations


def store_chunks(store: ActivationStore, hooks: list[str], seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(activations [hooks, tokens, d], token ids [tokens]) per train shard, epoch after epoch."""
    shards = store.shards("train")
    epoch = 0
    while True:
        order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in order.tolist():
            acts = torch.stack([read_tensor(shards[i], h).float() for h in hooks])
            yield acts, read_tensor(shards[i], TOKENS_KEY).long().reshape(-1)
        epoch += 1


def model_chunks(model, tokens: Int[Tensor, "seqs ctx"], hooks: list[str], batch_size: int,
                 device: str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Online: one forward pass per batch of sequences (stopping after the deepest hook), cycling."""
    stop_at = max(int(h.split(".")[1]) for h in hooks) + 1
    collected: dict[str, Tensor] = {}

    def keep(act, hook):
        collected[hook.name] = act.reshape(-1, act.shape[-1]).float().cpu()

    while True:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size]
            with torch.inference_mode(), model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
                model(batch.to(device), stop_at_layer=stop_at)
            yield torch.stack([collected[h] for h in hooks]), batch.reshape(-1)


def mixed_batches(
    chunks: Iterator[tuple[Tensor, Tensor]],
    batch_tokens: int,
    special_ids: list[int],
    seed: int,
    buffer_bytes: int = BUFFER_BYTES,
) -> Iterator[Float[Tensor, "hooks batch d"]]:
    """Pool chunks into a buffer, drop special positions, shuffle, and yield full batches."""
    generator = torch.Generator().manual_seed(seed)
    specials = torch.tensor(special_ids, dtype=torch.long)
    leftover: Tensor | None = None
    while True:
        pool, size = [] if leftover is None else [leftover], 0
        while size < buffer_bytes:
            acts, ids = next(chunks)
            if len(specials):
                acts = acts[:, ~torch.isin(ids, specials)]
            pool.append(acts)
            size += acts.numel() * acts.element_size()
        buffer = torch.cat(pool, dim=1)
        buffer = buffer[:, torch.randperm(buffer.shape[1], generator=generator)]
        n_full = buffer.shape[1] // batch_tokens
        for b in range(n_full):
            yield buffer[:, b * batch_tokens:(b + 1) * batch_tokens]
        leftover = buffer[:, n_full * batch_tokens:]


def heldout_batches(store, hooks: list[str], specials: list[int], max_tokens: int | None = None,
                    batch_tokens: int = 8192) -> Iterator[tuple[dict[str, Tensor], Int[Tensor, " tokens"]]]:
    """({hook: activations [tokens, d]}, flat positions [tokens]) over the held-out split, special
    positions left out, at most `max_tokens` tokens, one shard in memory at a time."""
    special_ids = torch.tensor(specials, dtype=torch.long)
    offset, left = 0, max_tokens if max_tokens is not None else float("inf")
    for path in store.shards("heldout"):
        with safe_open(str(path), "pt") as f:
            tokens = f.get_tensor(TOKENS_KEY).long().reshape(-1)
            acts = {h: f.get_tensor(h) for h in hooks}
        keep = (~torch.isin(tokens, special_ids)).nonzero()[:, 0]
        keep = keep[:int(min(left, len(keep)))]
        for rows in keep.split(batch_tokens):
            yield {h: x[rows].float() for h, x in acts.items()}, rows + offset
        offset += len(tokens)
        left -= len(keep)
        if left <= 0:
            return
