"""Reconstruction metrics, defined once: training evals, transfer and reports all use these.

FVU = E||x - x_hat||^2 / E||x - E[x]||^2, a ratio of averages over the whole eval set (not an
average of per-batch ratios), with the variance taken around the mean. SAELens before the fix
for its issue #659 took it around zero, which flatters every SAE on activations with a large
mean; the pinned 6.54.x agrees with this definition (tests cross-check its
`ExplainedVarianceCalculator`).

Sums are accumulated in float64 on the CPU: the variance is a difference of two large, nearly
equal numbers when activations have a large mean component.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Float

DENSE_THRESHOLD = 0.10  # a latent firing on more than 10% of tokens counts as dense
SMALL_NORM = 1e-4  # inputs with a smaller norm are left out of the l2 ratio (as SAELens does)


@dataclass(frozen=True)
class ReconstructionMetrics:
    n_tokens: int
    fvu: float  # fraction of variance unexplained
    explained_variance: float  # 1 - fvu
    mse: float  # E||x - x_hat||^2 (summed over dimensions, averaged over tokens)
    variance: float  # E||x - E[x]||^2
    l0: float | None  # mean active latents per token
    dead_fraction: float | None  # latents that never fired on the eval set
    dense_fraction: float | None  # latents firing on > DENSE_THRESHOLD of tokens
    l2_ratio: float  # mean over tokens of ||x_hat|| / ||x||
    relative_reconstruction_bias: float  # E||x_hat||^2 / E<x, x_hat> (1 = no shrinkage; arXiv:2404.16014 eq. 10)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputSums:
    """The parts of `ReconstructionStats.add` that depend on x alone; with `groups` (each token's
    group, e.g. its sequence, in [0, n_groups)), also per group, for `ReconstructionStats.bootstrap`."""

    sum_x: torch.Tensor  # [d] float64, on the CPU
    sum_sq_norm: float
    norm: torch.Tensor  # [tokens] ||x|| per token
    groups: torch.Tensor | None = None  # [tokens] int64, on x's device
    group_sum_x: torch.Tensor | None = None  # [groups, d] float64, on the CPU
    group_sq_norm: torch.Tensor | None = None  # [groups] float64
    group_n: torch.Tensor | None = None  # [groups] float64

    @classmethod
    def of(cls, x: Float[torch.Tensor, "tokens d"], groups: torch.Tensor | None = None, n_groups: int = 0) -> "InputSums":
        sums = cls(x.sum(0, dtype=torch.float64).cpu(), x.double().square().sum().item(), x.norm(dim=-1))
        if groups is None:
            return sums
        groups = groups.to(x.device)
        f64 = torch.float64
        group_sum_x = torch.zeros(n_groups, x.shape[1], dtype=f64, device=x.device).index_add_(0, groups, x.double())
        sq = torch.linalg.vector_norm(x, dim=-1, dtype=f64).square()
        return cls(sums.sum_x, sums.sum_sq_norm, sums.norm, groups, group_sum_x.cpu(),
                   torch.bincount(groups, sq, n_groups).cpu(), torch.bincount(groups, minlength=n_groups).double().cpu())


class ReconstructionStats:
    """Streaming accumulator: add batches of (x, x_hat[, latents]); `compute()` at the end."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq_norm = 0.0
        self.sum_sq_residual = 0.0
        self.sum_sq_norm_hat = 0.0
        self.sum_dot = 0.0
        self.sum_l2_ratio = 0.0
        self.n_l2_ratio = 0
        self.n_full = 0  # tokens added with every sum (not error_only)
        self.groups: dict[str, torch.Tensor] | None = None  # per-group sums, when the inputs come with groups
        self.fire_counts: torch.Tensor | None = None
        self.sum_l0 = 0.0

    def add(
        self,
        x: Float[torch.Tensor, "tokens d"],
        x_hat: Float[torch.Tensor, "tokens d"],
        latents: Float[torch.Tensor, "tokens d_sae"] | None = None,
        x_sums: "InputSums | None" = None,
        error_only: bool = False,
    ) -> None:
        """Add a batch. `x_sums` (= `InputSums.of(x)`) saves recomputing the sums of x alone
        when the same x is compared with many reconstructions. With `error_only` only what FVU
        needs is summed (l2_ratio and relative_reconstruction_bias come out NaN): the transfer
        pair loop's cheaper figures."""
        if x.shape != x_hat.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}")
        # Every sum accumulates in float64. E||x||^2 is squared in float64 too: the variance is
        # E||x||^2 - ||E x||^2, a difference of two large numbers when the mean is large. The
        # per-token reductions read float32 inputs and accumulate in float64 (no float64 copy
        # of the batch, which would cost more than the rest of the evaluation).
        f64 = torch.float64
        x_sums = x_sums or InputSums.of(x)
        residual_norm = torch.linalg.vector_norm(x - x_hat, dim=-1, dtype=f64)
        self.sum_x = x_sums.sum_x if self.sum_x is None else self.sum_x + x_sums.sum_x
        self.sum_sq_norm += x_sums.sum_sq_norm
        self.sum_sq_residual += residual_norm.square().sum().item()
        self.n += x.shape[0]
        new_groups = {}
        if x_sums.groups is not None:
            new_groups["residual"] = torch.bincount(x_sums.groups, residual_norm.square(), len(x_sums.group_n)).cpu()
        if not error_only:
            hat_norm = torch.linalg.vector_norm(x_hat, dim=-1, dtype=f64)
            self.sum_sq_norm_hat += hat_norm.square().sum().item()
            self.sum_dot += (x * x_hat).sum(-1, dtype=f64).sum().item()
            ok = x_sums.norm >= SMALL_NORM
            ratio = hat_norm[ok] / x_sums.norm[ok]
            self.sum_l2_ratio += ratio.sum(dtype=f64).item()
            self.n_l2_ratio += int(ok.sum())
            self.n_full += x.shape[0]
            if x_sums.groups is not None:
                n_groups = len(x_sums.group_n)
                new_groups["l2_sum"] = torch.bincount(x_sums.groups[ok], ratio, n_groups).cpu()
                new_groups["l2_n"] = torch.bincount(x_sums.groups[ok], minlength=n_groups).double().cpu()
        if x_sums.groups is not None:
            self._add_groups({"sum_x": x_sums.group_sum_x, "sq_norm": x_sums.group_sq_norm, "n": x_sums.group_n,
                              **new_groups})
        if latents is not None:
            active = latents != 0
            by_group = None if x_sums.groups is None else torch.bincount(
                x_sums.groups, active.sum(1).double(), len(x_sums.group_n))
            self.add_firing(active.sum(0), int(active.sum()), by_group)

    def _add_groups(self, new: dict[str, torch.Tensor]) -> None:
        old = self.groups or {}
        self.groups = {**old, **{k: v + old[k] if k in old else v for k, v in new.items()}}

    def resample(self, weights: Float[torch.Tensor, "replicates groups"]) -> dict[str, torch.Tensor]:
        """Every figure the per-group sums allow, under each row of `weights` (how many times each
        group is drawn): explained_variance and mse always; l2_ratio when the batches were added
        with every sum; l0 when latents were given. Each a [replicates] float64 tensor.

        Not dead_fraction: a latent never seen firing stays dead in every resample, and a resample
        holds about 63% of the groups, so resampled dead fractions only rise; the bootstrap cannot
        speak for events the sample never saw."""
        if self.groups is None:
            raise ValueError("No per-group sums: add batches with InputSums.of(x, groups, n_groups).")
        g, w = self.groups, weights.double()
        n = w @ g["n"]
        out = {"explained_variance": self.bootstrap(weights), "mse": self.bootstrap_mse(weights)}
        if "l2_sum" in g:
            out["l2_ratio"] = (w @ g["l2_sum"]) / (w @ g["l2_n"])
        if "active" in g:
            out["l0"] = (w @ g["active"]) / n
        return out

    def bootstrap(self, weights: Float[torch.Tensor, "replicates groups"]) -> Float[torch.Tensor, " replicates"]:
        """Explained variance under each row of `weights` (how many times each group is drawn): the
        reweighted squared error over the reweighted squared deviation from the mean of all the tokens.
        Needs grouped inputs.

        The centre stays the full sample's mean. Re-centring each resample on its own mean would
        leave out of the denominator the resample's mean shift, which the error (against predictions
        whose mean is fixed) keeps: every resample would then fall below the figure, by about
        ||mean shift||^2 / variance, and a figure near 0 would lie above its own interval."""
        if self.groups is None:
            raise ValueError("No per-group sums: add batches with InputSums.of(x, groups, n_groups).")
        g, w = self.groups, weights.double()
        n = w @ g["n"]
        center = self.sum_x / self.n
        deviation = ((w @ g["sq_norm"]) - 2 * (w @ g["sum_x"]) @ center) / n + center.square().sum()
        return 1 - (w @ g["residual"]) / n / deviation

    def bootstrap_mse(self, weights: Float[torch.Tensor, "replicates groups"]) -> Float[torch.Tensor, " replicates"]:
        """E||x - x_hat||^2 under each row of `weights`, as `bootstrap` reweights the explained variance."""
        if self.groups is None:
            raise ValueError("No per-group sums: add batches with InputSums.of(x, groups, n_groups).")
        w = weights.double()
        return (w @ self.groups["residual"]) / (w @ self.groups["n"])

    def add_firing(self, counts: Float[torch.Tensor, " d_sae"], n_active: int,
                   by_group: Float[torch.Tensor, " groups"] | None = None) -> None:
        """Latent firing for the batch last added, when the caller has it sparse: how many tokens
        each latent fired on, the number of (token, latent) activations in all, and (for `resample`)
        that number per group."""
        self.sum_l0 += n_active
        counts = counts.cpu()
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        if by_group is not None:
            self._add_groups({"active": by_group.double().cpu()})

    def compute(self) -> ReconstructionMetrics:
        if self.n == 0:
            raise ValueError("No tokens were added.")
        mean = self.sum_x / self.n
        variance = self.sum_sq_norm / self.n - mean.pow(2).sum().item()
        mse = self.sum_sq_residual / self.n
        fvu = mse / variance if variance > 0 else float("nan")
        has_latents = self.fire_counts is not None
        return ReconstructionMetrics(
            n_tokens=self.n,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            mse=mse,
            variance=variance,
            l0=self.sum_l0 / self.n if has_latents else None,
            dead_fraction=(self.fire_counts == 0).double().mean().item() if has_latents else None,
            dense_fraction=(self.fire_counts > DENSE_THRESHOLD * self.n).double().mean().item() if has_latents else None,
            l2_ratio=self.sum_l2_ratio / max(self.n_l2_ratio, 1) if self.n_full else float("nan"),
            relative_reconstruction_bias=self.sum_sq_norm_hat / self.sum_dot if self.sum_dot and self.n_full else float("nan"),
        )


def reconstruction_metrics(
    x: Float[torch.Tensor, "tokens d"],
    x_hat: Float[torch.Tensor, "tokens d"],
    latents: Float[torch.Tensor, "tokens d_sae"] | None = None,
) -> ReconstructionMetrics:
    """All metrics for one in-memory eval set."""
    stats = ReconstructionStats()
    stats.add(x, x_hat, latents)
    return stats.compute()


def variance_concentration(x: Float[torch.Tensor, "tokens d"], fraction: float = 0.01) -> float:
    """The share of E||x - E[x]||^2 carried by the `fraction` of tokens farthest from the mean.

    About `fraction` when the variance is spread evenly. Far above it when a few tokens have
    activations far larger than the rest (attention sinks: in SmolLM2 from layer 11 on, a token near
    the start of a sequence can reach 80 times the median norm): FVU, a ratio of sums of squares,
    then measures mostly those tokens."""
    deviation = (x.double() - x.double().mean(0)).square().sum(-1)
    top = deviation.topk(max(1, int(fraction * len(deviation)))).values
    return (top.sum() / deviation.sum()).item()


def batch_variance(x: Float[torch.Tensor, "tokens d"]) -> torch.Tensor:
    """E||x - mean(x)||^2 over one batch, in the batch's dtype: the denominator of the per-step FVU
    in training curves (held-out FVU sums over the whole eval set: `ReconstructionStats`)."""
    return (x - x.mean(0)).square().sum(-1).mean()


def bootstrap_weights(n_groups: int, replicates: int, seed: int) -> Float[torch.Tensor, "replicates groups"]:
    """How many times each of `n_groups` groups (sequences, documents) is drawn in each resample: the
    `weights` of `ReconstructionStats.bootstrap`. The same seed gives the same draws, so every figure
    resampled with them moves together."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_groups, (replicates, n_groups), generator=g)
    return torch.zeros(replicates, n_groups, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(draws.shape, dtype=torch.float64))


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The `level` percentile interval of resampled figures (resamples along axis 0); NaN where any is NaN."""
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high


def median_centred(replicates: np.ndarray, figure: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Resamples shifted, entry by entry (axis 0 resamples), so that their median is the figure itself.

    For figures that count values above a threshold (matched fractions) or rank them: such a figure
    is not smooth in the data, and resampling smooths it, so its resamples sit to one side of it
    (in the default study every activation-matched fraction's resamples fell below it, and a tenth of
    the figures lay outside their own percentile intervals). The shift removes that median bias and
    keeps the spread (Efron's bias-corrected percentile interval makes the same correction); `bounds`
    clips the shifted resamples to the figure's range."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN entries stay NaN
        shifted = replicates - (np.nanmedian(replicates, axis=0) - figure)
    return shifted if bounds is None else np.clip(shifted, *bounds)


def group_ids(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Consecutive runs of equal labels (a token's sequence, a word's document) numbered 0..G-1, and G."""
    if not len(labels):
        return torch.zeros(0, dtype=torch.long), 0
    groups = torch.cat([torch.zeros(1, dtype=torch.long), (labels.diff() != 0).long().cumsum(0)])
    return groups, int(groups[-1]) + 1
