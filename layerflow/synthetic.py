"""Planted ground truth: multi-"layer" activations built from known sparse features.

Each layer l has a dictionary D_l of unit feature directions. Layer l shares a chosen set of
features with layer 0 (the planted overlap) and draws the rest fresh; its activations are
sparse non-negative codes times D_l, times a per-layer gain (norm growth), plus a mean offset
and a little noise. `true_sae` builds a SAELens SAE whose decoder *is* D_l, so tests know what a
perfect dictionary for each layer looks like, and which features correspond across layers.

Used by the transfer, matching and summary tests and by benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int


@dataclass(frozen=True)
class PlantedLayers:
    activations: list[Float[torch.Tensor, "tokens d"]]  # one per layer, same tokens
    dictionaries: list[Float[torch.Tensor, "features d"]]  # unit rows
    feature_ids: list[Int[torch.Tensor, " features"]]  # global id of each row; shared rows share ids
    codes: list[Float[torch.Tensor, "tokens features"]]  # the planted sparse codes (ground-truth latents)
    gains: list[float]
    k: int  # active features per token

    def overlap(self, i: int, j: int) -> float:
        """Fraction of layer i's features that layer j also has (the planted ground truth)."""
        a, b = set(self.feature_ids[i].tolist()), set(self.feature_ids[j].tolist())
        return len(a & b) / len(a)

    def correspondence(self, i: int, j: int) -> dict[int, int]:
        """Row of layer i's dictionary -> row of layer j's that holds the same planted feature."""
        where_j = {int(f): r for r, f in enumerate(self.feature_ids[j])}
        return {r: where_j[int(f)] for r, f in enumerate(self.feature_ids[i]) if int(f) in where_j}


def planted_layers(
    overlaps: list[float],
    gains: list[float] | None = None,
    d: int = 128,
    n_features: int = 64,
    k: int = 4,
    n_tokens: int = 4096,
    noise: float = 0.01,
    mean_offset: float = 0.5,
    shared_codes: bool = False,
    seed: int = 0,
) -> PlantedLayers:
    """Layer l keeps round(overlaps[l] * n_features) of layer 0's features (overlaps[0] must be 1).

    With `shared_codes`, a shared feature fires on the same tokens with the same magnitude in
    every layer that has it (information carried forward); otherwise each layer draws its own
    codes, so any transfer is feature reuse and not persistence.
    """
    if overlaps[0] != 1.0:
        raise ValueError("overlaps[0] must be 1: layer 0 is the reference")
    gains = gains or [1.0] * len(overlaps)
    g = torch.Generator().manual_seed(seed)
    n_new_total = sum(n_features - round(o * n_features) for o in overlaps[1:])
    pool = torch.randn(n_features + n_new_total, d, generator=g)
    pool = pool / pool.norm(dim=-1, keepdim=True)
    offset = torch.randn(d, generator=g) * mean_offset
    n_pool = n_features + n_new_total
    base_codes = _sparse_codes(n_tokens, n_pool, max(k, round(k * n_pool / n_features)), g)
    acts, dicts, ids, all_codes = [], [], [], []
    next_new = n_features
    for layer, (o, gain) in enumerate(zip(overlaps, gains)):
        keep = round(o * n_features)
        kept = torch.randperm(n_features, generator=g)[:keep].sort().values if layer else torch.arange(n_features)
        fresh = torch.arange(next_new, next_new + n_features - keep)
        next_new += n_features - keep
        feature_ids = torch.cat([kept, fresh])
        dictionary = pool[feature_ids]
        codes = base_codes[:, feature_ids] if shared_codes else _sparse_codes(n_tokens, n_features, k, g)
        x = gain * (codes @ dictionary + offset + noise * torch.randn(n_tokens, d, generator=g))
        acts.append(x)
        dicts.append(dictionary)
        ids.append(feature_ids)
        all_codes.append(codes)
    return PlantedLayers(acts, dicts, ids, all_codes, list(gains), k)


def _sparse_codes(n_tokens: int, n_features: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Each token fires k distinct features with magnitudes in [1, 2)."""
    idx = torch.rand(n_tokens, n_features, generator=g).topk(k, dim=-1).indices
    codes = torch.zeros(n_tokens, n_features)
    codes.scatter_(1, idx, 1.0 + torch.rand(n_tokens, k, generator=g))
    return codes


def true_sae(planted: PlantedLayers, layer: int, architecture: str = "topk", threshold: float = 0.5):
    """A SAELens SAE whose decoder is layer `layer`'s planted dictionary (in raw units).

    Encoder = the dictionary's transpose (a matched filter), applied to (x - offset) / gain, so codes come out in
    planted units; "topk" keeps the k largest, "jumprelu" zeroes codes below `threshold` (in
    planted units: a threshold that only suits inputs of this layer's scale).
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    dictionary, gain = planted.dictionaries[layer], planted.gains[layer]
    n, d = dictionary.shape
    x = planted.activations[layer]
    offset = x.mean(0) - (planted.codes[layer].mean(0) @ dictionary) * gain
    if architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=planted.k, apply_b_dec_to_input=True))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=n, apply_b_dec_to_input=True))
    else:
        raise ValueError(f"architecture must be 'topk' or 'jumprelu', not {architecture!r}")
    with torch.no_grad():
        sae.W_dec.copy_(dictionary * gain)
        sae.b_dec.copy_(offset)
        sae.W_enc.copy_(dictionary.T / gain)  # matched filter: rows are nearly orthogonal when d >= 2 * features
        sae.b_enc.zero_()
        if architecture == "jumprelu":
            sae.threshold.fill_(threshold)
    return sae

