"""Planted ground truth: multi-"layer" activations built from known sparse features.

Each layer l has a dictionary D_l of unit feature directions. Layer l shares a chosen set of
features with layer 0 (the planted overlap) and draws the rest fresh; its activations are
sparse non-negative codes times D_l, times a per-layer gain (norm growth), plus a mean offset
and a little noise. `true_sae` builds a SAELens SAE whose decoder *is* D_l, so tests know what a
perfect dictionary for each layer looks like, and which features correspond across layers.

Used by the tests and the benchmarks: every metric there is checked against a planted truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig,
                      JumpReLUTranscoder, JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, TopKSAE,
                      TopKSAEConfig, Transcoder, TranscoderConfig)
from sae_lens.saes.sae import SAEMetadata

from layerflow.dictionaries.transcoders import (TopKSkipTranscoder, TopKSkipTranscoderConfig, TopKTranscoder,
                                                TopKTranscoderConfig)


@dataclass(frozen=True)
class PlantedLayers:
    activations: list[Float[torch.Tensor, "tokens d"]]  # one per layer, same tokens
    train: list[Float[torch.Tensor, "train_tokens d"]]  # an independent draw of the same layers (fit the matches on it)
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
    layer_offsets: list[float] | None = None,
    n_train: int = 4096,
) -> PlantedLayers:
    """Layer l keeps round(overlaps[l] * n_features) of layer 0's features (overlaps[0] must be 1).

    With `shared_codes`, a shared feature fires on the same tokens with the same magnitude in
    every layer that has it (information carried forward); otherwise each layer draws its own
    codes, so any transfer is feature reuse and not persistence. Every layer shares one mean
    offset (times its gain) unless `layer_offsets` gives each layer its own: layer l's offset is
    then a fresh random direction of norm layer_offsets[l] times the norm of its planted signal
    (E||codes D||), so ||mean|| / E||x|| can be set as in real residual streams. `train` holds
    `n_train` more tokens of every layer, drawn after the held-out ones.
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
    pool_k = max(k, round(k * n_pool / n_features))
    base_codes = _sparse_codes(n_tokens, n_pool, pool_k, g)
    acts, dicts, ids, all_codes, offsets = [], [], [], [], []
    next_new = n_features
    for layer, (o, gain) in enumerate(zip(overlaps, gains)):
        keep = round(o * n_features)
        kept = torch.randperm(n_features, generator=g)[:keep].sort().values if layer else torch.arange(n_features)
        fresh = torch.arange(next_new, next_new + n_features - keep)
        next_new += n_features - keep
        feature_ids = torch.cat([kept, fresh])
        dictionary = pool[feature_ids]
        codes = base_codes[:, feature_ids] if shared_codes else _sparse_codes(n_tokens, n_features, k, g)
        layer_offset = offset
        if layer_offsets is not None:
            direction = torch.randn(d, generator=g)
            signal = (codes @ dictionary).norm(dim=-1).mean()
            layer_offset = direction / direction.norm() * layer_offsets[layer] * signal
        x = gain * (codes @ dictionary + layer_offset + noise * torch.randn(n_tokens, d, generator=g))
        acts.append(x)
        dicts.append(dictionary)
        ids.append(feature_ids)
        all_codes.append(codes)
        offsets.append(layer_offset)
    train_base = _sparse_codes(n_train, n_pool, pool_k, g)
    train = []
    for layer, gain in enumerate(gains):
        codes = train_base[:, ids[layer]] if shared_codes else _sparse_codes(n_train, n_features, k, g)
        train.append(gain * (codes @ dicts[layer] + offsets[layer] + noise * torch.randn(n_train, d, generator=g)))
    return PlantedLayers(acts, train, dicts, ids, all_codes, list(gains), k)


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



# ---------------------------------------------------------------- planted MLP maps (transcoders)


@dataclass(frozen=True)
class PlantedMaps:
    """Per layer, an MLP input x_in and output y computed by one of a few planted sparse maps: a map is
    (orthonormal input features E [features, d_in], input offset, output directions D [features,
    d_out], output offset); a token's code c gives x_in = g_in (c E + offset_in + noise) and
    y = g_out (c D + offset_out). Layers given the same map number compute the same map."""

    inputs: list[Float[torch.Tensor, "tokens d_in"]]
    outputs: list[Float[torch.Tensor, "tokens d_out"]]
    train_inputs: list[Float[torch.Tensor, "train_tokens d_in"]]  # an independent draw (fit the matches on it)
    train_outputs: list[Float[torch.Tensor, "train_tokens d_out"]]
    maps: list[int]  # the map of each layer
    in_features: list[Float[torch.Tensor, "features d_in"]]  # per map
    in_offsets: list[Float[torch.Tensor, " d_in"]]
    out_directions: list[Float[torch.Tensor, "features d_out"]]
    out_offsets: list[Float[torch.Tensor, " d_out"]]
    codes: list[Float[torch.Tensor, "tokens features"]]  # per layer
    in_gains: list[float]
    out_gains: list[float]
    k: int


def planted_maps(
    maps: list[int],
    in_gains: list[float] | None = None,
    out_gains: list[float] | None = None,
    d_in: int = 48,
    d_out: int = 40,
    n_features: int = 24,
    k: int = 3,
    n_tokens: int = 2048,
    noise: float = 0.01,
    mean_offset: float = 1.0,
    shared_codes: bool = False,
    seed: int = 0,
    n_train: int = 2048,
) -> PlantedMaps:
    """Layer l computes planted map number maps[l]. Each layer draws its own codes (tokens), so a
    transcoder transfers only by computing the same map; with `shared_codes` every layer sees the same
    codes (layer j's MLP output is then layer i's again when their maps agree: persistence)."""
    g = torch.Generator().manual_seed(seed)
    n_maps = max(maps) + 1
    E = [torch.linalg.qr(torch.randn(d_in, n_features, generator=g)).Q.T.contiguous() for _ in range(n_maps)]
    D = [torch.randn(n_features, d_out, generator=g) for _ in range(n_maps)]
    D = [x / x.norm(dim=-1, keepdim=True) for x in D]
    off_in = [torch.randn(d_in, generator=g) * mean_offset for _ in range(n_maps)]
    off_out = [torch.randn(d_out, generator=g) * mean_offset for _ in range(n_maps)]
    in_gains, out_gains = in_gains or [1.0] * len(maps), out_gains or [1.0] * len(maps)
    shared = _sparse_codes(n_tokens, n_features, k, g)
    inputs, outputs, codes = [], [], []
    for m, gi, go in zip(maps, in_gains, out_gains):
        c = shared if shared_codes else _sparse_codes(n_tokens, n_features, k, g)
        inputs.append(gi * (c @ E[m] + off_in[m] + noise * torch.randn(n_tokens, d_in, generator=g)))
        outputs.append(go * (c @ D[m] + off_out[m]))
        codes.append(c)
    shared = _sparse_codes(n_train, n_features, k, g)
    train_inputs, train_outputs = [], []
    for m, gi, go in zip(maps, in_gains, out_gains):
        c = shared if shared_codes else _sparse_codes(n_train, n_features, k, g)
        train_inputs.append(gi * (c @ E[m] + off_in[m] + noise * torch.randn(n_train, d_in, generator=g)))
        train_outputs.append(go * (c @ D[m] + off_out[m]))
    return PlantedMaps(inputs, outputs, train_inputs, train_outputs, list(maps), E, off_in, D, off_out, codes,
                       list(in_gains), list(out_gains), k)


def true_transcoder(planted: PlantedMaps, layer: int, architecture: str = "jumprelu", skip: bool = False,
                    threshold: float = 0.5, hook_name: str = "", hook_name_out: str = ""):
    """A SAELens transcoder computing layer `layer`'s planted map (raw units): encoder E^T / g_in with the
    input offset cancelled in b_enc, decoder g_out D, b_dec = g_out offset_out. "jumprelu" zeroes latents
    below `threshold` (in code units), "relu" shifts them down by 0.05 (below the noise), "topk" keeps
    the planted k (layerflow's TopKTranscoder). With `skip`, W_skip is zero."""
    classes = {("relu", False): (Transcoder, TranscoderConfig), ("relu", True): (SkipTranscoder, SkipTranscoderConfig),
               ("jumprelu", False): (JumpReLUTranscoder, JumpReLUTranscoderConfig),
               ("jumprelu", True): (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
               ("topk", False): (TopKTranscoder, TopKTranscoderConfig),
               ("topk", True): (TopKSkipTranscoder, TopKSkipTranscoderConfig)}
    if (architecture, skip) not in classes:
        raise ValueError(f"architecture must be 'relu', 'jumprelu' or 'topk', not {architecture!r}")
    m, gi, go = planted.maps[layer], planted.in_gains[layer], planted.out_gains[layer]
    E, D = planted.in_features[m], planted.out_directions[m]
    sae_cls, cfg_cls = classes[architecture, skip]
    extra = {"k": planted.k} if architecture == "topk" else {}
    cfg = cfg_cls(d_in=E.shape[1], d_sae=E.shape[0], d_out=D.shape[1], apply_b_dec_to_input=False,
                  metadata=SAEMetadata(hook_name=hook_name, hook_name_out=hook_name_out), **extra)
    transcoder = sae_cls(cfg)
    with torch.no_grad():
        transcoder.W_enc.copy_(E.T / gi)
        transcoder.b_enc.copy_(-(planted.in_offsets[m] @ E.T) - (0.05 if architecture == "relu" else 0.0))
        transcoder.W_dec.copy_(D * go)
        transcoder.b_dec.copy_(planted.out_offsets[m] * go)
        if architecture == "jumprelu":
            transcoder.threshold.fill_(threshold)
    return transcoder
