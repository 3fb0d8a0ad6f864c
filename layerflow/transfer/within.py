"""The within-model transfer matrix: the dictionary trained at site i applied to the held-out
activations of site j, for every ordered pair, in one pair loop for SAEs and transcoders.

For every ordered pair (i, j) of sites, on the same held-out tokens (special tokens left out),
this computes every field of `matrix.WithinModelPair`:
- the notes' metrics (raw loss ratio both ways, feature-variance ratio, top-k Spearman, decoder
  similarity), kept for continuity;
- explained variance at the target with the target's own mean (`metrics.ReconstructionStats`),
  "raw" and "scale-matched": x_j times rho = E||x_i|| / E||x_j|| before encoding, the
  reconstruction divided by rho, so SAE_i sees inputs of the size it was trained on;
- a persistence baseline: layer i's activations as a prediction of layer j (identity, and the
  best scalar map mean_j + a (x_i - mean_i)), and that prediction passed through SAE_j, so
  that transfer and persistence are compared like with like (docs/transfer.md);
- L0, dead fraction and l2 ratio of SAE_i on j; decoder and activation matching (`matching.py`).

Transcoders (`transcoder_matrix`; `runs.transfer_run` detects a folder of them): T_i reads layer
j's input site and is scored on layer j's output site y_j. The pair loop is the same; the scale
matching has an input and an output factor, and persistence compares the output sites
(docs/transfer.md, "Transcoders"): the scalar map y_i -> y_j applied to T_i's own prediction.

Speed. Each source's encoder matmul P = x_j W_enc is shared by its encodings of a pair: raw
(P + c), scale-matched (rho P + c) and, for SAEs, persistence through SAE_i of the pair (j -> i)
(a P + c'), because each is an affine function of x_j (`coder.LinearCoder`; the C kernel of
`fused_encode` selects them together on a CPU). Decoding touches only active latents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from scipy.stats import spearmanr

from layerflow import defaults
from layerflow.dictionaries.kinds import is_transcoder, output_hook
from layerflow.errors import LayerflowError
from layerflow.metrics import InputSums, ReconstructionStats
from layerflow.models.sites import Site
from layerflow.transfer.coder import Coder, LinearCoder, dense_latents, make_coder, predict_batch, with_skip
from layerflow.transfer.matching import decoder_top1_cosine, match_activations, match_decoders
from layerflow.transfer.matrix import TransferMatrix


@dataclass(frozen=True)
class TransferOptions:
    max_tokens: int | None = defaults.TRANSFER_TOKENS  # held-out tokens per site (None: all)
    batch_tokens: int = 2048  # tokens per encoder matmul ([2048, d_sae] buffers stay cache-friendlier than 4096)
    top_k: int = defaults.TOP_K  # latents used by the notes' variance ratio, Spearman and decoder similarity
    match_distance: int = defaults.MATCH_DISTANCE  # Hungarian matching for pairs at most this many sites apart (0 = none)
    null_quantile: float = 0.99
    exclude_special_tokens: bool = True
    spliced: bool = False  # also splice SAE_i (scale-matched) into the model at site j: delta CE and KL
    device: str = defaults.DEVICE  # where the pair kernel runs ("cuda" for large matrices); sums stay float64 on the CPU
    seed: int = defaults.SEED


@dataclass
class _PairAccumulators:
    raw: ReconstructionStats
    scaled: ReconstructionStats
    persistence: ReconstructionStats  # SAEs: of the pair (target -> source), through the source's SAE
    latent_sum: torch.Tensor  # raw mode, per latent, for the notes' variance ratio
    latent_sq_sum: torch.Tensor

    @classmethod
    def empty(cls, d_sae: int) -> "_PairAccumulators":
        return cls(ReconstructionStats(), ReconstructionStats(), ReconstructionStats(),
                   torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64))


@torch.no_grad()
def within_model_matrix(
    saes: dict[str, SAE],
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
    _checked_outputs(saes, activations, hooks, transcoders=False)
    metrics, extras, norms, _ = _pair_matrix(saes, activations, hooks, hooks, options, progress, transcoders=False)
    settings = {"n_tokens": activations[hooks[0]].shape[0], **asdict(options),
                "scale_matching": "x_j * E||x_i|| / E||x_j|| before SAE_i, reconstruction / the same factor",
                "mean_activation_norm": dict(zip(hooks, norms))}
    return TransferMatrix("within_model", sites, sites, metrics, settings, extras)


@torch.no_grad()
def transcoder_matrix(
    transcoders: dict[str, SAE],
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
    out_hooks = _checked_outputs(transcoders, activations, in_hooks, transcoders=True)
    metrics, extras, in_norms, out_norms = _pair_matrix(transcoders, activations, in_hooks, out_hooks, options,
                                                        progress, transcoders=True)
    settings = {"n_tokens": activations[in_hooks[0]].shape[0], **asdict(options), "coder": "transcoder",
                "hook_name_out": dict(zip(in_hooks, out_hooks)),
                "scale_matching": "x_in_j * E||x_in_i|| / E||x_in_j|| before T_i, prediction / (E||y_i|| / E||y_j||)",
                "persistence": "output sites: y_i -> y_j (identity, best scalar map), and that map applied to T_i(x_in_i)",
                "mean_activation_norm": dict(zip(in_hooks, in_norms)),
                "mean_output_norm": dict(zip(out_hooks, out_norms))}
    return TransferMatrix("within_model", sites, sites, metrics, settings, extras)


class _Carry(NamedTuple):
    """SAEs' persistence input for a pair (source s, target t): x_t carried to site s by the scalar
    map, alpha x_t + shift, and the encoder bias of that shift."""

    alpha: float
    shift: torch.Tensor
    bias: torch.Tensor | None  # LinearCoder only


def _pair_matrix(dictionaries: dict[str, SAE], activations: dict[str, torch.Tensor], in_hooks: list[str],
                 out_hooks: list[str], options: TransferOptions, progress: Callable[[int, int], None] | None,
                 transcoders: bool) -> tuple[dict[str, np.ndarray], dict[str, Any], list[float], list[float]]:
    """The pair loop: each source dictionary (reading `in_hooks[s]`) on each target site, scored
    against `out_hooks[t]` (for an SAE, the same site). Returns (metrics, extras, mean input norms,
    mean output norms)."""
    bt, n = options.batch_tokens, len(in_hooks)
    xs = [activations[h].to(options.device, torch.float32) for h in in_hooks]
    ys = xs if not transcoders else [activations[h].to(options.device, torch.float32) for h in out_hooks]
    n_tokens = xs[0].shape[0]
    in_norms = [x.norm(dim=-1).double().mean().item() for x in xs]
    out_norms = in_norms if not transcoders else [y.norm(dim=-1).double().mean().item() for y in ys]
    y_means = [y.double().mean(0) for y in ys]
    centered_gram, raw_gram = _grams(ys, y_means)
    coders = [make_coder(dictionaries[h], options.device) for h in in_hooks]
    y_sums = [[InputSums.of(chunk) for chunk in y.split(bt)] for y in ys]
    acc: dict[tuple[int, int], _PairAccumulators] = {}
    total = n * n + (n if options.match_distance else 0)
    report = progress or (lambda done, total: None)
    for s, coder in enumerate(coders):
        d_sae = dictionaries[in_hooks[s]].cfg.d_sae
        buffers = tuple(torch.empty(2, min(bt, n_tokens), d_sae, device=options.device))  # P, pre-activations
        own = [predict_batch(coder, x, buffers) for x in xs[s].split(bt)] if transcoders else []  # T_s on its layer
        for t in range(n):
            pair = _PairAccumulators.empty(d_sae)
            rho_in, rho_out = in_norms[s] / in_norms[t], out_norms[s] / out_norms[t]
            if transcoders:  # the scalar map y_s -> y_t, applied to T_s's own prediction
                a, shift = _scalar_map(centered_gram, y_means, s, t)
                carry = None
            else:  # the scalar map x_t -> x_s, through SAE_s; its bias once per pair
                a, shift = _scalar_map(centered_gram, y_means, t, s)
                carry = _Carry(a, shift, coder.bias_for(shift) if isinstance(coder, LinearCoder) else None)
            for c, (x_t, y_t, y_s) in enumerate(zip(xs[t].split(bt), ys[t].split(bt), ys[s].split(bt))):
                _accumulate(coder, x_t, y_t, rho_in, rho_out, pair, buffers, y_sums[t][c],
                            carry and (carry, y_s, y_sums[s][c]))
                if transcoders:
                    pair.persistence.add(y_t, torch.add(shift, own[c], alpha=a), x_sums=y_sums[t][c])
            acc[s, t] = pair
            report(s * n + t + 1, total)

    # an SAE pair's persistence is that of the pair (t -> s): key it by its own (source, target)
    persist = {((s, t) if transcoders else (t, s)): v.persistence.compute() for (s, t), v in acc.items()}
    name = "persistence_ev_through_source_transcoder" if transcoders else "persistence_ev_through_target_sae"
    metrics = _assemble(acc, persist, name, n, centered_gram, raw_gram, n_tokens, options,
                        [dictionaries[h] for h in in_hooks])
    extras: dict[str, Any] = {}
    if options.match_distance:
        _feature_matching(metrics, extras, dictionaries, xs, in_hooks, coders, options,
                          lambda i: report(n * n + i, total))
    return metrics, extras, in_norms, out_norms


def _scalar_map(centered_gram: torch.Tensor, means: list[torch.Tensor], i: int, j: int) -> tuple[float, torch.Tensor]:
    """(a, shift) of the least-squares scalar map site i -> site j: mean_j + a (x_i - mean_i) = a x_i + shift."""
    a = (centered_gram[i, j] / centered_gram[i, i]).item() if centered_gram[i, i] > 0 else 0.0
    return a, (means[j] - a * means[i]).float()


def _accumulate(coder: Coder, x_t: torch.Tensor, y_t: torch.Tensor, rho_in: float, rho_out: float,
                pair: _PairAccumulators, buffers: tuple[torch.Tensor, torch.Tensor], y_sums: InputSums,
                carried: tuple[_Carry, torch.Tensor, InputSums] | None) -> None:
    """The source on one batch of the target, against y_t: raw and scale-matched, and for SAEs the
    carried persistence input against y_s (`carried`: (carry, y_s, its sums)), from one encoder matmul."""
    d_sae = len(pair.latent_sum)
    if isinstance(coder, LinearCoder):
        P, buffer = buffers[0][:len(x_t)], buffers[1][:len(x_t)]
        torch.mm(x_t, coder.W_enc, out=P)
        bias, skip = coder.bias_for(), coder.skip(x_t)
        variants = [(1.0, bias), (rho_in, bias)] + ([(carried[0].alpha, carried[0].bias)] if carried else [])
        latents, scaled, *persisted = coder.encode_variants(P, variants, buffer)
        pair.raw.add(y_t, with_skip(coder.decode(latents), skip, 1.0), x_sums=y_sums)
        pair.raw.add_firing(*latents.firing(d_sae))
        total, squares = latents.sums(d_sae)
        pair.scaled.add(y_t, with_skip(coder.decode(scaled), skip, rho_in) / rho_out, x_sums=y_sums)
        pair.scaled.add_firing(*scaled.firing(d_sae))
        if carried:
            carry, y_s, y_s_sums = carried
            pair.persistence.add(y_s, coder.decode(persisted[0]), x_sums=y_s_sums)
    else:
        lat, prediction = coder.reconstruct(x_t)
        pair.raw.add(y_t, prediction, lat)
        lat_s, prediction_s = coder.reconstruct(rho_in * x_t)
        pair.scaled.add(y_t, prediction_s / rho_out, lat_s)
        if carried:
            carry, y_s, _ = carried
            pair.persistence.add(y_s, coder.reconstruct(carry.alpha * x_t + carry.shift)[1])
        total, squares = lat.sum(0, dtype=torch.float64), lat.square().sum(0, dtype=torch.float64)
    pair.latent_sum += total.cpu()
    pair.latent_sq_sum += squares.cpu()


def _checked_outputs(dictionaries: dict[str, SAE], activations: dict[str, torch.Tensor], in_hooks: list[str],
                     transcoders: bool) -> list[str]:
    """The hook each site's dictionary is scored on (an SAE's own site, a transcoder's output
    hook), once every site has its dictionary, of the right kind, and activations of the right
    widths on the same tokens."""
    noun = "transcoder" if transcoders else "SAE"
    if not in_hooks:
        raise LayerflowError("No sites to compare.")
    for h in in_hooks:
        if h not in dictionaries:
            raise LayerflowError(f"No {noun} for site '{h}'. {noun.capitalize()}s given for: "
                                 f"{', '.join(dictionaries) or 'none'}.")
        if is_transcoder(dictionaries[h]) != transcoders:
            other = "transcoder_matrix" if not transcoders else "within_model_matrix"
            raise LayerflowError(f"The dictionary for '{h}' is {'a transcoder' if not transcoders else 'an SAE'}: use "
                                 f"{other} (transfer_run picks it).")
    out_hooks = [output_hook(dictionaries[h], h) for h in in_hooks] if transcoders else in_hooks
    for h, out in zip(in_hooks, out_hooks):
        cfg = dictionaries[h].cfg
        for hook, width, what in ((h, cfg.d_in, "d_in"), (out, getattr(cfg, "d_out", cfg.d_in), "d_out")):
            if hook not in activations:
                raise LayerflowError(f"No held-out activations for '{hook}' (the {noun} of '{h}' "
                                     f"{'reads' if hook == h else 'predicts'} it). Available: "
                                     f"{', '.join(activations) or 'none'}.")
            if activations[hook].shape[-1] != width:
                raise LayerflowError(f"The {noun} for '{h}' has {what} {width}, but the activations of '{hook}' "
                                     f"have width {activations[hook].shape[-1]}.")
    lengths = {hook: activations[hook].shape[0] for hook in dict.fromkeys(in_hooks + out_hooks)}
    if len(set(lengths.values())) != 1:
        raise LayerflowError(f"Sites must share the same tokens, but the token counts differ: {lengths}.")
    if not next(iter(lengths.values())):
        raise LayerflowError("No held-out tokens to compare on.")
    return out_hooks


def _grams(xs: list[torch.Tensor], means: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] sums over tokens of <x_i - mean_i, x_j - mean_j> and of <x_i, x_j>, in float64."""
    n, T = len(xs), xs[0].shape[0]
    flat = torch.stack([x.double().reshape(-1) for x in xs])  # [n, T*d]
    raw = flat @ flat.T
    mean_flat = torch.stack(means)  # [n, d]
    centered = raw - T * (mean_flat @ mean_flat.T)
    return centered, raw


def _assemble(acc, persist, persistence_name, n, centered_gram, raw_gram, n_tokens, options, saes) -> dict[str, np.ndarray]:
    """Every metric of `_PairAccumulators`; `persist[s, t]`: the persistence of the pair (s -> t) through
    a dictionary, reported as `persistence_name`; the grams are those of the sites compared with."""
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
