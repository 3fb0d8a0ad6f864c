"""Shuffled training batches for many sites at once: [sites, tokens, d] per step.

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
from torch import Tensor

from layerflow.files import TOKENS_KEY
from layerflow.store import ActivationStore, _read

BUFFER_BYTES = 1 << 30  # mixing buffer: about 1 GiB of activations


def store_chunks(store: ActivationStore, hooks: list[str], seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(activations [hooks, tokens, d], token ids [tokens]) per train shard, epoch after epoch."""
    shards = store.shards("train")
    epoch = 0
    while True:
        order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in order.tolist():
            acts = torch.stack([_read(shards[i], h).float() for h in hooks])
            yield acts, _read(shards[i], TOKENS_KEY).long().reshape(-1)
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
