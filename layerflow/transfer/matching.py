"""Feature-level agreement between two sparse dictionaries (SAEs A and B).

Definitions (rows of a dictionary are its latents' decoder directions):

- Top-1 decoder cosine: for each row of A, the largest signed cosine with any row of B.
- Decoder matching: the one-to-one assignment of A's rows to B's rows that maximises the total
  cosine (Hungarian; with fa != fb only min(fa, fb) rows are matched). Null model: the same
  matching against B's rows rotated at random, which keeps B's geometry (norms, mutual angles)
  but destroys any alignment with A. The rotation should stay inside the data's principal
  subspace (`Calibration.rotation`): real decoders live there, and against a rotation of the
  whole space (the fallback) chance cosines are far smaller than chance within the subspace,
  so the null threshold is too easy to beat.
- Activation matching: the same assignment on the Pearson correlation between A's and B's latents
  over shared tokens, among live latents only (non-zero variance on those tokens). Null model:
  the same matching with B's tokens shifted by whole sequences (circularly, by about half the
  tokens, to a sequence boundary when `sequences` is given): every latent keeps its marginal
  distribution and its dependence within a sequence, and only co-occurrence is broken. (A
  permutation of single tokens also breaks the dependence within a sequence, which makes chance
  correlations look smaller than they are.)
- A matched pair is significant when its similarity exceeds both the `null_quantile` quantile of
  the null's matched similarities (one seeded null draw) and an absolute floor (`min_similarity`;
  by default a decoder cosine of 0.7 and an activation correlation of 0.5, in `defaults`). The
  floor matters most for activations: latents of any two dictionaries read from the same tokens
  are linear functions of related inputs, so weak correlations beat a shuffled null easily (a
  dictionary rotated inside the data's subspace, which shares no feature, "matches" every latent
  at p < 0.01 in a planted test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from layerflow import defaults
from layerflow.transfer.calibration import haar_orthogonal

KINDS = ("decoder", "activation")


@dataclass(frozen=True, eq=False)
class FeatureMatching:
    kind: str  # "decoder" or "activation"
    source_index: np.ndarray  # int64 [n_matched], rows of A, ascending
    target_index: np.ndarray  # int64 [n_matched], partner row of B
    similarity: np.ndarray  # float64 [n_matched], cosine or Pearson correlation of each pair
    null_threshold: float  # the null's `null_quantile` quantile of matched similarities
    significant: np.ndarray  # bool [n_matched], similarity > max(null_threshold, min_similarity)
    min_similarity: float = -1.0  # the absolute floor a match must also beat

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        for name, dtype in [("source_index", np.int64), ("target_index", np.int64),
                            ("similarity", np.float64), ("significant", np.bool_)]:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype).reshape(-1))
        object.__setattr__(self, "null_threshold", float(self.null_threshold))
        n = len(self.source_index)
        if not all(len(a) == n for a in (self.target_index, self.similarity, self.significant)):
            raise ValueError("source_index, target_index, similarity and significant must have the same length")

    @property
    def fraction_significant(self) -> float:
        """Fraction of matched (live) source latents whose match beats the null; NaN if none matched."""
        return float(self.significant.mean()) if len(self.significant) else math.nan

    @property
    def mean_similarity(self) -> float:
        return float(self.similarity.mean()) if len(self.similarity) else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as lists, a NaN threshold as null."""
        return {
            "kind": self.kind,
            "source_index": self.source_index.tolist(),
            "target_index": self.target_index.tolist(),
            "similarity": self.similarity.tolist(),
            "null_threshold": None if math.isnan(self.null_threshold) else self.null_threshold,
            "significant": self.significant.tolist(),
            "min_similarity": self.min_similarity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureMatching:
        threshold = d["null_threshold"]
        return cls(d["kind"], np.array(d["source_index"]), np.array(d["target_index"]),
                   np.array(d["similarity"]), math.nan if threshold is None else threshold,
                   np.array(d["significant"]), d.get("min_similarity", -1.0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureMatching):
            return NotImplemented
        same_threshold = self.null_threshold == other.null_threshold or (
            math.isnan(self.null_threshold) and math.isnan(other.null_threshold))
        return (self.kind == other.kind and same_threshold and self.min_similarity == other.min_similarity
                and all(np.array_equal(getattr(self, f), getattr(other, f))
                        for f in ("source_index", "target_index", "similarity", "significant")))


# ---- decoder directions ----

@torch.no_grad()
def decoder_top1_cosine(
    dec_a: Float[Tensor, "fa d"], dec_b: Float[Tensor, "fb d"], chunk: int = 4096
) -> Float[Tensor, " fa"]:
    """For each row of A, the largest cosine with any row of B (signed; rows are normalised inside).

    Float32, chunked over A's rows: no [fa, fb] block larger than chunk x fb is ever held.
    """
    a = F.normalize(torch.as_tensor(dec_a).float(), dim=-1)
    b = F.normalize(torch.as_tensor(dec_b).float(), dim=-1).to(a.device)
    return torch.cat([(a[i:i + chunk] @ b.T).max(dim=1).values for i in range(0, len(a), chunk)])


@torch.no_grad()
def match_decoders(
    dec_a: Float[Tensor, "fa d"], dec_b: Float[Tensor, "fb d"], null_quantile: float = 0.99, seed: int = 0,
    rotation: Float[Tensor, "d d"] | None = None, min_cosine: float = defaults.MIN_DECODER_COSINE,
) -> FeatureMatching:
    """One-to-one matching maximising total decoder cosine. Null: B's rows rotated by `rotation`
    (give one inside the data's principal subspace: `Calibration.rotation`), else by a seeded
    rotation of the whole space. A match must beat the null's quantile and `min_cosine`."""
    a = F.normalize(torch.as_tensor(dec_a).float(), dim=-1)
    b = F.normalize(torch.as_tensor(dec_b).float(), dim=-1).to(a.device)
    rows, cols, sim = _hungarian((a @ b.T).double().cpu().numpy())
    if rotation is None:
        rotation = haar_orthogonal(a.shape[1], seed).float()
    *_, null_sim = _hungarian((a @ (b @ rotation.to(a.device).T).T).double().cpu().numpy())
    return _result("decoder", rows, cols, sim, null_sim, null_quantile, min_cosine)


# ---- activations ----

class ActivationCorrelation:
    """Streaming Pearson correlation between every latent of A and every latent of B over shared tokens.

    `add(lat_a, lat_b)` chunk by chunk (same tokens, same order in both), then `compute()`.
    Float64 sums of n, a, b, a^2, b^2 and a^T b. Latents with zero variance on the tokens seen
    (dead) get correlation 0 with everything.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift_a: Tensor | None = None
        self._shift_b: Tensor | None = None

    @torch.no_grad()
    def add(self, lat_a: Float[Tensor, "t fa"], lat_b: Float[Tensor, "t fb"]) -> None:
        a = torch.as_tensor(lat_a).double()
        b = torch.as_tensor(lat_b).double().to(a.device)
        if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
            raise ValueError(f"expected [tokens, fa] and [tokens, fb] on the same tokens, got {tuple(a.shape)} and {tuple(b.shape)}")
        if self._shift_a is None:
            # Sums are taken around the first chunk's means, so that latents with a large mean
            # relative to their spread do not lose their variance to cancellation.
            self._shift_a, self._shift_b = a.mean(0), b.mean(0)
            fa, fb = a.shape[1], b.shape[1]
            self._sa, self._sa2 = a.new_zeros(fa), a.new_zeros(fa)
            self._sb, self._sb2 = a.new_zeros(fb), a.new_zeros(fb)
            self._sab = a.new_zeros(fa, fb)
        elif (a.shape[1], b.shape[1]) != (len(self._sa), len(self._sb)):
            raise ValueError(f"latent counts changed between chunks: {(len(self._sa), len(self._sb))} -> {(a.shape[1], b.shape[1])}")
        a, b = a - self._shift_a, b - self._shift_b
        self.n += len(a)
        self._sa += a.sum(0)
        self._sb += b.sum(0)
        self._sa2 += (a * a).sum(0)
        self._sb2 += (b * b).sum(0)
        self._sab += a.T @ b

    def _variances(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mean_a, mean_b = self._sa / self.n, self._sb / self.n
        var_a = (self._sa2 / self.n - mean_a**2).clamp_min(0)
        var_b = (self._sb2 / self.n - mean_b**2).clamp_min(0)
        return mean_a, mean_b, var_a, var_b

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks [fa], [fb]: latents with non-zero variance on the tokens seen."""
        if self.n == 0:
            raise ValueError("no tokens added")
        _, _, var_a, var_b = self._variances()
        # A constant latent can leave a rounding-level variance; call it zero relative to its scale.
        scale_a = self._shift_a**2 + self._sa2 / self.n
        scale_b = self._shift_b**2 + self._sb2 / self.n
        return (var_a > 1e-12 * scale_a).cpu().numpy(), (var_b > 1e-12 * scale_b).cpu().numpy()

    def compute(self) -> Float[np.ndarray, "fa fb"]:
        """[fa, fb] float64 Pearson correlation; 0 wherever either latent is dead."""
        live_a, live_b = (torch.from_numpy(m).to(self._sab.device) for m in self.live())
        mean_a, mean_b, var_a, var_b = self._variances()
        cov = self._sab / self.n - torch.outer(mean_a, mean_b)
        std_a = torch.where(live_a, var_a.sqrt(), torch.inf)
        std_b = torch.where(live_b, var_b.sqrt(), torch.inf)
        return (cov / std_a[:, None] / std_b[None, :]).clamp_(-1, 1).cpu().numpy()


@torch.no_grad()
def match_activations(
    lat_a: Float[Tensor, "t fa"],
    lat_b: Float[Tensor, "t fb"],
    null_quantile: float = 0.99,
    seed: int = 0,
    chunk: int = 8192,
    sequences: Int[Tensor, " t"] | None = None,
    min_correlation: float = defaults.MIN_ACTIVATION_CORRELATION,
) -> FeatureMatching:
    """One-to-one matching maximising total activation correlation among live latents.

    Indices refer to the original rows. Null: the same matching with B's tokens shifted by whole
    sequences (`null_shift`; `sequences` gives each token's sequence, tokens of a sequence
    consecutive). A match must beat the null's quantile and `min_correlation`. Tokens are streamed
    `chunk` at a time into float64 sums.
    """
    lat_a, lat_b = torch.as_tensor(lat_a), torch.as_tensor(lat_b)
    if len(lat_a) != len(lat_b):
        raise ValueError(f"lat_a and lat_b must cover the same tokens: {len(lat_a)} != {len(lat_b)}")
    shifted = torch.roll(torch.arange(len(lat_b)), -null_shift(len(lat_b), sequences, seed)).to(lat_b.device)
    real, null = ActivationCorrelation(), ActivationCorrelation()
    for i in range(0, len(lat_a), chunk):
        real.add(lat_a[i:i + chunk], lat_b[i:i + chunk])
        null.add(lat_a[i:i + chunk], lat_b[shifted[i:i + chunk]])
    live_a, live_b = (np.flatnonzero(m) for m in real.live())
    rows, cols, sim = _hungarian(real.compute()[np.ix_(live_a, live_b)])
    *_, null_sim = _hungarian(null.compute()[np.ix_(live_a, live_b)])
    return _result("activation", live_a[rows], live_b[cols], sim, null_sim, null_quantile, min_correlation)


@torch.no_grad()
def resampled_fraction(matching: FeatureMatching, lat_a: Float[Tensor, "t fa"], lat_b: Float[Tensor, "t fb"],
                       groups: Int[Tensor, " t"], weights: Float[Tensor, "replicates groups"]) -> Float[Tensor, " replicates"]:
    """An activation matching's `fraction_significant` under each row of `weights` (how many times
    each group of tokens is drawn), with the matching and its thresholds held fixed: each matched
    pair's correlation is recomputed on the resampled tokens (`resampled_correlations`). Re-running
    the matching per resample would cost a Hungarian assignment each; this interval covers the
    token sampling of the correlations, not the choice of partners."""
    if matching.kind != "activation":
        raise ValueError(f"only an activation matching depends on the tokens, not a {matching.kind} matching")
    rows, cols = torch.from_numpy(matching.source_index), torch.from_numpy(matching.target_index)
    correlation = resampled_correlations(lat_a[:, rows.to(lat_a.device)], lat_b[:, cols.to(lat_b.device)], groups,
                                         weights)
    return (correlation > max(matching.null_threshold, matching.min_similarity)).double().mean(1)


@torch.no_grad()
def resampled_correlations(a: Float[Tensor, "t m"], b: Float[Tensor, "t m"], groups: Int[Tensor, " t"],
                           weights: Float[Tensor, "replicates groups"], chunk: int = 8192) -> Float[Tensor, "replicates m"]:
    """The Pearson correlation of each column of a with the same column of b under each row of
    `weights` (how many times each group of rows is drawn), around the means of all the rows (as
    `ReconstructionStats.bootstrap` keeps its centre). A row of ones gives the plain correlations."""
    mean_a, mean_b = a.double().mean(0).cpu(), b.double().mean(0).cpu()
    sums = torch.zeros(3, weights.shape[1], a.shape[1], dtype=torch.float64)  # (a a, b b, a b) around the means
    for i in range(0, len(a), chunk):
        x, y, g = a[i:i + chunk].double().cpu() - mean_a, b[i:i + chunk].double().cpu() - mean_b, groups[i:i + chunk].cpu()
        for k, v in enumerate((x * x, y * y, x * y)):
            sums[k].index_add_(0, g, v)
    aa, bb, ab = (weights.double() @ part for part in sums)
    return ab / (aa * bb).sqrt().clamp(min=1e-300)


def null_shift(n_tokens: int, sequences: Int[Tensor, " t"] | None, seed: int) -> int:
    """A seeded shift between a quarter and three quarters of the tokens, moved to the start of a
    sequence when `sequences` is given (token t of A is then paired with token t + shift of B)."""
    g = torch.Generator().manual_seed(seed)
    shift = n_tokens // 4 + int(torch.randint(max(1, n_tokens // 2), (1,), generator=g))
    if sequences is None or n_tokens < 2:
        return shift % max(n_tokens, 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (sequences.diff() != 0).nonzero().squeeze(1) + 1])
    inner = starts[starts > 0]
    if not len(inner):  # one sequence: no whole-sequence shift exists
        return shift % n_tokens
    return int(inner[(inner - shift).abs().argmin()])


# ---- shared ----

def _hungarian(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (ascending), their partner columns, and the pair similarities of the max-total assignment."""
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64), sim[rows, cols].astype(np.float64)


def _result(kind: str, rows: np.ndarray, cols: np.ndarray, sim: np.ndarray, null_sim: np.ndarray,
            null_quantile: float, min_similarity: float = -1.0) -> FeatureMatching:
    threshold = float(np.quantile(null_sim, null_quantile)) if len(null_sim) else math.nan
    return FeatureMatching(kind, rows, cols, sim, threshold, (sim > threshold) & (sim > min_similarity), min_similarity)
