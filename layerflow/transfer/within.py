"""The within-model transfer matrix: the dictionary trained at site i applied to the held-out
activations of site j, for every ordered pair, in one pair loop for SAEs and transcoders.

For every ordered pair (i, j) of sites, on the same held-out tokens (special tokens left out),
this computes every field of `matrix.WithinModelPair`:
- explained variance at the target with the target's own mean (`metrics.ReconstructionStats`),
  three ways: raw; mean and spread matched, the primary figure (`calibration`: x_j is read in
  site i's units, its mean and spread fit on the train split, and the output mapped back); and
  scale-only (x_j times E||x_i|| / E||x_j||, the figure before the mean was matched, kept for
  continuity). relative_transfer = matched EV / EV of SAE_j on j;
- a like-for-like persistence baseline: dictionary i on its own site i, carried to j by the
  least-squares scalar map fit on the train split. Both sides go through the same dictionary
  and the same statistics and differ only in the input (layer j read in i's units, or layer i
  itself), so a layer that is a copy of another (plus a constant) gives 0 beyond persistence
  whichever dictionary is better trained; plus two dictionary-free figures (identity, scalar map);
- the notes' metrics (raw loss ratio both ways, feature-variance ratio, top-k Spearman, decoder
  similarity), kept for continuity;
- L0, dead fraction and l2 ratio of SAE_i on j (matched); decoder and activation matching.

Transcoders (`transcoder_matrix`; `runs.transfer_run` detects a folder of them): T_i reads layer
j's input site and is scored on layer j's output site y_j. The pair loop is the same; the input
is matched with the input sites' statistics and the prediction mapped back with the output
sites', and persistence compares the output sites (T_i's own prediction, carried y_i -> y_j).

Speed. Each source's encoder matmul P = x_j W_enc is shared by its encodings of a pair: raw
(P + c), scale-only (rho P + c) and matched (alpha P + c'), because each is an affine function of
x_j (`coder.LinearCoder`; the C kernel of `fused_encode` selects them together on a CPU).
Decoding touches only active latents.
"""

from __future__ import annotations

import ctypes

from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from scipy.stats import rankdata, spearmanr

from layerflow import defaults
from layerflow.dictionaries.kinds import is_transcoder, output_hook
from layerflow.errors import LayerflowError
from layerflow.metrics import (InputSums, ReconstructionStats, bootstrap_weights, group_ids, median_centred,
                               percentile_interval)
from layerflow.models.sites import Site
from layerflow.transfer.calibration import Calibration, SiteMatch
from layerflow.transfer.coder import Coder, LinearCoder, dense_latents, make_coder, with_skip
from layerflow.transfer.matching import decoder_top1_cosine, match_activations, match_decoders, resampled_fraction
from layerflow.transfer.matrix import TransferMatrix


@dataclass(frozen=True)
class TransferOptions:
    max_tokens: int | None = defaults.TRANSFER_TOKENS  # held-out tokens per site (None: all)
    calibration_tokens: int | None = defaults.CALIBRATION_TOKENS  # train tokens for each site's mean and spread
    batch_tokens: int = 2048  # tokens per encoder matmul ([2048, d_sae] buffers stay cache-friendlier than 4096)
    top_k: int = defaults.TOP_K  # latents used by the notes' variance ratio, Spearman and decoder similarity
    match_distance: int = defaults.MATCH_DISTANCE  # Hungarian matching for pairs at most this many sites apart (0 = none)
    null_quantile: float = 0.99
    exclude_special_tokens: bool = True
    references: bool = True  # floors (and, given seed twins, ceilings) beside the matrix: `references.py`
    reference_sites: int = defaults.REFERENCE_SITES  # sites where matching floors are measured without twins
    bootstrap: int = defaults.BOOTSTRAP_REPLICATES  # resamples of whole sequences for the intervals (0: none)
    interval: float = defaults.INTERVAL_LEVEL
    spliced: bool = False  # also splice SAE_i (matched) into the model at site j: delta CE and KL
    device: str = defaults.DEVICE  # where the pair kernel runs ("cuda" for large matrices); sums stay float64 on the CPU
    seed: int = defaults.SEED


@dataclass
class _PairAccumulators:
    raw: ReconstructionStats
    scale_only: ReconstructionStats
    matched: ReconstructionStats  # the primary figure: mean and spread matched (`calibration`)
    persistence: ReconstructionStats  # the source dictionary on its own site, carried to the target
    latent_sum: torch.Tensor  # raw mode, per latent, for the notes' variance ratio
    latent_sq_sum: torch.Tensor
    latent_group_sums: list[torch.Tensor] | None = None  # the same per resampling group, [groups, d_sae] each
    replicates: dict[str, torch.Tensor] | None = None  # every resampled figure of the pair: `_resample_pair`

    @classmethod
    def empty(cls, d_sae: int, grouped: bool) -> "_PairAccumulators":
        return cls(ReconstructionStats(), ReconstructionStats(), ReconstructionStats(), ReconstructionStats(),
                   torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64),
                   [] if grouped else None)

    def latent_variances(self) -> torch.Tensor:
        """Each latent's variance over the tokens (raw mode): the notes' variance ratio."""
        n = self.raw.n
        return (self.latent_sq_sum / n - (self.latent_sum / n) ** 2).clamp(min=0)

    def top_latents(self, k: int) -> torch.Tensor:
        """The k latents of largest variance (on the source's own site, for the diagonal pair)."""
        variances = self.latent_variances()
        return variances.topk(min(k, len(variances))).indices


STATS = ("raw", "scale_only", "matched", "persistence")


@torch.no_grad()
def within_model_matrix(
    saes: dict[str, SAE],
    activations: dict[str, Float[torch.Tensor, "tokens d"]],
    sites: list[Site],
    calibration: Calibration,
    options: TransferOptions = TransferOptions(),
    progress: Callable[[int, int], None] | None = None,
    sequences: Int[torch.Tensor, " tokens"] | None = None,
) -> TransferMatrix:
    """Every ordered pair of `sites` (source SAE x target activations), all on the same tokens.

    `saes[hook]` reads raw activations of `hook`; `activations[hook]` are that site's held-out
    activations, row t of every site being the same token. `calibration` holds every site's
    train-split mean and spread (`Calibration.of` on train activations, never on these tokens;
    with covariances, feature matching's decoder null stays in each site's principal subspace).
    `sequences` (each held-out token's sequence) lets the activation null shift whole sequences.
    """
    hooks = [s.hook_name for s in sites]
    _checked_outputs(saes, activations, hooks, transcoders=False)
    metrics, extras, norms, _ = _pair_matrix(saes, activations, calibration, hooks, hooks, options, progress,
                                             transcoders=False, sequences=sequences)
    settings = {"n_tokens": activations[hooks[0]].shape[0], **asdict(options),
                "matching": MATCHING, "scale_only_matching": "x_j * E||x_i|| / E||x_j|| before SAE_i, "
                "reconstruction / the same factor", "persistence": PERSISTENCE,
                "calibration": calibration.summary(), **_null_settings(calibration, sequences),
                "mean_activation_norm": dict(zip(hooks, norms))}
    return TransferMatrix("within_model", sites, sites, metrics, {**settings, **_interval_settings(options, sequences, settings["n_tokens"])},
                          extras, intervals=extras.pop("intervals"), replicates=extras.pop("replicates"))


@torch.no_grad()
def transcoder_matrix(
    transcoders: dict[str, SAE],
    activations: dict[str, Float[torch.Tensor, "tokens d"]],
    sites: list[Site],
    calibration: Calibration,
    options: TransferOptions = TransferOptions(),
    progress: Callable[[int, int], None] | None = None,
    sequences: Int[torch.Tensor, " tokens"] | None = None,
) -> TransferMatrix:
    """Every ordered pair of `sites` (source transcoder T_i, target layer j), all on the same tokens:
    T_i reads layer j's input and its prediction is compared with layer j's output.

    `transcoders[hook]` reads `hook` (its input site; `sites` are the input sites) and predicts
    `output_hook(transcoder)`; `activations` holds the held-out activations of every input and output
    hook, row t of each being the same token, and `calibration` their train-split statistics. The
    match reads x_in_j in T_i's input units and maps the prediction back with the output sites'
    statistics; the scale-only figures multiply x_in_j by E||x_in_i|| / E||x_in_j|| and divide the
    prediction by E||y_i|| / E||y_j||. Persistence compares the output sites (docs/transfer.md).
    """
    in_hooks = [s.hook_name for s in sites]
    out_hooks = _checked_outputs(transcoders, activations, in_hooks, transcoders=True)
    metrics, extras, in_norms, out_norms = _pair_matrix(transcoders, activations, calibration, in_hooks, out_hooks,
                                                        options, progress, transcoders=True, sequences=sequences)
    settings = {"n_tokens": activations[in_hooks[0]].shape[0], **asdict(options), "coder": "transcoder",
                "hook_name_out": dict(zip(in_hooks, out_hooks)), "matching": MATCHING + " (input sites in, output "
                "sites back)", "scale_only_matching": "x_in_j * E||x_in_i|| / E||x_in_j|| before T_i, prediction / "
                "(E||y_i|| / E||y_j||)", "persistence": PERSISTENCE + " (output sites)",
                "calibration": calibration.summary(), **_null_settings(calibration, sequences),
                "mean_activation_norm": dict(zip(in_hooks, in_norms)),
                "mean_output_norm": dict(zip(out_hooks, out_norms))}
    return TransferMatrix("within_model", sites, sites, metrics, {**settings, **_interval_settings(options, sequences, settings["n_tokens"])},
                          extras, intervals=extras.pop("intervals"), replicates=extras.pop("replicates"))


MATCHING = "x_j -> (x_j - mu_j) s_i / s_j + mu_i before dictionary i, output -> (out - mu_i) s_j / s_i + mu_j; " \
           "mu, s = mean, sqrt(E||x - mu||^2) on the train split"
PERSISTENCE = "dictionary i on its own site i, carried to j: mu_j + a (D_i(x_i) - mu_i), a = least-squares slope " \
              "of x_j on x_i on the train split"


class _Match(NamedTuple):
    """How the source reads one target, in the pair loop: the site matches in and back, and for
    `LinearCoder`s the encoder bias of the shift and the skip term of the shift (skip transcoders)."""

    into: SiteMatch
    back: SiteMatch
    bias: torch.Tensor | None
    skip_shift: torch.Tensor | None


def _pair_matrix(dictionaries: dict[str, SAE], activations: dict[str, torch.Tensor], calibration: Calibration,
                 in_hooks: list[str], out_hooks: list[str], options: TransferOptions,
                 progress: Callable[[int, int], None] | None, transcoders: bool,
                 sequences: torch.Tensor | None) -> tuple[dict[str, np.ndarray], dict[str, Any], list[float], list[float]]:
    """The pair loop: each source dictionary (reading `in_hooks[s]`) on each target site, scored
    against `out_hooks[t]` (for an SAE, the same site). Returns (metrics, extras, mean input norms,
    mean output norms)."""
    bt, n, device = options.batch_tokens, len(in_hooks), options.device
    xs = [activations[h].to(device, torch.float32) for h in in_hooks]
    ys = xs if not transcoders else [activations[h].to(device, torch.float32) for h in out_hooks]
    n_tokens = xs[0].shape[0]
    in_norms = [x.norm(dim=-1).double().mean().item() for x in xs]
    out_norms = in_norms if not transcoders else [y.norm(dim=-1).double().mean().item() for y in ys]
    y_means = [y.double().mean(0) for y in ys]
    coders = [make_coder(dictionaries[h], device) for h in in_hooks]
    groups, n_groups = _groups(sequences, n_tokens)
    weights = bootstrap_weights(n_groups, options.bootstrap, options.seed) \
        if options.bootstrap and n_groups >= defaults.MIN_BOOTSTRAP_GROUPS else None
    grams = _grams(ys, y_means, groups.to(device), n_groups)
    y_sums = [[InputSums.of(chunk, g, n_groups) for chunk, g in zip(y.split(bt), groups.split(bt))] for y in ys]
    acc: dict[tuple[int, int], _PairAccumulators] = {}
    total = n * n + (n if options.match_distance else 0)
    report = progress or (lambda done, total: None)
    done = 0
    for s, coder in enumerate(coders):
        d_sae = dictionaries[in_hooks[s]].cfg.d_sae
        buffers = tuple(torch.empty(2, min(bt, n_tokens), d_sae, device=device))  # P, pre-activations
        own: list[torch.Tensor] = []  # the source's raw output on its own site: kept from the diagonal pair, first
        for t in [s, *(t for t in range(n) if t != s)]:
            pair = _PairAccumulators.empty(d_sae, grouped=weights is not None)
            rho_in, rho_out = in_norms[s] / in_norms[t], out_norms[s] / out_norms[t]
            match = _match(coder, calibration, in_hooks, out_hooks, s, t, device)
            a = calibration.slope(out_hooks[s], out_hooks[t])
            carried = (calibration.means[out_hooks[t]] - a * calibration.means[out_hooks[s]]).float().to(device)
            for c, (x_t, y_t) in enumerate(zip(xs[t].split(bt), ys[t].split(bt))):
                raw = _accumulate(coder, x_t, y_t, rho_in, rho_out, match, pair, buffers, y_sums[t][c])
                if t == s:
                    own.append(raw)
                pair.persistence.add(y_t, torch.add(carried, own[c], alpha=a), x_sums=y_sums[t][c], error_only=True)
            if weights is not None:
                _resample_pair(pair, weights, acc.get((s, s)), options.top_k)
            acc[s, t] = pair
            done += 1
            report(done, total)
        _release_freed_memory()

    metrics = _assemble(acc, n, grams, options, [dictionaries[h] for h in in_hooks])
    intervals, replicates = _bootstrap(acc, n, grams, weights, options, metrics)
    extras: dict[str, Any] = {"intervals": intervals, "replicates": replicates}
    if options.match_distance:
        _feature_matching(metrics, extras, dictionaries, xs, in_hooks, out_hooks, coders, calibration, sequences,
                          options, lambda i: report(n * n + i, total), groups, weights)
    return metrics, extras, in_norms, out_norms


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc only; elsewhere nothing happens).

    Each batch allocates and frees a few [batch_tokens, d] float32 buffers. Once one such buffer has
    been freed, glibc raises its mmap threshold above that size and serves the rest from its heaps,
    which the torch threads fragment: on the default run (30 sites) the process grew past 20 GiB
    and was killed on a 24 GiB machine, for about 2 GiB of live data. Trimming once per source
    keeps it at about 2 GiB and costs nothing measurable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _groups(sequences: torch.Tensor | None, n_tokens: int) -> tuple[torch.Tensor, int]:
    """Each held-out token's resampling group: its sequence (renumbered 0..G-1), else blocks of
    `defaults.BOOTSTRAP_BLOCK` consecutive tokens."""
    return group_ids(torch.arange(n_tokens) // defaults.BOOTSTRAP_BLOCK if sequences is None else sequences)


KEPT_REPLICATES = ("explained_variance", "relative_transfer", "relative_persistence", "transfer_beyond_persistence",
                   "activation_matched_fraction")  # the figures the report averages
# Figures without a resampling interval, and why (`settings["no_interval"]` of every matrix).
NO_INTERVAL = {
    "decoder_similarity": "decoder weights only (over the source's top latents of the full sample)",
    "decoder_top1_cosine_mean": "decoder weights only", "decoder_top1_cosine_median": "decoder weights only",
    "decoder_matched_fraction": "decoder weights only",
    "dead_fraction": "a count of latents never seen firing: they stay dead in every resample, which holds about "
                     "63% of the sequences, so resampled dead fractions only rise; it falls as tokens are added",
}
CONDITIONAL = {  # what each of these intervals holds fixed
    "activation_matched_fraction": "the matching's partners and thresholds; the matched correlations are resampled, "
                                   "and the resampled fractions are median-centred on the figure (a count above a "
                                   "threshold: metrics.median_centred)",
    "feature_variance_ratio": "the source's top latents of the full sample",
    "top_k_spearman": "the source's top latents of the full sample; resamples median-centred on the figure (ranks)",
}
NO_INTERVAL_NOTE = ("figures from decoder weights alone do not depend on the tokens; how they vary with the training "
                    "seed is what the seed-twin ceiling measures")


def _resample_pair(pair: _PairAccumulators, weights: torch.Tensor, diagonal: _PairAccumulators | None,
                   top_k: int) -> None:
    """Every resampled figure of one pair (`diagonal`: the source on its own site, None for that pair
    itself), kept on the pair as [replicates] tensors; its per-group sums are then dropped, since
    they are most of a pair's memory. The notes' variance figures keep the source's top latents of
    the full sample in every resample."""
    w, r = weights.double(), {}
    n_w = w @ pair.raw.groups["n"]
    for kind in STATS:
        stats = getattr(pair, kind)
        r.update({f"{kind}.{name}": v for name, v in stats.resample(weights).items()})
        stats.groups = None
    top = (pair if diagonal is None else diagonal).top_latents(top_k)
    sums, squares = (torch.stack([part[i] for part in pair.latent_group_sums]).sum(0)[:, top.cpu()] for i in (0, 1))
    mean = (w @ sums) / n_w[:, None]
    r["top_variance"] = ((w @ squares) / n_w[:, None] - mean ** 2).clamp(min=0)
    source = r["top_variance"] if diagonal is None else diagonal.replicates["top_variance"]
    r["feature_variance_ratio"] = r["top_variance"].mean(1) / source.mean(1)
    r["top_k_spearman"] = _spearman_rows(source, r["top_variance"])
    pair.latent_group_sums, pair.replicates = None, r


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of a with the same row of b (average ranks for ties,
    as scipy's `spearmanr`); NaN where b's row is constant."""
    ra, rb = (torch.from_numpy(rankdata(v.numpy(), axis=1)) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    return torch.where(b.std(1) > 0, rho, torch.nan)


def _bootstrap(acc: dict[tuple[int, int], _PairAccumulators], n: int, grams: "_Grams", weights: torch.Tensor | None,
               options: TransferOptions, metrics: dict[str, np.ndarray]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Bootstrap over whole sequences, every pair resampled with the same draws: the `options.interval`
    percentile interval of every figure that depends on the tokens (all but NO_INTERVAL and the
    feature matchings, which `_feature_matching` adds), and the resampled matrices [B, n, n] of
    KEPT_REPLICATES. Returns (intervals, replicates)."""
    if weights is None:
        return {}, {}
    raw, centered = grams.resampled(weights)
    replicates: dict[str, np.ndarray] = {}
    for (s, t), pair in acc.items():
        r = pair.replicates
        own = acc[t, t].replicates["matched.explained_variance"]
        mse = acc[s, s].replicates["raw.mse"], r["raw.mse"]
        relative = r["matched.explained_variance"] / own
        persistence = r["persistence.explained_variance"] / own
        samples = {
            "transfer_recon_ratio": mse[0] / mse[1], "transfer_recon_ratio_inverse": mse[1] / mse[0],
            "feature_variance_ratio": r["feature_variance_ratio"], "top_k_spearman": r["top_k_spearman"],
            "explained_variance_raw": r["raw.explained_variance"],
            "explained_variance_scale_only": r["scale_only.explained_variance"],
            "explained_variance": r["matched.explained_variance"],
            "relative_transfer_raw": r["raw.explained_variance"] / own,
            "relative_transfer_scale_only": r["scale_only.explained_variance"] / own, "relative_transfer": relative,
            "delta_fvu": own - r["matched.explained_variance"],
            "persistence_ev_identity": 1 - (raw[:, t, t] + raw[:, s, s] - 2 * raw[:, s, t]) / centered[:, t, t],
            "persistence_ev_scalar": centered[:, s, t] ** 2 / (centered[:, s, s] * centered[:, t, t]),
            "persistence_ev_through_source": r["persistence.explained_variance"],
            "relative_persistence": persistence, "transfer_beyond_persistence": relative - persistence,
            "l0": r["matched.l0"], "l2_ratio": r["matched.l2_ratio"]}
        for name, values in samples.items():
            replicates.setdefault(name, np.full((options.bootstrap, n, n), np.nan))[:, s, t] = values.numpy()
    replicates["top_k_spearman"] = median_centred(replicates["top_k_spearman"], metrics["top_k_spearman"])  # ranks
    intervals = {name: percentile_interval(r, options.interval) for name, r in replicates.items()}
    return intervals, {name: replicates[name] for name in KEPT_REPLICATES if name in replicates}


def _match(coder: Coder, calibration: Calibration, in_hooks: list[str], out_hooks: list[str], s: int, t: int,
           device: str) -> _Match:
    into = calibration.match(in_hooks[s], in_hooks[t]).to(device)
    back = into if in_hooks == out_hooks else calibration.match(out_hooks[s], out_hooks[t]).to(device)
    if not isinstance(coder, LinearCoder):
        return _Match(into, back, None, None)
    skip_shift = coder.skip(into.shift[None])
    return _Match(into, back, coder.bias_for(into.shift), None if skip_shift is None else skip_shift[0])


def _accumulate(coder: Coder, x_t: torch.Tensor, y_t: torch.Tensor, rho_in: float, rho_out: float, match: _Match,
                pair: _PairAccumulators, buffers: tuple[torch.Tensor, torch.Tensor], y_sums: InputSums) -> torch.Tensor:
    """The source on one batch of the target, against y_t: raw, scale-only and matched, from one
    encoder matmul. Returns the raw output."""
    d_sae = len(pair.latent_sum)
    grouped = pair.latent_group_sums is not None
    groups, n_groups = (y_sums.groups, len(y_sums.group_n)) if grouped else (None, 0)
    if isinstance(coder, LinearCoder):
        P, buffer = buffers[0][:len(x_t)], buffers[1][:len(x_t)]
        torch.mm(x_t, coder.W_enc, out=P)
        bias, skip = coder.bias_for(), coder.skip(x_t)
        variants = [(1.0, bias), (rho_in, bias), (match.into.alpha, match.bias)]
        latents, scaled, matched = coder.encode_variants(P, variants, buffer)
        raw = with_skip(coder.decode(latents), skip, 1.0)
        pair.raw.add(y_t, raw, x_sums=y_sums, error_only=True)
        if grouped:
            pair.latent_group_sums.append(latents.sums(d_sae, groups, n_groups))
        pair.scale_only.add(y_t, with_skip(coder.decode(scaled), skip, rho_in) / rho_out, x_sums=y_sums, error_only=True)
        prediction = with_skip(coder.decode(matched), skip, match.into.alpha)
        if match.skip_shift is not None:
            prediction += match.skip_shift
        pair.matched.add(y_t, match.back.to_target(prediction), x_sums=y_sums)
        pair.matched.add_firing(*matched.firing(d_sae, groups, n_groups))
    else:
        lat, raw = coder.reconstruct(x_t)
        pair.raw.add(y_t, raw, x_sums=y_sums, error_only=True)
        prediction_s = coder.reconstruct(rho_in * x_t)[1]
        pair.scale_only.add(y_t, prediction_s / rho_out, x_sums=y_sums, error_only=True)
        lat_m, prediction_m = coder.reconstruct(match.into.to_source(x_t))
        pair.matched.add(y_t, match.back.to_target(prediction_m), lat_m, x_sums=y_sums)
        if grouped:
            pair.latent_group_sums.append(tuple(torch.zeros(n_groups, d_sae, dtype=torch.float64, device=lat.device)
                                                .index_add_(0, groups, v.double()) for v in (lat, lat.square())))
    if grouped:
        total, squares = pair.latent_group_sums[-1][0].sum(0), pair.latent_group_sums[-1][1].sum(0)
    else:
        total, squares = latents.sums(d_sae) if isinstance(coder, LinearCoder) else \
            (lat.sum(0, dtype=torch.float64), lat.square().sum(0, dtype=torch.float64))
    pair.latent_sum += total.cpu()
    pair.latent_sq_sum += squares.cpu()
    if grouped:
        pair.latent_group_sums[-1] = tuple(v.cpu() for v in pair.latent_group_sums[-1])
    return raw


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


@dataclass
class _Grams:
    """Per resampling group g, sums over its tokens of <y_i, y_j> (`raw`) and of
    <y_i - mean_i, y_j - mean_j> (`centered`, around the means of all the tokens), [groups, n, n]
    float64: the dictionary-free persistence figures and their resamples."""

    raw: torch.Tensor
    centered: torch.Tensor

    def resampled(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, centered) summed under each row of `weights`: [replicates, n, n] each."""
        g, n = self.raw.shape[:2]
        w = weights.double()
        return tuple((w @ m.reshape(g, n * n)).reshape(-1, n, n) for m in (self.raw, self.centered))


def _grams(ys: list[torch.Tensor], means: list[torch.Tensor], groups: torch.Tensor, n_groups: int) -> _Grams:
    """The per-group grams of the sites `ys`; `groups` numbers consecutive runs of tokens."""
    n, d = len(ys), ys[0].shape[1]
    sizes = torch.bincount(groups, minlength=n_groups).cpu()
    raw = torch.zeros(n_groups, n, n, dtype=torch.float64)
    sums = torch.zeros(n_groups, n, d, dtype=torch.float64)
    start = 0
    for g, size in enumerate(sizes.tolist()):
        block = torch.stack([y[start:start + size].double() for y in ys])  # [n, size, d]
        flat = block.reshape(n, -1)
        raw[g], sums[g] = (flat @ flat.T).cpu(), block.sum(1).cpu()
        start += size
    mu = torch.stack(means).cpu()  # [n, d]
    cross = torch.einsum("sd,gtd->gst", mu, sums)  # mean_s . (sum of y_t over group g)
    centered = raw - cross - cross.transpose(1, 2) + sizes.double()[:, None, None] * (mu @ mu.T)
    return _Grams(raw, centered)


def _assemble(acc, n, grams: _Grams, options, saes) -> dict[str, np.ndarray]:
    """Every metric of `_PairAccumulators`; the grams are those of the sites compared with."""
    names = ["transfer_recon_ratio", "transfer_recon_ratio_inverse", "feature_variance_ratio", "top_k_spearman",
             "decoder_similarity", "explained_variance_raw", "explained_variance_scale_only", "explained_variance",
             "relative_transfer_raw", "relative_transfer_scale_only", "relative_transfer", "delta_fvu",
             "persistence_ev_identity", "persistence_ev_scalar", "persistence_ev_through_source",
             "relative_persistence", "transfer_beyond_persistence", "l0", "dead_fraction", "l2_ratio"]
    m = {name: np.full((n, n), np.nan) for name in names}
    raw = {k: v.raw.compute() for k, v in acc.items()}
    scaled = {k: v.scale_only.compute() for k, v in acc.items()}
    matched = {k: v.matched.compute() for k, v in acc.items()}
    persist = {k: v.persistence.compute() for k, v in acc.items()}
    variances = {k: v.latent_variances() for k, v in acc.items()}
    top = {s: acc[s, s].top_latents(options.top_k) for s in range(n)}
    decoders = [sae.W_dec.detach().float() for sae in saes]
    raw_gram, centered_gram = grams.raw.sum(0), grams.centered.sum(0)
    for (s, t) in acc:
        own = matched[t, t].explained_variance
        m["transfer_recon_ratio"][s, t] = raw[s, s].mse / raw[s, t].mse
        m["transfer_recon_ratio_inverse"][s, t] = raw[s, t].mse / raw[s, s].mse
        var_s, var_t = variances[s, s][top[s]], variances[s, t][top[s]]
        m["feature_variance_ratio"][s, t] = (var_t.mean() / var_s.mean()).item()
        m["top_k_spearman"][s, t] = spearmanr(var_s.numpy(), var_t.numpy()).statistic if var_t.std() > 0 else np.nan
        m["decoder_similarity"][s, t] = decoder_top1_cosine(decoders[s][top[s]], decoders[t]).mean().item()
        m["explained_variance_raw"][s, t] = raw[s, t].explained_variance
        m["explained_variance_scale_only"][s, t] = scaled[s, t].explained_variance
        m["explained_variance"][s, t] = matched[s, t].explained_variance
        m["relative_transfer_raw"][s, t] = raw[s, t].explained_variance / own
        m["relative_transfer_scale_only"][s, t] = scaled[s, t].explained_variance / own
        m["relative_transfer"][s, t] = matched[s, t].explained_variance / own
        m["delta_fvu"][s, t] = matched[s, t].fvu - matched[t, t].fvu
        var_t_total = centered_gram[t, t].item()
        m["persistence_ev_identity"][s, t] = 1 - (raw_gram[t, t] + raw_gram[s, s] - 2 * raw_gram[s, t]).item() / var_t_total
        m["persistence_ev_scalar"][s, t] = (centered_gram[s, t] ** 2 / (centered_gram[s, s] * centered_gram[t, t])).item()
        m["persistence_ev_through_source"][s, t] = persist[s, t].explained_variance
        m["relative_persistence"][s, t] = persist[s, t].explained_variance / own
        m["transfer_beyond_persistence"][s, t] = m["relative_transfer"][s, t] - m["relative_persistence"][s, t]
        m["l0"][s, t] = matched[s, t].l0
        m["dead_fraction"][s, t] = matched[s, t].dead_fraction
        m["l2_ratio"][s, t] = matched[s, t].l2_ratio
    return m


def _feature_matching(metrics, extras, saes, xs, in_hooks, out_hooks, coders, calibration, sequences, options,
                      report, groups, weights) -> None:
    """Decoder top-1 cosines for every pair; Hungarian matchings and Feature Flow's transition for pairs
    within `match_distance`. The decoder null rotates inside the principal subspace of the site the
    decoders write to when `calibration` has covariances, else the whole space. With `weights`,
    intervals for the two figures that depend on the tokens (the decoder figures do not)."""
    n = len(in_hooks)
    decoders = [saes[h].W_dec.detach().float() for h in in_hooks]
    for name in ("decoder_top1_cosine_mean", "decoder_top1_cosine_median", "decoder_matched_fraction",
                 "activation_matched_fraction", "feature_flow_ev"):
        metrics[name] = np.full((n, n), np.nan)
    resampled = {name: np.full((len(weights), n, n), np.nan) for name in ("activation_matched_fraction",
                                                                          "feature_flow_ev")} if weights is not None else {}
    for s in range(n):
        for t in range(n):
            top1 = decoder_top1_cosine(decoders[s], decoders[t])
            metrics["decoder_top1_cosine_mean"][s, t] = top1.mean().item()
            metrics["decoder_top1_cosine_median"][s, t] = top1.median().item()
    rotations = {}
    # One-to-one matchings are symmetric, so each unordered pair is matched once and mirrored.
    latents = {}
    matched = {}
    for s in range(n):
        for t in range(s + 1, min(n, s + options.match_distance + 1)):
            for i in (s, t):
                if i not in latents:
                    latents[i] = dense_latents(coders[i], xs[i], options.batch_tokens)
            if t not in rotations and calibration.covariances is not None:
                rotations[t] = calibration.rotation(out_hooks[t], options.seed + t)
            dec = match_decoders(decoders[s], decoders[t], options.null_quantile, options.seed, rotations.get(t))
            act = match_activations(latents[s], latents[t], options.null_quantile, options.seed, sequences=sequences)
            fractions = resampled_fraction(act, latents[s], latents[t], groups, weights) if weights is not None else None
            for i, j in ((s, t), (t, s)):
                metrics["decoder_matched_fraction"][i, j] = dec.fraction_significant
                metrics["activation_matched_fraction"][i, j] = act.fraction_significant
                if fractions is not None:
                    resampled["activation_matched_fraction"][:, i, j] = fractions.numpy()
                if in_hooks == out_hooks:  # SAEs: Feature Flow's transition (a transcoder's latents predict another site)
                    flow = feature_flow(latents[i], coders[i], coders[j], xs[j],
                                        calibration.spread(in_hooks[j]) / calibration.spread(in_hooks[i]),
                                        options.batch_tokens, groups if weights is not None else None)
                    metrics["feature_flow_ev"][i, j] = flow.compute().explained_variance
                    if weights is not None:
                        resampled["feature_flow_ev"][:, i, j] = flow.bootstrap(weights).numpy()
            matched[in_hooks[s], in_hooks[t]] = {"decoder": dec, "activation": act}
        latents.pop(s, None)
        report(s + 1)
    extras["matched_features"] = matched
    if resampled:  # a count above a threshold: its resamples are median-centred on it (`metrics.median_centred`)
        resampled["activation_matched_fraction"] = median_centred(resampled["activation_matched_fraction"],
                                                                  metrics["activation_matched_fraction"], (0, 1))
    extras["intervals"].update({name: percentile_interval(r, options.interval) for name, r in resampled.items()})
    extras["replicates"].update({name: r for name, r in resampled.items() if name in KEPT_REPLICATES})


def _interval_settings(options: TransferOptions, sequences: torch.Tensor | None, n_tokens: int) -> dict[str, Any]:
    groups = "held-out sequences" if sequences is not None else \
        f"blocks of {defaults.BOOTSTRAP_BLOCK} held-out tokens (no sequence boundaries given)"
    n_groups = _groups(sequences, n_tokens)[1]
    if not options.bootstrap:
        return {"intervals": "none (bootstrap off)"}
    if n_groups < defaults.MIN_BOOTSTRAP_GROUPS:
        return {"intervals": f"none: only {n_groups} {groups}, and resamples of fewer than "
                             f"{defaults.MIN_BOOTSTRAP_GROUPS} say little; use more held-out tokens"}
    return {"intervals": f"{options.interval:.0%} percentile bootstrap, {options.bootstrap} resamples of {n_groups} whole "
                         f"{groups}; the figures themselves use every token",
            "no_interval": {**NO_INTERVAL, "note": NO_INTERVAL_NOTE}, "conditional_intervals": CONDITIONAL}


def _null_settings(calibration: Calibration, sequences: torch.Tensor | None) -> dict[str, str]:
    """How the matchings' nulls were drawn, for a matrix's settings."""
    return {"decoder_null": "rotation inside the target site's principal subspace (90% of its train-split variance)"
            if calibration.covariances is not None else "rotation of the whole space",
            "activation_null": "tokens shifted by whole sequences" if sequences is not None
            else "tokens shifted circularly by about half (no sequence boundaries given)",
            "min_decoder_cosine": defaults.MIN_DECODER_COSINE}


def feature_flow(latents_i: torch.Tensor, coder_i: Coder, coder_j: Coder, x_j: torch.Tensor, spread_ratio: float,
                 batch_tokens: int, groups: torch.Tensor | None = None) -> ReconstructionStats:
    """Feature Flow's transition (Laptev et al. 2025, appendix): each latent of SAE_i is sent to its
    top-1 decoder-cosine partner in SAE_j, and decode_j(T encode_i(x_i)) is scored on x_j (its
    explained variance is `feature_flow_ev`; with `groups`, each token's resampling group, it can
    be resampled). A latent's contribution keeps its size in data units times s_j / s_i (the
    spread rule of the cross-site match): its value is multiplied by ||d_i|| s_j / (s_i ||d_partner||)."""
    dec_i, dec_j = _decoding_rows(coder_i), _decoding_rows(coder_j)
    norm_i, norm_j = dec_i.norm(dim=-1), dec_j.norm(dim=-1)
    a, b = dec_i / norm_i.clamp(min=1e-12)[:, None], dec_j / norm_j.clamp(min=1e-12)[:, None]
    partner = torch.cat([(a[k:k + 4096] @ b.T).argmax(1) for k in range(0, len(a), 4096)])
    weight = norm_i * spread_ratio / norm_j[partner].clamp(min=1e-12)
    n_groups = int(groups.max()) + 1 if groups is not None else 0
    chunks = groups.split(batch_tokens) if groups is not None else [None] * len(x_j.split(batch_tokens))
    stats = ReconstructionStats()
    for z, x, g in zip(latents_i.split(batch_tokens), x_j.split(batch_tokens), chunks):
        mapped = torch.zeros(len(z), len(dec_j), dtype=torch.float32, device=z.device)
        mapped.index_add_(1, partner.to(z.device), z.float() * weight.to(z.device))
        if isinstance(coder_j, LinearCoder):
            x_hat = mapped @ coder_j.W_dec + coder_j.b_dec
        else:
            x_hat = coder_j.sae.decode(mapped.to(coder_j.sae.dtype)).float()
        stats.add(x, x_hat, x_sums=InputSums.of(x, g, n_groups) if g is not None else None, error_only=True)
    return stats


def _decoding_rows(coder: Coder) -> torch.Tensor:
    """The rows a coder's latents multiply when it decodes (a TopK rescale's are unit norm)."""
    return coder.W_dec if isinstance(coder, LinearCoder) else coder.sae.W_dec.detach().float()
