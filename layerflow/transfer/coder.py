"""A dictionary as affine maps: the fast path of the transfer pair kernel.

`LinearCoder` spells out SAELens' inference math (encoder, activation, decoder, skip term) so that
one encoder matmul P = x W_enc serves several encodings of affine functions of x (alpha x + shift
has pre-activations alpha P + c): the raw, the scale-only and the mean-and-spread matched inputs of a pair.
The encodings are selected by the C kernel of `fused_encode` on a CPU (bit for bit the latents
torch gives, several times faster), by torch ops elsewhere, and only active latents are decoded
(`SparseLatents`, `embedding_bag`). A dictionary whose math `LinearCoder` does not cover goes
through its own encode/decode (`GenericCoder`, via `dictionaries.kinds`): slower, same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from sae_lens import (SAE, JumpReLUSAE, JumpReLUSkipTranscoder, JumpReLUTranscoder, SkipTranscoder, StandardSAE, TopKSAE,
                      Transcoder)

import layerflow.transfer.fused_encode as fused_encode
from layerflow.dictionaries.kinds import encode, predict
from layerflow.dictionaries.transcoders import TopKSkipTranscoder, TopKTranscoder


@dataclass
class LinearCoder:
    """x -> act((x - b_in) W_enc + b_enc) -> a W_dec + b_dec (+ x W_skip^T): SAELens' inference math,
    spelled out.

    Exact for StandardSAE (relu), JumpReLUSAE and TopKSAE (with or without
    rescale_acts_by_decoder_norm) when activations are not normalised at run time, and for the
    transcoders of the same activations (SAELens' Transcoder, JumpReLUTranscoder, their Skip
    variants, and layerflow's TopK ones): they read x_in [d], predict x_out [d_out], have b_in = 0,
    and the skip variants add x_in W_skip^T.
    """

    W_enc: Float[torch.Tensor, "d f"]
    b_enc: Float[torch.Tensor, " f"]
    b_in: Float[torch.Tensor, " d"]  # b_dec when apply_b_dec_to_input, else 0 (always 0 for a transcoder)
    W_dec: Float[torch.Tensor, "f d_out"]  # already divided by the row norms when TopK rescales
    b_dec: Float[torch.Tensor, " d_out"]
    pre_scale: Float[torch.Tensor, " f"] | None  # TopK rescale: hidden_pre * ||W_dec row||
    activation: str  # "relu", "jumprelu" or "topk"
    threshold: Float[torch.Tensor, " f"] | None = None  # jumprelu, clamped at 0 (relu then mask == mask)
    k: int = 0
    W_skip: Float[torch.Tensor, "d_out d"] | None = None  # skip transcoders

    def to(self, device: str) -> "LinearCoder":
        moved = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return LinearCoder(**{f: v.to(device) if isinstance(v, torch.Tensor) else v for f, v in moved.items()})

    @classmethod
    def from_sae(cls, sae: SAE) -> "LinearCoder | None":
        """The affine maps of `sae`, or None when it is not one of the classes this math is exact for."""
        cfg = sae.cfg
        kinds = {StandardSAE: "relu", JumpReLUSAE: "jumprelu", TopKSAE: "topk",
                 Transcoder: "relu", SkipTranscoder: "relu", JumpReLUTranscoder: "jumprelu",
                 JumpReLUSkipTranscoder: "jumprelu", TopKTranscoder: "topk", TopKSkipTranscoder: "topk"}
        if (type(sae) not in kinds or cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")
                or cfg.reshape_activations != "none" or sae.use_error_term):
            return None
        with torch.no_grad():
            W_enc, W_dec = sae.W_enc.detach().float(), sae.W_dec.detach().float()
            b_dec = sae.b_dec.detach().float()
            b_in = b_dec if cfg.apply_b_dec_to_input else W_enc.new_zeros(W_enc.shape[0])
            activation = kinds[type(sae)]
            pre_scale = None
            if activation == "topk" and getattr(cfg, "rescale_acts_by_decoder_norm", False):
                norms = W_dec.norm(dim=-1)
                pre_scale, W_dec = norms, W_dec / norms[:, None]
            threshold = sae.threshold.detach().float().clamp(min=0) if activation == "jumprelu" else None
            W_skip = sae.W_skip.detach().float().contiguous() if isinstance(sae, SkipTranscoder) else None
            return cls(W_enc.contiguous(), sae.b_enc.detach().float(), b_in, W_dec.contiguous(), b_dec, pre_scale,
                       activation, threshold, getattr(cfg, "k", 0), W_skip)

    def bias_for(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """The c with hidden_pre(alpha x + shift) = alpha (x W_enc) + c, for any alpha (before a TopK rescale)."""
        if shift is None:
            return self._unshifted_bias
        return (shift - self.b_in) @ self.W_enc + self.b_enc

    @functools.cached_property
    def _unshifted_bias(self) -> torch.Tensor:  # every batch needs it; computing it reads all of W_enc
        return -self.b_in @ self.W_enc + self.b_enc

    def encode(self, P: torch.Tensor, alpha: float, bias: torch.Tensor, buffer: torch.Tensor) -> "SparseLatents":
        """Latents of the input alpha x + shift, given P = x W_enc and bias = bias_for(shift).

        `buffer` ([tokens, d_sae], reused across calls: allocating it each time costs more than
        filling it) receives the pre-activations when torch computes them; only the active
        latents are returned.
        """
        return self.encode_variants(P, [(alpha, bias)], buffer)[0]

    def encode_variants(self, P: torch.Tensor, variants: list[tuple[float, torch.Tensor]],
                        buffer: torch.Tensor) -> list["SparseLatents"]:
        """`encode(P, alpha, bias, buffer)` for each (alpha, bias): in one pass over P with the C
        kernel of `fused_encode` when it is available (same latents, several times faster on a
        CPU), else with torch ops."""
        if not fused_encode.accepts(P):
            return [self._encode_torch(P, alpha, bias, buffer) for alpha, bias in variants]
        alphas, biases = [alpha for alpha, _ in variants], torch.stack([bias for _, bias in variants])
        if self.activation == "topk":
            values, indices = fused_encode.topk(P, alphas, biases, self.pre_scale, self.k)
            return [SparseLatents(indices[v], values[v], P.shape[0]) for v in range(len(variants))]
        cut = self.threshold if self.activation == "jumprelu" else None
        return [SparseLatents(cols, values, P.shape[0], offsets)
                for offsets, cols, values in fused_encode.threshold(P, alphas, biases, self.pre_scale, cut)]

    def _encode_torch(self, P: torch.Tensor, alpha: float, bias: torch.Tensor, buffer: torch.Tensor) -> "SparseLatents":
        torch.add(bias, P, alpha=alpha, out=buffer)
        if self.pre_scale is not None:
            buffer.mul_(self.pre_scale)
        if self.activation == "topk":
            values, indices = buffer.topk(self.k, dim=-1, sorted=False)
            return SparseLatents(indices, values.relu_(), P.shape[0])
        cut = self.threshold if self.activation == "jumprelu" else 0.0
        rows, cols = (buffer > cut).nonzero(as_tuple=True)
        offsets = F.pad(torch.bincount(rows, minlength=P.shape[0]).cumsum(0), (1, 0))
        return SparseLatents(cols, buffer[rows, cols], P.shape[0], offsets)

    def decode(self, latents: "SparseLatents") -> torch.Tensor:
        if latents.offsets is None:
            out = F.embedding_bag(latents.indices, self.W_dec, mode="sum", per_sample_weights=latents.values)
        else:
            out = F.embedding_bag(latents.indices, self.W_dec, latents.offsets[:-1], mode="sum",
                                  per_sample_weights=latents.values)
        return out + self.b_dec

    def skip(self, x: Float[torch.Tensor, "tokens d"]) -> Float[torch.Tensor, "tokens d_out"] | None:
        """x W_skip^T, the skip transcoder's linear term (linear in x, so scale matching scales it too)."""
        return None if self.W_skip is None else x @ self.W_skip.T


@dataclass
class SparseLatents:
    """Active latents of a batch. TopK: `indices` and `values` are [tokens, k] and `offsets` is
    None (values may be 0 after the ReLU). Other activations: flat [nnz] entries, token t's at
    offsets[t]:offsets[t + 1], indices ascending within a token, values > 0."""

    indices: torch.Tensor
    values: torch.Tensor
    n_tokens: int
    offsets: torch.Tensor | None = None  # [n_tokens + 1]

    def firing(self, d_sae: int, groups: torch.Tensor | None = None,
               n_groups: int = 0) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(tokens each latent fired on [d_sae], total active (token, latent) pairs, and with
        `groups` (each token's group) that total per group [n_groups])."""
        fired = self.values != 0 if self.offsets is None else None
        idx = self.indices.reshape(-1) if fired is None else self.indices[fired]
        by_group = None
        if groups is not None:
            rows = self._rows() if fired is None else self._rows()[fired.reshape(-1)]
            by_group = torch.bincount(groups[rows], minlength=n_groups)
        return torch.bincount(idx, minlength=d_sae), idx.numel(), by_group

    def sums(self, d_sae: int, groups: torch.Tensor | None = None,
             n_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent, float64 sums over tokens of the activation and of its square: [d_sae], or
        with `groups` (each token's group) per group, [n_groups, d_sae]."""
        idx, v = self.indices.reshape(-1), self.values.reshape(-1).double()
        if groups is None:
            return torch.bincount(idx, v, minlength=d_sae), torch.bincount(idx, v * v, minlength=d_sae)
        key, size = groups[self._rows()] * d_sae + idx, n_groups * d_sae
        return (torch.bincount(key, v, minlength=size).view(n_groups, d_sae),
                torch.bincount(key, v * v, minlength=size).view(n_groups, d_sae))

    def _rows(self) -> torch.Tensor:
        """The token of each entry of the flattened `indices`."""
        rows = torch.arange(self.n_tokens, device=self.indices.device)
        if self.offsets is None:
            return rows.repeat_interleave(self.indices.shape[1])
        return rows.repeat_interleave(self.offsets.diff())

    def dense(self, d_sae: int) -> torch.Tensor:
        out = torch.zeros(self.n_tokens, d_sae, dtype=self.values.dtype, device=self.values.device)
        if self.offsets is None:
            return out.scatter_(-1, self.indices, self.values)
        out[self._rows(), self.indices] = self.values
        return out


class GenericCoder:
    """Any SAELens SAE or transcoder, through its own encode/decode (no shared matmul)."""

    def __init__(self, sae: SAE):
        self.sae = sae

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, output): the reconstruction, or a transcoder's prediction (skip term included,
        as SAELens' SkipTranscoder.forward adds it)."""
        x = x.to(self.sae.device, self.sae.dtype)
        latents = encode(self.sae, x)
        return latents.float(), predict(self.sae, x, latents).float()


Coder = LinearCoder | GenericCoder


def make_coder(sae: SAE, device: str) -> Coder:
    """The fast `LinearCoder` of `sae` where its math is exact, else its own encode/decode, on `device`."""
    coder = LinearCoder.from_sae(sae)
    if coder is not None:
        return coder.to(device)
    sae.to(device)
    return GenericCoder(sae)


def with_skip(decoded: torch.Tensor, skip: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The prediction for the input alpha x, given its decoded latents and skip = x W_skip^T
    (linear in x)."""
    return decoded if skip is None else decoded.add_(skip, alpha=alpha)


def predict_batch(coder: Coder, x: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The coder's prediction from x (a transcoder's, skip term included); `buffers`: (P, pre-activations)."""
    if not isinstance(coder, LinearCoder):
        return coder.reconstruct(x)[1]
    P = torch.mm(x, coder.W_enc, out=buffers[0][:len(x)])
    return with_skip(coder.decode(coder.encode(P, 1.0, coder.bias_for(), buffers[1][:len(x)])), coder.skip(x), 1.0)


def dense_latents(coder: Coder, x: torch.Tensor, batch_tokens: int) -> torch.Tensor:
    """All latents of x [tokens, d_sae], `batch_tokens` at a time."""
    chunks = []
    for chunk in x.split(batch_tokens):
        if isinstance(coder, LinearCoder):
            buffer = torch.empty(len(chunk), coder.W_enc.shape[1], device=chunk.device)
            chunks.append(coder.encode(chunk @ coder.W_enc, 1.0, coder.bias_for(), buffer).dense(coder.W_enc.shape[1]))
        else:
            chunks.append(coder.reconstruct(chunk)[0])
    return torch.cat(chunks)
