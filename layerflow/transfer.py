"""Within-model transfer: the SAE trained at site i applied to the held-out activations of site j.

For every ordered pair (i, j) of sites, on the same held-out tokens (special tokens left out),
this computes every field of `transfer_types.WithinModelPair`:
- the notes' metrics (raw loss ratio both ways, feature-variance ratio, top-k Spearman, decoder
  similarity), kept for continuity;
- explained variance at the target with the target's own mean (`metrics.ReconstructionStats`),
  "raw" and "scale-matched": x_j times rho = E||x_i|| / E||x_j|| before encoding, the
  reconstruction divided by rho, so SAE_i sees inputs of the size it was trained on;
- a persistence baseline: layer i's activations as a prediction of layer j (identity, and the
  best scalar map mean_j + a (x_i - mean_i)), and that prediction passed through SAE_j, so
  that transfer and persistence are compared like with like (docs/transfer.md);
- L0, dead fraction and l2 ratio of SAE_i on j; decoder and activation matching (`matching.py`).

Speed. Each source SAE's encoder matmul P = x_j W_enc is shared by three encodings: raw
(P + c), scale-matched (rho P + c) and persistence through SAE_i of the pair (j -> i)
(a P + c'), because each is an affine function of x_j. On a CPU the three encodings are
selected together by the C kernel of `fused_encode` (same latents as torch, bit for bit; torch
ops where it is unavailable). Decoding touches only active latents (`embedding_bag`). `LinearCoder` holds exactly SAELens' inference math for its standard, topk
and jumprelu SAEs (BatchTopK saves as jumprelu); any other SAE goes through its own
encode/decode (slower, same numbers: a test checks both paths agree).

Transcoders (`transcoder_matrix`; `transfer_run` detects a folder of them): T_i reads layer j's
input site and is scored on layer j's output site, with the same `LinearCoder` (plus its skip
term), `SparseLatents`, `ReconstructionStats` and metric assembly. Scale matching has an input and
an output factor, and persistence compares the output sites (docs/transfer.md, "Transcoders").
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float

from layerflow.dictionaries.kinds import encode, is_transcoder, output_hook, predict
from layerflow.errors import LayerflowError
from layerflow.files import MATCHED_FILE, SUMMARY_FILE, TRANSFER_DIR, atomic_write_text, run_store, write_json
from layerflow.metrics import InputSums, ReconstructionStats
from layerflow.models.sites import Site
from layerflow.transfer_types import TransferMatrix

if TYPE_CHECKING:
    from sae_lens import SAE

    from layerflow.capture.store import ActivationStore


@dataclass(frozen=True)
class TransferOptions:
    max_tokens: int | None = 8192  # held-out tokens per site (None: all)
    batch_tokens: int = 2048  # tokens per encoder matmul ([2048, d_sae] buffers stay cache-friendlier than 4096)
    top_k: int = 50  # latents used by the notes' variance ratio, Spearman and decoder similarity
    match_distance: int = 1  # Hungarian matching for pairs at most this many sites apart (0 = none)
    null_quantile: float = 0.99
    exclude_special_tokens: bool = True
    spliced: bool = False  # also splice SAE_i (scale-matched) into the model at site j: delta CE and KL
    device: str = "cpu"  # where the pair kernel runs ("cuda" for large matrices); sums stay float64 on the CPU
    seed: int = 0


# ---------------------------------------------------------------- the SAE as affine maps


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
    def from_sae(cls, sae: "SAE") -> "LinearCoder | None":
        from sae_lens import (JumpReLUSAE, JumpReLUSkipTranscoder, JumpReLUTranscoder, SkipTranscoder, StandardSAE,
                              TopKSAE, Transcoder)

        from layerflow.dictionaries.transcoders import TopKSkipTranscoder, TopKTranscoder

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
        from layerflow import fused_encode

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

    def firing(self, d_sae: int) -> tuple[torch.Tensor, int]:
        """(tokens each latent fired on [d_sae], total active (token, latent) pairs)."""
        fired = self.indices if self.offsets is not None else self.indices[self.values != 0]
        return torch.bincount(fired.reshape(-1), minlength=d_sae), fired.numel()

    def sums(self, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent, float64 sums over tokens of the activation and of its square."""
        idx, v = self.indices.reshape(-1), self.values.reshape(-1).double()
        return torch.bincount(idx, v, minlength=d_sae), torch.bincount(idx, v * v, minlength=d_sae)

    def dense(self, d_sae: int) -> torch.Tensor:
        out = torch.zeros(self.n_tokens, d_sae, dtype=self.values.dtype, device=self.values.device)
        if self.offsets is None:
            return out.scatter_(-1, self.indices, self.values)
        rows = torch.arange(self.n_tokens, device=self.indices.device).repeat_interleave(self.offsets.diff())
        out[rows, self.indices] = self.values
        return out


class _GenericCoder:
    """Any SAELens SAE or transcoder, through its own encode/decode (no shared matmul)."""

    def __init__(self, sae: "SAE"):
        self.sae = sae

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, output): the reconstruction, or a transcoder's prediction (skip term included,
        as SAELens' SkipTranscoder.forward adds it)."""
        x = x.to(self.sae.device, self.sae.dtype)
        latents = encode(self.sae, x)
        return latents.float(), predict(self.sae, x, latents).float()


# ---------------------------------------------------------------- the matrix


@dataclass
class _PairAccumulators:
    raw: ReconstructionStats
    scaled: ReconstructionStats
    persistence: ReconstructionStats  # of the pair (target -> source), through the source's SAE
    latent_sum: torch.Tensor  # raw mode, per latent, for the notes' variance ratio
    latent_sq_sum: torch.Tensor


@torch.no_grad()
def within_model_matrix(
    saes: dict[str, "SAE"],
    activations: dict[str, Float[torch.Tensor, "tokens d"]],
    sites: list[Site],
    options: TransferOptions = TransferOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> TransferMatrix:
    """Every ordered pair of `sites` (source SAE x target activations), all on the same tokens.

    `saes[hook]` reads raw activations of `hook`; `activations[hook]` are that site's held-out
    activations, row t of every site being the same token.
    """
    hooks = [s.hook_name for s in sites]
    _check_inputs(saes, activations, hooks)
    n = len(hooks)
    xs = [activations[h].to(options.device, torch.float32) for h in hooks]
    n_tokens = xs[0].shape[0]
    means = [x.double().mean(0) for x in xs]
    mean_norms = [x.norm(dim=-1).double().mean().item() for x in xs]
    centered_gram, raw_gram = _grams(xs, means)
    coders = [_coder(saes[h], options.device) for h in hooks]
    input_sums = [[InputSums.of(chunk) for chunk in x.split(options.batch_tokens)] for x in xs]
    acc: dict[tuple[int, int], _PairAccumulators] = {}
    total = n * n + (n if options.match_distance else 0)
    done = 0
    report = progress or (lambda done, total: None)
    for s, coder in enumerate(coders):
        d_sae = saes[hooks[s]].cfg.d_sae
        P, buffer = torch.empty(2, min(options.batch_tokens, n_tokens), d_sae, device=options.device)
        for t in range(n):
            rho = mean_norms[s] / mean_norms[t]
            # persistence of the pair (t -> s): mean_s + alpha (x_t - mean_t), through SAE_s
            alpha = (centered_gram[t, s] / centered_gram[t, t]).item() if centered_gram[t, t] > 0 else 0.0
            shift = (means[s] - alpha * means[t]).float()
            a = _PairAccumulators(ReconstructionStats(), ReconstructionStats(), ReconstructionStats(),
                                  torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64))
            persistence_bias = coder.bias_for(shift) if isinstance(coder, LinearCoder) else None  # once per pair
            for c, start in enumerate(range(0, n_tokens, options.batch_tokens)):
                x_t = xs[t][start:start + options.batch_tokens]
                x_s = xs[s][start:start + options.batch_tokens]
                _accumulate(coder, x_t, x_s, rho, alpha, shift, persistence_bias, a, (P[:len(x_t)], buffer[:len(x_t)]),
                            input_sums[t][c], input_sums[s][c])
            acc[s, t] = a
            done += 1
            report(done, total)

    # acc[s, t].persistence is the persistence of the pair (t -> s): key it by its own (source, target)
    persist = {(t, s): v.persistence.compute() for (s, t), v in acc.items()}
    metrics = _assemble(acc, persist, "persistence_ev_through_target_sae", n, centered_gram, raw_gram, n_tokens,
                        options, [saes[h] for h in hooks])
    extras: dict[str, Any] = {}
    if options.match_distance:
        _feature_matching(metrics, extras, saes, xs, hooks, coders, options,
                          lambda i: report(n * n + i, total))
    settings = {"n_tokens": n_tokens, **asdict(options),
                "scale_matching": "x_j * E||x_i|| / E||x_j|| before SAE_i, reconstruction / the same factor",
                "mean_activation_norm": dict(zip(hooks, mean_norms))}
    return TransferMatrix("within_model", sites, sites, metrics, settings, extras)


# ---------------------------------------------------------------- transcoders


@torch.no_grad()
def transcoder_matrix(
    transcoders: dict[str, "SAE"],
    activations: dict[str, Float[torch.Tensor, "tokens d"]],
    sites: list[Site],
    options: TransferOptions = TransferOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> TransferMatrix:
    """Every ordered pair of `sites` (source transcoder T_i, target layer j), all on the same tokens:
    T_i reads layer j's input and its prediction is compared with layer j's output.

    `transcoders[hook]` reads `hook` (its input site; `sites` are the input sites) and predicts
    `output_hook(transcoder)`; `activations` holds the held-out activations of every input and output
    hook, row t of each being the same token. Scale matching multiplies x_in_j by
    rho_in = E||x_in_i|| / E||x_in_j|| and divides the prediction by rho_out = E||y_i|| / E||y_j||.
    Persistence compares the output sites: y_i as a prediction of y_j, and, as the dictionary-side
    baseline, the same scalar map applied to T_i's own prediction on layer i (docs/transfer.md).
    """
    in_hooks = [s.hook_name for s in sites]
    out_hooks = [output_hook(transcoders[h]) for h in in_hooks]
    _check_transcoder_inputs(transcoders, activations, in_hooks, out_hooks)
    n = len(in_hooks)
    xs = [activations[h].to(options.device, torch.float32) for h in in_hooks]
    ys = [activations[h].to(options.device, torch.float32) for h in out_hooks]
    n_tokens = xs[0].shape[0]
    in_norms = [x.norm(dim=-1).double().mean().item() for x in xs]
    out_norms = [y.norm(dim=-1).double().mean().item() for y in ys]
    y_means = [y.double().mean(0) for y in ys]
    centered_gram, raw_gram = _grams(ys, y_means)
    coders = [_coder(transcoders[h], options.device) for h in in_hooks]
    target_sums = [[InputSums.of(chunk) for chunk in y.split(options.batch_tokens)] for y in ys]
    acc: dict[tuple[int, int], _PairAccumulators] = {}
    total = n * n + (n if options.match_distance else 0)
    report = progress or (lambda done, total: None)
    for s, coder in enumerate(coders):
        d_sae = transcoders[in_hooks[s]].cfg.d_sae
        P, buffer = torch.empty(2, min(options.batch_tokens, n_tokens), d_sae, device=options.device)
        buffers = (P, buffer)
        own = [_predict(coder, x, buffers) for x in xs[s].split(options.batch_tokens)]  # T_i on its own layer
        for t in range(n):
            rho_in, rho_out = in_norms[s] / in_norms[t], out_norms[s] / out_norms[t]
            # the scalar persistence map y_s -> y_t: mean_t + a (y - mean_s)
            a = (centered_gram[s, t] / centered_gram[s, s]).item() if centered_gram[s, s] > 0 else 0.0
            shift = (y_means[t] - a * y_means[s]).float()
            pair = _PairAccumulators(ReconstructionStats(), ReconstructionStats(), ReconstructionStats(),
                                     torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64))
            for c, (x_t, y_t) in enumerate(zip(xs[t].split(options.batch_tokens), ys[t].split(options.batch_tokens))):
                _accumulate_transcoder(coder, x_t, y_t, rho_in, rho_out, pair, buffers, target_sums[t][c])
                pair.persistence.add(y_t, torch.add(shift, own[c], alpha=a), x_sums=target_sums[t][c])
            acc[s, t] = pair
            report(s * n + t + 1, total)

    persist = {k: v.persistence.compute() for k, v in acc.items()}
    metrics = _assemble(acc, persist, "persistence_ev_through_source_transcoder", n, centered_gram, raw_gram,
                        n_tokens, options, [transcoders[h] for h in in_hooks])
    extras: dict[str, Any] = {}
    if options.match_distance:
        _feature_matching(metrics, extras, transcoders, xs, in_hooks, coders, options,
                          lambda i: report(n * n + i, total))
    settings = {"n_tokens": n_tokens, **asdict(options), "coder": "transcoder",
                "hook_name_out": dict(zip(in_hooks, out_hooks)),
                "scale_matching": "x_in_j * E||x_in_i|| / E||x_in_j|| before T_i, prediction / (E||y_i|| / E||y_j||)",
                "persistence": "output sites: y_i -> y_j (identity, best scalar map), and that map applied to T_i(x_in_i)",
                "mean_activation_norm": dict(zip(in_hooks, in_norms)),
                "mean_output_norm": dict(zip(out_hooks, out_norms))}
    return TransferMatrix("within_model", sites, sites, metrics, settings, extras)


def _predict(coder, x: torch.Tensor, buffers) -> torch.Tensor:
    """The transcoder's prediction from x."""
    if not isinstance(coder, LinearCoder):
        return coder.reconstruct(x)[1]
    P = torch.mm(x, coder.W_enc, out=buffers[0][:len(x)])
    return _with_skip(coder.decode(coder.encode(P, 1.0, coder.bias_for(), buffers[1][:len(x)])), coder.skip(x), 1.0)


def _with_skip(decoded: torch.Tensor, skip: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The prediction for the input alpha x, given its decoded latents and skip = x W_skip^T
    (linear in x)."""
    return decoded if skip is None else decoded.add_(skip, alpha=alpha)


def _accumulate_transcoder(coder, x_t, y_t, rho_in, rho_out, a: _PairAccumulators, buffers, sums_t) -> None:
    """T_s on layer t against y_t, raw and scale-matched: one encoder matmul and one skip matmul for both."""
    d_sae = len(a.latent_sum)
    if isinstance(coder, LinearCoder):
        P, buffer = buffers[0][:len(x_t)], buffers[1][:len(x_t)]
        torch.mm(x_t, coder.W_enc, out=P)
        bias, skip = coder.bias_for(), coder.skip(x_t)
        latents, scaled = coder.encode_variants(P, [(1.0, bias), (rho_in, bias)], buffer)
        a.raw.add(y_t, _with_skip(coder.decode(latents), skip, 1.0), x_sums=sums_t)
        a.raw.add_firing(*latents.firing(d_sae))
        total, squares = latents.sums(d_sae)
        a.scaled.add(y_t, _with_skip(coder.decode(scaled), skip, rho_in) / rho_out, x_sums=sums_t)
        a.scaled.add_firing(*scaled.firing(d_sae))
    else:
        lat, prediction = coder.reconstruct(x_t)
        a.raw.add(y_t, prediction, lat)
        lat_s, prediction_s = coder.reconstruct(rho_in * x_t)
        a.scaled.add(y_t, prediction_s / rho_out, lat_s)
        total, squares = lat.sum(0, dtype=torch.float64), lat.square().sum(0, dtype=torch.float64)
    a.latent_sum += total.cpu()
    a.latent_sq_sum += squares.cpu()


def _check_transcoder_inputs(transcoders: dict, activations: dict, in_hooks: list[str], out_hooks: list[str]) -> None:
    if not in_hooks:
        raise LayerflowError("No sites to compare.")
    for h, out in zip(in_hooks, out_hooks):
        if h not in transcoders:
            raise LayerflowError(f"No transcoder for site '{h}'. Transcoders given for: {', '.join(transcoders) or 'none'}.")
        cfg = transcoders[h].cfg
        for hook, width, what in ((h, cfg.d_in, "d_in"), (out, getattr(cfg, "d_out", cfg.d_in), "d_out")):
            if hook not in activations:
                raise LayerflowError(f"No held-out activations for '{hook}' (the transcoder of '{h}' "
                                     f"{'reads' if hook == h else 'predicts'} it). Available: {', '.join(activations) or 'none'}.")
            if activations[hook].shape[-1] != width:
                raise LayerflowError(f"The transcoder for '{h}' has {what} {width}, but the activations of '{hook}' "
                                     f"have width {activations[hook].shape[-1]}.")
    lengths = {hook: activations[hook].shape[0] for hook in dict.fromkeys(in_hooks + out_hooks)}
    if len(set(lengths.values())) != 1:
        raise LayerflowError(f"Sites must share the same tokens, but the token counts differ: {lengths}.")
    if not next(iter(lengths.values())):
        raise LayerflowError("No held-out tokens to compare on.")


def _coder(sae: "SAE", device: str) -> "LinearCoder | _GenericCoder":
    coder = LinearCoder.from_sae(sae)
    if coder is not None:
        return coder.to(device)
    sae.to(device)
    return _GenericCoder(sae)


def _check_inputs(saes: dict, activations: dict, hooks: list[str]) -> None:
    if len(hooks) < 1:
        raise LayerflowError("No sites to compare.")
    for h in hooks:
        if h not in saes:
            raise LayerflowError(f"No SAE for site '{h}'. SAEs given for: {', '.join(saes) or 'none'}.")
        if h not in activations:
            raise LayerflowError(f"No held-out activations for site '{h}'. Available: {', '.join(activations) or 'none'}.")
        if is_transcoder(saes[h]):
            raise LayerflowError(f"The dictionary for '{h}' is a transcoder: use transcoder_matrix (transfer_run picks it).")
        if saes[h].cfg.d_in != activations[h].shape[-1]:
            raise LayerflowError(f"The SAE for '{h}' has d_in {saes[h].cfg.d_in}, but the activations there have "
                                 f"width {activations[h].shape[-1]}.")
    lengths = {h: activations[h].shape[0] for h in hooks}
    if len(set(lengths.values())) != 1:
        raise LayerflowError(f"Sites must share the same tokens, but the token counts differ: {lengths}.")
    if not next(iter(lengths.values())):
        raise LayerflowError("No held-out tokens to compare on.")


def _grams(xs: list[torch.Tensor], means: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] sums over tokens of <x_i - mean_i, x_j - mean_j> and of <x_i, x_j>, in float64."""
    n, T = len(xs), xs[0].shape[0]
    flat = torch.stack([x.double().reshape(-1) for x in xs])  # [n, T*d]
    raw = flat @ flat.T
    mean_flat = torch.stack(means)  # [n, d]
    centered = raw - T * (mean_flat @ mean_flat.T)
    return centered, raw


def _accumulate(coder, x_t, x_s, rho, alpha, shift, persistence_bias, a: _PairAccumulators, buffers, sums_t,
                sums_s) -> None:
    d_sae = len(a.latent_sum)
    if isinstance(coder, LinearCoder):
        P, buffer = buffers
        torch.mm(x_t, coder.W_enc, out=P)
        bias = coder.bias_for()
        latents, scaled, persisted = coder.encode_variants(
            P, [(1.0, bias), (rho, bias), (alpha, persistence_bias)], buffer)
        a.raw.add(x_t, coder.decode(latents), x_sums=sums_t)
        a.raw.add_firing(*latents.firing(d_sae))
        total, squares = latents.sums(d_sae)
        a.scaled.add(x_t, coder.decode(scaled) / rho, x_sums=sums_t)
        a.scaled.add_firing(*scaled.firing(d_sae))
        a.persistence.add(x_s, coder.decode(persisted), x_sums=sums_s)
    else:
        lat, recon = coder.reconstruct(x_t)
        a.raw.add(x_t, recon, lat)
        lat_s, recon_s = coder.reconstruct(rho * x_t)
        a.scaled.add(x_t, recon_s / rho, lat_s)
        a.persistence.add(x_s, coder.reconstruct(alpha * x_t + shift)[1])
        total, squares = lat.sum(0, dtype=torch.float64), lat.square().sum(0, dtype=torch.float64)
    a.latent_sum += total.cpu()
    a.latent_sq_sum += squares.cpu()


def _assemble(acc, persist, persistence_name, n, centered_gram, raw_gram, n_tokens, options, saes) -> dict[str, np.ndarray]:
    """Every metric of `_PairAccumulators`; `persist[s, t]`: the persistence of the pair (s -> t) through
    a dictionary, reported as `persistence_name`; the grams are those of the sites compared with."""
    from scipy.stats import spearmanr

    from layerflow.matching import decoder_top1_cosine

    names = ["transfer_recon_ratio", "transfer_recon_ratio_inverse", "feature_variance_ratio", "top_k_spearman",
             "decoder_similarity", "explained_variance_raw", "explained_variance", "relative_transfer_raw",
             "relative_transfer", "delta_fvu", "persistence_ev_identity", "persistence_ev_scalar",
             persistence_name, "relative_persistence", "transfer_beyond_persistence",
             "l0", "dead_fraction", "l2_ratio"]
    m = {name: np.full((n, n), np.nan) for name in names}
    raw = {k: v.raw.compute() for k, v in acc.items()}
    scaled = {k: v.scaled.compute() for k, v in acc.items()}
    variances = {k: (v.latent_sq_sum / n_tokens - (v.latent_sum / n_tokens) ** 2).clamp(min=0) for k, v in acc.items()}
    top = {s: variances[s, s].topk(min(options.top_k, len(variances[s, s]))).indices for s in range(n)}
    decoders = [sae.W_dec.detach().float() for sae in saes]
    for (s, t) in acc:
        own = scaled[t, t].explained_variance
        m["transfer_recon_ratio"][s, t] = raw[s, s].mse / raw[s, t].mse
        m["transfer_recon_ratio_inverse"][s, t] = raw[s, t].mse / raw[s, s].mse
        var_s, var_t = variances[s, s][top[s]], variances[s, t][top[s]]
        m["feature_variance_ratio"][s, t] = (var_t.mean() / var_s.mean()).item()
        m["top_k_spearman"][s, t] = spearmanr(var_s.numpy(), var_t.numpy()).statistic if var_t.std() > 0 else np.nan
        m["decoder_similarity"][s, t] = decoder_top1_cosine(decoders[s][top[s]], decoders[t]).mean().item()
        m["explained_variance_raw"][s, t] = raw[s, t].explained_variance
        m["explained_variance"][s, t] = scaled[s, t].explained_variance
        m["relative_transfer_raw"][s, t] = raw[s, t].explained_variance / own
        m["relative_transfer"][s, t] = scaled[s, t].explained_variance / own
        m["delta_fvu"][s, t] = scaled[s, t].fvu - scaled[t, t].fvu
        var_t_total = centered_gram[t, t].item()
        m["persistence_ev_identity"][s, t] = 1 - (raw_gram[t, t] + raw_gram[s, s] - 2 * raw_gram[s, t]).item() / var_t_total
        m["persistence_ev_scalar"][s, t] = (centered_gram[s, t] ** 2 / (centered_gram[s, s] * centered_gram[t, t])).item()
        m[persistence_name][s, t] = persist[s, t].explained_variance
        m["relative_persistence"][s, t] = persist[s, t].explained_variance / own
        m["transfer_beyond_persistence"][s, t] = m["relative_transfer"][s, t] - m["relative_persistence"][s, t]
        m["l0"][s, t] = scaled[s, t].l0
        m["dead_fraction"][s, t] = scaled[s, t].dead_fraction
        m["l2_ratio"][s, t] = scaled[s, t].l2_ratio
    return m


def _feature_matching(metrics, extras, saes, xs, hooks, coders, options, report) -> None:
    """Decoder top-1 cosines for every pair; Hungarian matchings for pairs within `match_distance`."""
    from layerflow.matching import decoder_top1_cosine, match_activations, match_decoders

    n = len(hooks)
    decoders = [saes[h].W_dec.detach().float() for h in hooks]
    for name in ("decoder_top1_cosine_mean", "decoder_top1_cosine_median", "decoder_matched_fraction",
                 "activation_matched_fraction"):
        metrics[name] = np.full((n, n), np.nan)
    for s in range(n):
        for t in range(n):
            top1 = decoder_top1_cosine(decoders[s], decoders[t])
            metrics["decoder_top1_cosine_mean"][s, t] = top1.mean().item()
            metrics["decoder_top1_cosine_median"][s, t] = top1.median().item()
    # One-to-one matchings are symmetric, so each unordered pair is matched once and mirrored.
    latents = {}
    matched = {}
    for s in range(n):
        for t in range(s + 1, min(n, s + options.match_distance + 1)):
            for i in (s, t):
                if i not in latents:
                    latents[i] = dense_latents(coders[i], xs[i], options.batch_tokens)
            dec = match_decoders(decoders[s], decoders[t], options.null_quantile, options.seed)
            act = match_activations(latents[s], latents[t], options.null_quantile, options.seed)
            for i, j in ((s, t), (t, s)):
                metrics["decoder_matched_fraction"][i, j] = dec.fraction_significant
                metrics["activation_matched_fraction"][i, j] = act.fraction_significant
            matched[hooks[s], hooks[t]] = {"decoder": dec, "activation": act}
        latents.pop(s, None)
        report(s + 1)
    extras["matched_features"] = matched


def dense_latents(coder, x: torch.Tensor, batch_tokens: int) -> torch.Tensor:
    chunks = []
    for chunk in x.split(batch_tokens):
        if isinstance(coder, LinearCoder):
            buffer = torch.empty(len(chunk), coder.W_enc.shape[1], device=chunk.device)
            chunks.append(coder.encode(chunk @ coder.W_enc, 1.0, coder.bias_for(), buffer).dense(coder.W_enc.shape[1]))
        else:
            chunks.append(coder.reconstruct(chunk)[0])
    return torch.cat(chunks)


# ---------------------------------------------------------------- runs and files


def sites_of_store(store: "ActivationStore", hooks: list[str]) -> list[Site]:
    """The captured sites of `hooks`, in the store's site order (by layer, then site kind)."""
    order = {s.hook_name: i for i, s in enumerate(store.manifest.sites)}
    return sorted((s for s in store.manifest.sites if s.hook_name in hooks), key=lambda s: (s.layer, order[s.hook_name]))


def transfer_run(
    run: str | Path,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    options: TransferOptions = TransferOptions(),
    hooks: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loaded: Any = None,  # a LoadedModel, for options.spliced (else loaded from the store's manifest)
) -> tuple[TransferMatrix, list[Path]]:
    """The within-model matrix of every SAE under `run` (a training run, or any folder of SAELens
    SAE folders with `store`), on the store's held-out tokens; written to `out_dir`
    (default `<run>/transfer`). Returns the matrix and the files written (manifest last).

    A folder of transcoders (`is_transcoder`) gets `transcoder_matrix` instead: the store must hold
    each transcoder's input and output hooks. A folder mixing SAEs and transcoders is an error."""
    from layerflow.capture.store import ActivationStore
    from layerflow.dictionaries.io import load_saes

    run = Path(run)
    saes = load_saes(run, hooks)
    transcoders = _folder_of_transcoders(saes, run)
    if transcoders and options.spliced:
        raise LayerflowError("--spliced is not available for transcoders yet: it splices SAEs at their own site.")
    activation_store = ActivationStore(store or run_store(run))
    needed = {h: [h, output_hook(sae)] if transcoders else [h] for h, sae in saes.items()}
    unknown = [f"{' -> '.join(hs)}" for hs in needed.values() if any(h not in activation_store.hook_names for h in hs)]
    if unknown:
        raise LayerflowError(f"{'Transcoders' if transcoders else 'SAEs'} for {', '.join(unknown)} have no activations "
                             f"in the capture at '{activation_store.root}' "
                             f"(captured: {', '.join(activation_store.hook_names)}).")
    sites = sites_of_store(activation_store, list(saes))
    activations = activation_store.heldout(list(dict.fromkeys(h for s in sites for h in needed[s.hook_name])),
                                           options.max_tokens, options.exclude_special_tokens)
    compute = transcoder_matrix if transcoders else within_model_matrix
    matrix = compute(saes, activations, sites, options, progress)
    if options.spliced:
        from layerflow.models.load import load_model

        loaded = loaded or load_model(activation_store.manifest.model["name"])
        _add_spliced(matrix, saes, activation_store, loaded, options)
    matrix.settings["store"] = str(activation_store.root.resolve())
    matrix.settings["saes"] = str(run.resolve())
    return matrix, write_transfer(matrix, Path(out_dir) if out_dir else run / TRANSFER_DIR)


def _folder_of_transcoders(saes: dict[str, "SAE"], folder: Path) -> bool:
    """True when every dictionary is a transcoder, False when none is; a mix is an error."""
    kinds = {h: is_transcoder(sae) for h, sae in saes.items()}
    if len(set(kinds.values())) > 1:
        tcs = [h for h, k in kinds.items() if k]
        plain = [h for h, k in kinds.items() if not k]
        raise LayerflowError(f"'{folder}' mixes transcoders ({', '.join(tcs)}) and SAEs ({', '.join(plain)}): a "
                             "transfer matrix compares one kind. Put them in separate folders, or pass --hooks.")
    return any(kinds.values())


class _ScaleMatched:
    """SAE_i read at site j in scale-matched units: encode(x rho), decode(.) / rho."""

    def __init__(self, sae: "SAE", rho: float):
        self.sae, self.rho, self.device, self.dtype = sae, rho, sae.device, sae.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x * self.rho)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(latents) / self.rho


def _add_spliced(matrix: TransferMatrix, saes: dict, store: "ActivationStore", loaded: Any, options: TransferOptions) -> None:
    """spliced_delta_ce / spliced_kl: one spliced pass per source SAE, covering every target site."""
    from layerflow.evaluate.splice import splice_start, spliced_metrics

    if loaded.name != store.manifest.model["name"]:
        raise LayerflowError(f"The capture at '{store.root}' is of model '{store.manifest.model['name']}', "
                             f"but the loaded model is '{loaded.name}'.")
    tokens = store.tokens("heldout")
    specials = store.manifest.special_token_ids if options.exclude_special_tokens else []
    norms = matrix.settings["mean_activation_norm"]
    starts = {t.hook_name: splice_start(t.layer, t.kind) for t in matrix.targets}
    delta_ce = np.full((len(matrix.sources), len(matrix.targets)), np.nan)
    kl = delta_ce.copy()
    for i, source in enumerate(matrix.sources):
        placed = {t.hook_name: _ScaleMatched(saes[source.hook_name], norms[source.hook_name] / norms[t.hook_name])
                  for t in matrix.targets}
        results = spliced_metrics(placed, loaded.model, tokens, starts, specials)
        for j, target in enumerate(matrix.targets):
            delta_ce[i, j], kl[i, j] = results[target.hook_name]["delta_ce"], results[target.hook_name]["kl_div"]
    matrix.metrics["spliced_delta_ce"], matrix.metrics["spliced_kl"] = delta_ce, kl


def write_transfer(matrix: TransferMatrix, folder: Path) -> list[Path]:
    """transfer_matrix.json/csv, matched_features.json (when matched), summary.json."""
    from layerflow.summary import summarize

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    matched = matrix.extras.get("matched_features")
    if matched:
        path = folder / MATCHED_FILE
        atomic_write_text(path, json.dumps([
            {"source": s, "target": t, **{kind: m.to_dict() for kind, m in result.items()}}
            for (s, t), result in matched.items()]))
        written.append(path)
    summaries = {}
    layers = [s.layer for s in matrix.sources]
    if len(set(layers)) == len(layers) and len(layers) >= 2:  # one site per layer: layer-indexed summaries
        for metric in SUMMARY_METRICS:
            if metric in matrix.metrics:
                summaries[metric] = summarize(matrix[metric], layers, matrix.sources[0].n_layers, metric).to_dict()
    if summaries:
        path = write_json(folder / SUMMARY_FILE, {"schema_version": 1, "summaries": summaries}, indent=1)
        written.append(path)
    written.extend(matrix.write(folder)[::-1])  # the matrix JSON is the manifest: written last
    return written


# The metrics summarised by default: the notes' ratio (for continuity) and the scale-aware ones.
SUMMARY_METRICS = ("transfer_recon_ratio", "relative_transfer", "explained_variance", "transfer_beyond_persistence")
