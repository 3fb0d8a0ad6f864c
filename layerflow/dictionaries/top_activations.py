"""What a feature means: the held-out contexts that fire it most.

`TopActivations` keeps, per latent, the k largest activations seen so far and where they were
(a flat index into the held-out tokens, seq * context + pos), updated batch by batch, so it works
on any number of tokens in fixed memory. Training uses it for its periodic activation samples,
the reasoning tracker for feature descriptions; both read the held-out split of a capture store
through `capture.batches.heldout_batches`.

`contexts(top, feature, tokens, tokenizer)` turns a latent's top positions into readable text:
the tokens before the firing one (within the same sequence), the firing token marked, and a
few after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from layerflow.files import atomic


@dataclass
class TopActivations:
    values: Float[Tensor, "d_sae k"]  # descending per latent; 0 where the latent fired fewer than k times
    positions: Int[Tensor, "d_sae k"]  # flat held-out token index; -1 where there is no activation

    @classmethod
    def empty(cls, d_sae: int, k: int) -> "TopActivations":
        return cls(torch.zeros(d_sae, k), torch.full((d_sae, k), -1, dtype=torch.long))

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @torch.no_grad()
    def update(self, latents: Float[Tensor, "tokens d_sae"], positions: Int[Tensor, " tokens"]) -> None:
        """Merge a batch: only positive activations count."""
        latents = latents.to_dense() if latents.is_sparse else latents
        latents = latents.float().cpu().clamp(min=0)
        k_batch = min(self.k, latents.shape[0])
        if k_batch == 0:
            return
        batch_values, rows = latents.topk(k_batch, dim=0)  # [k_batch, d_sae]
        batch_positions = torch.where(batch_values > 0, positions.cpu()[rows], -1)
        values = torch.cat([self.values, batch_values.T], dim=1)
        where = torch.cat([self.positions, batch_positions.T], dim=1)
        self.values, order = values.topk(self.k, dim=1)
        self.positions = where.gather(1, order)

    def top_features(self, n: int) -> list[int]:
        """The n latents with the largest single activation."""
        return self.values[:, 0].topk(min(n, self.values.shape[0])).indices.tolist()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic(path) as tmp:
            save_file({"values": self.values.contiguous(), "positions": self.positions.contiguous()}, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TopActivations":
        with safe_open(str(path), "pt") as f:
            return cls(f.get_tensor("values"), f.get_tensor("positions"))


def top_activations(encode: Callable[[Tensor], Tensor], batches: Iterator[tuple[Tensor, Tensor]], d_sae: int,
                    k: int = 10) -> TopActivations:
    """Top-k activating held-out positions per latent of `encode` (activations -> latents)."""
    top = TopActivations.empty(d_sae, k)
    with torch.no_grad():
        for x, positions in batches:
            top.update(encode(x), positions)
    return top


@dataclass(frozen=True)
class Context:
    activation: float
    position: int  # flat held-out token index of the firing token
    before: list[str]  # tokens before it, same sequence
    token: str  # the firing token
    after: list[str]

    def text(self) -> str:
        return "".join(self.before) + "[[" + self.token + "]]" + "".join(self.after)


def contexts(top: TopActivations, feature: int, tokens: Int[Tensor, "seqs ctx"], tokenizer: Any,
             before: int = 12, after: int = 3) -> list[Context]:
    """The contexts of `feature`'s top activations, strongest first."""
    ctx = tokens.shape[1]
    flat = tokens.reshape(-1).tolist()
    out = []
    for value, position in zip(top.values[feature].tolist(), top.positions[feature].tolist()):
        if position < 0:
            break
        start = max(position - before, position - position % ctx)
        end = min(position + after + 1, position - position % ctx + ctx)
        pieces = [token_text(tokenizer, t) for t in flat[start:end]]
        i = position - start
        out.append(Context(value, position, pieces[:i], pieces[i], pieces[i + 1:]))
    return out


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as text; `<id>` when there is no tokenizer (random-init twins)."""
    return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"
