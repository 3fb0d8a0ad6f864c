"""Cross-model transfer: does an SAE of model A explain model B's activations, through a linear stitch?

The words come from `align.capture_aligned`. Definitions:

- Affine stitch A -> B: x_B ~ (x_A - mean_A) W + mean_B, with W the ridge least-squares solution
  on centered train words, W = (Xc^T Xc + lam I)^-1 Xc^T Yc, lam = ridge * trace(Xc^T Xc) / d_A
  (ridge relative to the mean eigenvalue of the scatter matrix), solved in float64.
- EV: `layerflow.metrics.reconstruction_metrics(x, x_hat).explained_variance`, on held-out words.
  stitched EV: x_hat_B = map_AB(SAE_A.decode(SAE_A.encode(map_BA(x_B)))); stitch-only EV:
  x_hat_B = map_AB(map_BA(x_B)); target EV: x_hat_B = SAE_B.decode(SAE_B.encode(x_B)).
  relative_transfer = stitched / target EV (NaN when the target EV is not positive). The round
  trip alone explains some variance even between unrelated sites (it shrinks x_B along spurious
  train-set canonical directions, of order d / n_train); the SAE in the middle removes it.
- CKA: debiased linear CKA between the latent matrices Z_A = SAE_A.encode(x_A), Z_B = SAE_B.encode(x_B)
  on the same held-out words: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = Z_A Z_A^T and
  L = Z_B Z_B^T U-centered (`centered_gram`), HSIC(K, L) = sum(Kc * Lc), the unbiased estimator.
  The plain (double-centered) estimator is biased upward when latents outnumber words: independent
  sparse codes with 4096 latents on 2048 words give about 0.6, with 16,384 about 0.83.
  p-value: (1 + #{perm: CKA >= observed}) / (1 + n_perm), whole held-out documents of B permuted
  (`document_permutations`: each document contributes the same number of words, at most
  `cka_max_words` in all; the permutations are shared by every pair).
- Feature matching: Pearson correlation between every live latent of SAE_A (x_A) and every live
  latent of SAE_B (x_B) on train words (live: non-zero variance on train words;
  `layerflow.matching.ActivationCorrelation`), then the one-to-one assignment maximising total
  correlation (Hungarian). Each matched pair's held-out correlation is tested one-sided against
  `n_perm_features` permutations of B's held-out documents (shared by all pairs): p =
  (1 + #{perm: r >= observed}) / (1 + n_perm_features). A latent constant on the held-out words
  has held-out correlation 0 and p = 1. The permutations move whole held-out documents, as for CKA.
  Benjamini-Hochberg at `fdr` over the matched pairs; a significant pair must also reach a held-out
  correlation of 0.5 (`defaults.MIN_ACTIVATION_CORRELATION`, as within a model: the floor, an SAE
  against a rotated copy of itself, has most of its features "significantly" matched without it).
  fraction_features_with_partner = significant pairs / SAE_A's live latents;
  matched_feature_correlation_mean = mean held-out correlation over matched pairs.
  With P permutations no p-value is below 1/(P + 1), so BH at fdr q rejects nothing unless at
  least m / (q (P + 1)) of the m matched pairs are significant (about 20 m / P at 0.05): raise
  n_perm_features for large SAEs that share few features.
- Cost: per target site a [cka words]^2 float64 Gram matrix is kept (32 MB at 2048 words); train
  latents are streamed ENCODE_BATCH words at a time into ActivationCorrelation's float64
  [d_sae_A, d_sae_B] sums; the Hungarian step is cubic in the number of live latents.
- Paired SVCCA (Lan et al. 2024), for matched pairs: the significant pairs, less those whose
  features fire mostly on junk words (`align.AlignedActivations.junk`); SVCCA over their paired
  decoder rows (`svcca`); p-value against shuffles of the pairing. The number of singular
  directions kept is reported (Lan et al.'s public code keeps one by mistake).
- Same depth: each source is paired with the target of nearest relative depth
  (`Site.relative_depth`, ties to the shallower target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from layerflow import defaults
from layerflow.dictionaries.kinds import encode, predict
from layerflow.errors import LayerflowError
from layerflow.metrics import (InputSums, ReconstructionStats, bootstrap_weights, group_ids, median_centred,
                               percentile_interval)
from layerflow.models.sites import Site
from layerflow.transfer.align import AlignedActivations
from layerflow.transfer.calibration import Calibration
from layerflow.transfer.matching import ActivationCorrelation, resampled_correlations
from layerflow.transfer.matrix import TransferMatrix, metric_names
from layerflow.transfer.references import References
from layerflow.transfer.summary import BOUNDS

ENCODE_BATCH = 4096
MATCH_PAIRS = defaults.MATCH_PAIRS


# --- affine stitching ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineMap:
    """x_tgt ~ x_src @ weight + bias (float64)."""

    weight: Float[Tensor, "d_src d_tgt"]
    bias: Float[Tensor, " d_tgt"]

    def apply(self, x: Float[Tensor, "n d_src"]) -> Float[Tensor, "n d_tgt"]:
        """In float64, returned in x's dtype."""
        return (x.double() @ self.weight + self.bias).to(x.dtype)


def fit_affine(x_src: Float[Tensor, "n d_src"], x_tgt: Float[Tensor, "n d_tgt"], ridge: float = 1e-4) -> AffineMap:
    """Ridge least squares on centered data; the ridge is relative to the scatter matrix's mean eigenvalue."""
    if ridge < 0:
        raise LayerflowError(f"ridge must be >= 0, not {ridge}.")
    if len(x_src) != len(x_tgt):
        raise LayerflowError(f"x_src has {len(x_src)} rows but x_tgt has {len(x_tgt)}: they must be the same words.")
    x, y = x_src.double(), x_tgt.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    scatter = xc.T @ xc
    lam = ridge * torch.trace(scatter) / scatter.shape[0]
    try:
        weight = torch.linalg.solve(scatter + lam * torch.eye(len(scatter), dtype=torch.float64), xc.T @ yc)
    except torch.linalg.LinAlgError:
        raise LayerflowError(f"The source activations are rank-deficient ({len(x)} words, width {x.shape[1]}): "
                             f"use ridge > 0 (got {ridge}).") from None
    return AffineMap(weight, mean_y - mean_x @ weight)


def fit_stitch(aligned: AlignedActivations, hook_a: str, hook_b: str, ridge: float = 1e-4) -> tuple[AffineMap, AffineMap]:
    """(map A -> B, map B -> A) between two sites, fit on train words only."""
    train = ~aligned.heldout
    x_a, x_b = aligned.acts_a[hook_a][train], aligned.acts_b[hook_b][train]
    return fit_affine(x_a, x_b, ridge), fit_affine(x_b, x_a, ridge)


# --- per-pair metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchedFeatures:
    """SAE_A latents matched one-to-one to SAE_B latents on train words, tested on held-out words."""

    source_index: Int[np.ndarray, " matched"]
    target_index: Int[np.ndarray, " matched"]
    train_correlation: Float[np.ndarray, " matched"]
    heldout_correlation: Float[np.ndarray, " matched"]
    p_value: Float[np.ndarray, " matched"]
    significant: Bool[np.ndarray, " matched"]  # Benjamini-Hochberg at the matrix's fdr, and r >= MIN_ACTIVATION_CORRELATION
    n_live_source: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


@torch.no_grad()
def _encode(sae: Any, x: Tensor) -> Tensor:
    return torch.cat([encode(sae, chunk).float().cpu() for chunk in x.split(ENCODE_BATCH)])


@torch.no_grad()
def _reconstruct(sae: Any, x: Tensor) -> Tensor:
    return torch.cat([predict(sae, chunk).float().cpu() for chunk in x.split(ENCODE_BATCH)])


def _ev(x: Tensor, x_hat: Tensor, tests: "_Tests | None" = None) -> tuple[float, Tensor | None]:
    """EV of x_hat on x, and its value in each bootstrap resample of the held-out documents (`tests.weights`;
    None without)."""
    grouped = tests is not None and tests.weights is not None
    stats = ReconstructionStats()
    stats.add(x, x_hat, x_sums=InputSums.of(x, tests.groups, tests.weights.shape[1]) if grouped else None,
              error_only=True)
    return stats.compute().explained_variance, stats.bootstrap(tests.weights) if grouped else None


def centered_gram(z: Float[Tensor, "n f"], debiased: bool = True) -> Float[Tensor, "n n"]:
    """The linear kernel Z Z^T (float64), U-centered (diagonal 0; the unbiased HSIC estimator of
    Song et al. 2012, as in Kornblith et al.'s debiased CKA) or, with `debiased=False`,
    double-centered H Z Z^T H."""
    z = z.double()
    if not debiased:
        zc = z - z.mean(0)
        return zc @ zc.T
    n = len(z)
    if n < 4:
        raise LayerflowError(f"Debiased CKA needs at least 4 items, got {n}.")
    gram = z @ z.T
    gram.fill_diagonal_(0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None] + means[None, :]
    return gram.fill_diagonal_(0)


def linear_cka(z_a: Float[Tensor, "n fa"], z_b: Float[Tensor, "n fb"], debiased: bool = True) -> float:
    """Linear CKA between two representations of the same n items (NaN if either is constant).

    Debiased by default: the plain estimator is biased upward when features outnumber items
    (independent sparse codes with 4096 latents on 2048 words give about 0.6)."""
    return _cka_with_p(centered_gram(z_a, debiased), centered_gram(z_b, debiased), [])[0]


def _cka_with_p(kc: Tensor, lc: Tensor, perms: list[Tensor]) -> tuple[float, float]:
    norm = torch.sqrt((kc * kc).sum() * (lc * lc).sum())
    if norm == 0:
        return math.nan, math.nan
    observed = float((kc * lc).sum() / norm)
    if not perms:
        return observed, math.nan
    exceed = sum(float((kc * lc[p][:, p]).sum() / norm) >= observed - 1e-12 for p in perms)
    return observed, (1 + exceed) / (1 + len(perms))


def _standardize(z: Tensor) -> Tensor:
    """Columns with mean 0 and unit norm (float64); constant columns become 0."""
    zc = z.double() - z.double().mean(0)
    norm = zc.norm(dim=0)
    return zc / torch.where(norm > 0, norm, torch.inf)


def benjamini_hochberg(p: Float[np.ndarray, " m"], fdr: float = 0.05) -> Bool[np.ndarray, " m"]:
    """Step-up BH: reject the k smallest p-values, k the largest rank with p_(k) <= fdr k / m."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p, kind="stable")
    below = p[order] <= fdr * np.arange(1, len(p) + 1) / len(p)
    k = int(np.flatnonzero(below).max()) + 1 if below.any() else 0
    reject = np.zeros(len(p), dtype=bool)
    reject[order[:k]] = True
    return reject


def match_features(
    train_a: Float[Tensor, "n_train fa"], train_b: Float[Tensor, "n_train fb"],
    heldout_a: Float[Tensor, "n_heldout fa"], heldout_b: Float[Tensor, "n_heldout fb"],
    n_perm: int = 1000, fdr: float = 0.05, seed: int = 0, documents: Int[Tensor, " n_heldout"] | None = None,
) -> MatchedFeatures:
    """Hungarian matching on train-word correlation, then held-out correlation, permutation p and BH.
    With `documents` (each held-out word's document) the permutations move whole documents."""
    corr = ActivationCorrelation()
    corr.add(train_a, train_b)
    if documents is None:
        g = torch.Generator().manual_seed(seed)
        rows, perms = torch.arange(len(heldout_a)), [torch.randperm(len(heldout_b), generator=g) for _ in range(n_perm)]
    else:
        rows, perms = document_permutations(documents, len(heldout_a), n_perm, seed)
    return _test_matches(corr, heldout_a[rows], heldout_b[rows], perms, fdr)


def document_permutations(documents: Int[Tensor, " n"], max_words: int, n_perm: int,
                          seed: int) -> tuple[Int[Tensor, " m"], list[Int[Tensor, " m"]]]:
    """Rows to test on, and `n_perm` permutations of them that move whole documents.

    Each document contributes its first w words, w = min(the median document's length,
    max_words // documents); shorter documents are left out. A permutation sends document d's
    k-th word to document pi(d)'s k-th word, so the dependence between nearby words survives and
    only the pairing of documents is broken (a permutation of single words would make chance
    correlations look smaller than they are)."""
    docs, counts = torch.unique_consecutive(documents, return_counts=True)
    if len(docs) != len(torch.unique(documents)):
        raise LayerflowError("The words of each document must be consecutive.")
    w = int(min(counts.double().median().item(), max(1, max_words // len(docs))))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    kept = starts[counts >= w]
    if len(kept) < 2:
        return torch.arange(min(len(documents), max_words)), []
    blocks = kept[:, None] + torch.arange(w)[None, :]  # [documents, w] row indices
    rows = blocks.reshape(-1)
    positions = torch.arange(len(rows)).reshape(len(kept), w)
    g = torch.Generator().manual_seed(seed)
    return rows, [positions[torch.randperm(len(kept), generator=g)].reshape(-1) for _ in range(n_perm)]


def _test_matches(corr: ActivationCorrelation, heldout_a: Tensor, heldout_b: Tensor, perms: list[Tensor],
                  fdr: float) -> MatchedFeatures:
    live_a, live_b = (np.flatnonzero(m) for m in corr.live())
    sim = corr.compute()[np.ix_(live_a, live_b)]
    rows, cols = linear_sum_assignment(sim, maximize=True)
    src, tgt = live_a[rows], live_b[cols]
    a, b = _standardize(heldout_a[:, src]), _standardize(heldout_b[:, tgt])
    observed = (a * b).sum(0)
    exceed = torch.zeros(len(src), dtype=torch.long)
    for perm in perms:
        exceed += (a * b[perm]).sum(0) >= observed - 1e-12
    live_heldout = (a.abs().sum(0) > 0) & (b.abs().sum(0) > 0)
    p = torch.where(live_heldout, (1 + exceed) / (1 + len(perms)), torch.ones(())).double().numpy()
    if not perms:  # nothing to permute: no test
        p = np.full(len(src), np.nan)
    significant = benjamini_hochberg(p, fdr) & (observed.numpy() >= defaults.MIN_ACTIVATION_CORRELATION)
    return MatchedFeatures(src.astype(np.int64), tgt.astype(np.int64), sim[rows, cols].astype(np.float64),
                           observed.numpy(), p, significant, len(live_a))


# --- paired SVCCA (Lan et al. 2024) --------------------------------------------------------------


@dataclass(frozen=True)
class PairedSVCCA:
    score: float  # mean canonical correlation between the paired decoder rows
    p_value: float  # against shuffles of the pairing
    components: tuple[int, int]  # singular directions kept on each side
    n_pairs: int  # pairs used (significant matches whose features are not junk)


def svcca(a: Float[Tensor, "n da"], b: Float[Tensor, "n db"], variance_kept: float = 0.99,
          max_fraction: float = 0.25) -> tuple[float, tuple[int, int]]:
    """SVCCA between two matrices of the same n items (rows): each side centered and reduced to its
    top singular directions holding `variance_kept` of its variance (at most `max_fraction` n of
    them, so that CCA does not fit noise), then the mean canonical correlation."""
    basis_a, basis_b = _svcca_basis(a, variance_kept, max_fraction), _svcca_basis(b, variance_kept, max_fraction)
    return _mean_canonical(basis_a, basis_b), (basis_a.shape[1], basis_b.shape[1])


def _svcca_basis(m: Tensor, variance_kept: float, max_fraction: float) -> Tensor:
    """An orthonormal basis [n, k] of the kept singular directions of m centered (CCA needs no more)."""
    m = m.double() - m.double().mean(0)
    u, sv, _ = torch.linalg.svd(m, full_matrices=False)
    share = (sv ** 2).cumsum(0) / (sv ** 2).sum()
    k = int((share < variance_kept).sum().item()) + 1
    return u[:, :max(1, min(k, int(max_fraction * len(m)), len(sv)))]


def _mean_canonical(basis_a: Tensor, basis_b: Tensor) -> float:
    return float(torch.linalg.svdvals(basis_a.T @ basis_b).clamp(max=1.0).mean())


def paired_svcca(dec_a: Float[Tensor, "n da"], dec_b: Float[Tensor, "n db"], n_perm: int = 200,
                 seed: int = 0) -> PairedSVCCA:
    """Lan et al.'s paired SVCCA: row i of `dec_a` and of `dec_b` are a matched pair of features;
    p-value against `n_perm` shuffles of the pairing (a shuffle permutes the rows of B's basis:
    centering and the singular directions do not depend on the order of the rows)."""
    if len(dec_a) < 8:
        return PairedSVCCA(math.nan, math.nan, (0, 0), len(dec_a))
    basis_a, basis_b = _svcca_basis(dec_a, 0.99, 0.25), _svcca_basis(dec_b, 0.99, 0.25)
    score = _mean_canonical(basis_a, basis_b)
    g = torch.Generator().manual_seed(seed)
    exceed = sum(_mean_canonical(basis_a, basis_b[torch.randperm(len(basis_b), generator=g)]) >= score - 1e-12
                 for _ in range(n_perm))
    return PairedSVCCA(score, (1 + exceed) / (1 + n_perm) if n_perm else math.nan,
                       (basis_a.shape[1], basis_b.shape[1]), len(dec_a))


def junk_features(latents: Float[Tensor, "words f"], junk: Bool[Tensor, " words"], top: int = 10) -> Bool[Tensor, " f"]:
    """Features whose `top` strongest activations fall mostly (at least half) on junk words."""
    values, rows = latents.topk(min(top, len(latents)), dim=0)
    on_junk = (junk[rows] & (values > 0)).sum(0)
    return on_junk * 2 >= min(top, len(latents))


def _train_correlation(sae_a: Any, sae_b: Any, x_a: Tensor, x_b: Tensor) -> ActivationCorrelation:
    """Streaming correlation of the two SAEs' latents over train words, ENCODE_BATCH words at a time."""
    corr = ActivationCorrelation()
    for i in range(0, len(x_a), ENCODE_BATCH):
        corr.add(_encode(sae_a, x_a[i:i + ENCODE_BATCH]), _encode(sae_b, x_b[i:i + ENCODE_BATCH]))
    return corr


@dataclass(frozen=True)
class _SiteData:
    """One site's SAE, train/held-out activations, held-out latents, and U-centered Gram matrix (for CKA)."""

    sae: Any
    x_train: Tensor
    x_heldout: Tensor
    latents_heldout: Tensor | None  # kept for the current source only: targets re-encode per pair
    gram: Tensor


def _site(sae: Any, acts: Tensor, heldout: Tensor, cka_words: Tensor, keep_latents: bool) -> _SiteData:
    latents = _encode(sae, acts[heldout])
    return _SiteData(sae, acts[~heldout], acts[heldout], latents if keep_latents else None, centered_gram(latents[cka_words]))


@dataclass(frozen=True)
class _Tests:
    """The permutation tests' shared draws: held-out rows in whole-document blocks and permutations of the
    documents (CKA: `cka_rows`, `cka_perms`; matched features: `rows`, `perms`)."""

    cka_rows: Tensor
    cka_perms: list[Tensor]
    rows: Tensor
    perms: list[Tensor]
    junk: Tensor | None  # per held-out word
    n_perm_svcca: int
    fdr: float
    seed: int
    groups: Tensor | None = None  # each held-out word's document, numbered 0..G-1
    weights: Tensor | None = None  # [B, G] bootstrap draws of the documents (None: no resampling)


RESAMPLED = ("stitched_explained_variance", "stitch_only_explained_variance", "target_sae_explained_variance",
             "relative_transfer", "stitched_beyond_stitch", "cka", "matched_feature_correlation_mean",
             "fraction_features_with_partner")  # the figures with bootstrap resamples
NO_INTERVAL = {  # the rest, and why (`settings["no_interval"]`)
    "cka_p_value": "a test, not an estimate", "paired_svcca_p_value": "a test, not an estimate",
    "paired_svcca": "decoder weights of the matched pairs only",
    "paired_svcca_pairs": "a count of the matching", "paired_svcca_components": "a count of the matching",
}
CONDITIONAL = {  # what each of these intervals holds fixed
    "cka": "the U-centred Gram matrices of all the CKA words (each resample reweights their document blocks)",
    "matched_feature_correlation_mean": "the matching; the held-out correlations are resampled",
    "fraction_features_with_partner": "the matching and its Benjamini-Hochberg rejections; the held-out "
                                      "correlation floor is applied to the resampled correlations, and the resampled "
                                      "fractions are median-centred on the figure (metrics.median_centred)",
}


def _cka_resampled(kc: Tensor, lc: Tensor, tests: "_Tests") -> Tensor:
    """Debiased CKA under each bootstrap draw of the documents: the sums over word pairs of Kc Lc,
    Kc Kc and Lc Lc, each pair weighted by how many times both words' documents are drawn."""
    g, w = tests.groups[tests.cka_rows], tests.weights.double()
    n_groups = w.shape[1]

    def weighted(m: Tensor) -> Tensor:
        blocks = torch.zeros(n_groups, len(g), dtype=torch.float64).index_add_(0, g, m)
        blocks = torch.zeros(n_groups, n_groups, dtype=torch.float64).index_add_(1, g, blocks)
        return ((w @ blocks) * w).sum(1)

    return weighted(kc * lc) / (weighted(kc * kc) * weighted(lc * lc)).sqrt()


def _pair_metrics(a: _SiteData, b: _SiteData, maps: tuple[AffineMap, AffineMap], target_ev: tuple[float, Tensor | None],
                  tests: _Tests, match: bool) -> tuple[dict[str, float], dict[str, Tensor], MatchedFeatures | None]:
    """The pair's figures, their bootstrap resamples (`RESAMPLED`; empty without resampling), the matched features."""
    map_ab, map_ba = maps
    x_b = b.x_heldout
    in_a = map_ba.apply(x_b)
    stitched, stitched_r = _ev(x_b, map_ab.apply(_reconstruct(a.sae, in_a)), tests)
    stitch_only, stitch_only_r = _ev(x_b, map_ab.apply(in_a), tests)
    target_ev, target_r = target_ev
    resamples = {} if stitched_r is None else {
        "stitched_explained_variance": stitched_r, "stitch_only_explained_variance": stitch_only_r,
        "target_sae_explained_variance": target_r,
        "relative_transfer": stitched_r / target_r if target_ev > 0 else torch.full_like(stitched_r, math.nan),
        "stitched_beyond_stitch": stitched_r - stitch_only_r}
    cka, cka_p = _cka_with_p(a.gram, b.gram, tests.cka_perms)
    if resamples:
        resamples["cka"] = _cka_resampled(a.gram, b.gram, tests)
    metrics = {
        "stitched_explained_variance": stitched,
        "stitch_only_explained_variance": stitch_only,
        "target_sae_explained_variance": target_ev,
        "relative_transfer": stitched / target_ev if target_ev > 0 else math.nan,
        "stitched_beyond_stitch": stitched - stitch_only,
        "cka": cka,
        "cka_p_value": cka_p,
        "matched_feature_correlation_mean": math.nan,
        "fraction_features_with_partner": math.nan,
        "paired_svcca": math.nan, "paired_svcca_p_value": math.nan, "paired_svcca_pairs": math.nan,
        "paired_svcca_components": math.nan,
    }
    if not match:
        return metrics, resamples, None
    corr = _train_correlation(a.sae, b.sae, a.x_train, b.x_train)
    latents_b = _encode(b.sae, x_b)
    matched = _test_matches(corr, a.latents_heldout[tests.rows], latents_b[tests.rows], tests.perms, tests.fdr)
    if len(matched.source_index):
        metrics["matched_feature_correlation_mean"] = float(matched.heldout_correlation.mean())
    if matched.n_live_source and tests.perms:
        metrics["fraction_features_with_partner"] = matched.significant.sum() / matched.n_live_source
    if resamples and len(matched.source_index):
        src, tgt = torch.from_numpy(matched.source_index), torch.from_numpy(matched.target_index)
        r = resampled_correlations(a.latents_heldout[tests.rows][:, src], latents_b[tests.rows][:, tgt],
                                   tests.groups[tests.rows], tests.weights)
        resamples["matched_feature_correlation_mean"] = r.mean(1)
        if matched.n_live_source and tests.perms:
            rejected = torch.from_numpy(benjamini_hochberg(matched.p_value, tests.fdr))
            resamples["fraction_features_with_partner"] = (
                ((r >= defaults.MIN_ACTIVATION_CORRELATION) & rejected).sum(1) / matched.n_live_source).double()
    keep = torch.from_numpy(matched.significant)
    if tests.junk is not None:
        keep &= ~junk_features(a.latents_heldout, tests.junk)[matched.source_index]
        keep &= ~junk_features(latents_b, tests.junk)[matched.target_index]
    src, tgt = matched.source_index[keep.numpy()], matched.target_index[keep.numpy()]
    svcca_result = paired_svcca(a.sae.W_dec.detach().float()[src], b.sae.W_dec.detach().float()[tgt],
                                tests.n_perm_svcca, tests.seed)
    metrics.update(paired_svcca=svcca_result.score, paired_svcca_p_value=svcca_result.p_value,
                   paired_svcca_pairs=svcca_result.n_pairs, paired_svcca_components=min(svcca_result.components))
    return metrics, resamples, matched


def cross_model_matrix(
    saes_a: dict[str, Any],
    saes_b: dict[str, Any],
    aligned: AlignedActivations,
    ridge: float = 1e-4,
    n_perm: int = 200,
    n_perm_features: int = 1000,
    cka_max_words: int = 2048,
    fdr: float = 0.05,
    seed: int = 0,
    match_pairs: str = "all",
    twins_b: dict[str, Any] | None = None,
    bootstrap: int = defaults.BOOTSTRAP_REPLICATES,
    interval: float = defaults.INTERVAL_LEVEL,
) -> TransferMatrix:
    """Every CrossModelPair metric for each (A site, B site): sources are `saes_a`' hooks, targets `saes_b`'.

    Feature matching (Hungarian on latent correlations, permutation-tested) is the costly part:
    `match_pairs` "all" runs it for every pair, "same_depth" only for each source's same-depth
    target (`same_depth_pairs`), "none" never; the matching metrics are NaN where it did not run.

    `twins_b` (second-seed SAEs of some of B's sites) gives floors and ceilings at those sites
    (`_references`): what relative transfer, CKA and matching give for SAE_B against a rotated copy of
    itself (no shared features) and against its twin (the same features learned twice).

    `bootstrap` resamples of the held-out documents (0: none) give the EV figures and relative
    transfer their `interval` percentile intervals and the matrix its `replicates`; every pair is
    resampled with the same draws.
    """
    if match_pairs not in MATCH_PAIRS:
        raise LayerflowError(f"Unknown match_pairs '{match_pairs}'. Valid: {', '.join(MATCH_PAIRS)}.")
    _check_inputs(saes_a, saes_b, aligned)
    heldout = aligned.heldout
    documents = aligned.document[heldout]
    cka_rows, cka_perms = document_permutations(documents, cka_max_words, n_perm, seed)
    rows, perms = document_permutations(documents, aligned.n_heldout, n_perm_features, seed + 1)
    junk = aligned.junk[heldout] if aligned.junk is not None else None
    groups, n_groups = group_ids(documents)
    weights = bootstrap_weights(n_groups, bootstrap, seed) if bootstrap and n_groups >= defaults.MIN_BOOTSTRAP_GROUPS \
        else None
    tests = _Tests(cka_rows, cka_perms, rows, perms, junk, n_perm if perms else 0, fdr, seed, groups, weights)
    targets = {h: _site(sae, aligned.acts_b[h], heldout, cka_rows, keep_latents=False) for h, sae in saes_b.items()}
    target_ev = {h: _ev(site.x_heldout, _reconstruct(site.sae, site.x_heldout), tests) for h, site in targets.items()}
    shape = (len(saes_a), len(saes_b))
    metrics = {name: np.full(shape, np.nan) for name in metric_names("cross_model")}
    replicates = {name: np.full((len(weights), *shape), np.nan) for name in RESAMPLED} if weights is not None else {}
    matched: dict[tuple[str, str], MatchedFeatures] = {}
    sites_a, sites_b = [aligned.site("a", h) for h in saes_a], [aligned.site("b", h) for h in saes_b]
    same_depth = set(nearest_depth_pairs(sites_a, sites_b))
    for i, (hook_a, sae_a) in enumerate(saes_a.items()):
        source = _site(sae_a, aligned.acts_a[hook_a], heldout, cka_rows, keep_latents=True)
        for j, hook_b in enumerate(saes_b):
            maps = fit_stitch(aligned, hook_a, hook_b, ridge)
            match = match_pairs == "all" or (match_pairs == "same_depth" and (i, j) in same_depth)
            values, resamples, pair_matched = _pair_metrics(source, targets[hook_b], maps, target_ev[hook_b], tests,
                                                            match)
            if pair_matched is not None:
                matched[hook_a, hook_b] = pair_matched
            for name, value in values.items():
                metrics[name][i, j] = value
            for name, value in resamples.items():
                replicates[name][:, i, j] = value.numpy()
    settings = {
        "model_a": aligned.model_a, "model_b": aligned.model_b,
        "n_train_words": aligned.n_train, "n_heldout_words": aligned.n_heldout,
        "n_train_documents": len(torch.unique(aligned.document[~heldout])),
        "n_heldout_documents": len(torch.unique(documents)),
        "n_dropped_words": aligned.n_dropped, "context_size": aligned.context_size,
        "heldout_every": aligned.heldout_every, "ridge": ridge, "n_perm": n_perm,
        "n_perm_features": n_perm_features, "cka_words": len(cka_rows), "cka": "debiased (unbiased HSIC)",
        "permutations": "whole held-out documents (each contributes the same number of words)" if perms else
                        "none: fewer than 2 held-out documents of equal length, so no p-values (read more documents)",
        "fdr": fdr, "seed": seed, "match_pairs": match_pairs,
        "intervals": f"{interval:.0%} percentile bootstrap, {bootstrap} resamples of {n_groups} whole held-out "
                     f"documents ({', '.join(RESAMPLED)})" if weights is not None else "none (bootstrap off)"
                     if not bootstrap else f"none: only {n_groups} held-out documents, and resamples of fewer than "
                     f"{defaults.MIN_BOOTSTRAP_GROUPS} say little; read more documents",
        **({"no_interval": NO_INTERVAL, "conditional_intervals": CONDITIONAL} if weights is not None else {}),
    }
    if "fraction_features_with_partner" in replicates:  # a count above a threshold (`metrics.median_centred`)
        replicates["fraction_features_with_partner"] = median_centred(replicates["fraction_features_with_partner"],
                                                                      metrics["fraction_features_with_partner"], (0, 1))
    references = _references(saes_b, twins_b or {}, aligned, tests, sites_b) if twins_b else {}
    return TransferMatrix("cross_model", sites_a, sites_b, metrics, settings, extras={"matched_features": matched},
                          references=references, replicates=replicates,
                          intervals={name: percentile_interval(r, interval) for name, r in replicates.items()})


def _references(saes_b: dict[str, Any], twins_b: dict[str, Any], aligned: AlignedActivations, tests: "_Tests",
                sites_b: list[Site]) -> dict[str, Any]:
    """Floors and ceilings at B's sites that have a twin, in the same figures as the matrix: SAE_B against
    itself rotated inside its site's principal subspace (floor) and against its twin (ceiling), on B's
    words, with no stitch (both sides read the same site)."""
    heldout = aligned.heldout
    refs = References(layers={s.hook_name: s.layer for s in sites_b})
    for metric in ("relative_transfer", "cka", "fraction_features_with_partner"):
        refs.floor[metric], refs.ceiling[metric] = {}, {}
    for k, (hook, twin) in enumerate(twins_b.items()):
        if hook not in saes_b:
            continue
        sae, x = saes_b[hook], aligned.acts_b[hook]
        x_train, x_held = x[~heldout], x[heldout]
        calibration = Calibration.of({hook: x_train}, covariance=True)
        mean, rotation = calibration.means[hook].float(), calibration.rotation(hook, tests.seed + 7919 * (k + 1))
        rotate = lambda v: (v - mean) @ rotation + mean  # noqa: E731  the rotated SAE on v == the SAE on rotate(v)
        own = _ev(x_held, _reconstruct(sae, x_held))[0]
        latents = _encode(sae, x_held)
        gram = centered_gram(latents[tests.cka_rows])
        for kind, other, train_in, held_in in (("floor", sae, rotate(x_train), rotate(x_held)),
                                               ("ceiling", twin, x_train, x_held)):
            other_latents = _encode(other, held_in)
            target = getattr(refs, kind)
            target["relative_transfer"][hook] = _ev(held_in, _reconstruct(other, held_in))[0] / own if own > 0 else math.nan
            target["cka"][hook] = _cka_with_p(gram, centered_gram(other_latents[tests.cka_rows]), [])[0]
            corr = _train_correlation(sae, other, x_train, train_in)
            matched = _test_matches(corr, latents[tests.rows], other_latents[tests.rows], tests.perms, tests.fdr)
            target["fraction_features_with_partner"][hook] = (
                matched.significant.sum() / matched.n_live_source if matched.n_live_source and tests.perms else math.nan)
    return refs.to_dict()


def _check_inputs(saes_a: dict[str, Any], saes_b: dict[str, Any], aligned: AlignedActivations) -> None:
    for side, saes, acts in (("a", saes_a, aligned.acts_a), ("b", saes_b, aligned.acts_b)):
        if not saes:
            raise LayerflowError(f"No SAEs given for model {side.upper()}.")
        for hook in saes:
            aligned.site(side, hook)  # names the missing hook
            d_in = saes[hook].cfg.d_in
            if d_in != acts[hook].shape[1]:
                raise LayerflowError(f"The SAE for '{hook}' reads width {d_in}, but the activations there have width "
                                     f"{acts[hook].shape[1]}.")
    if aligned.n_heldout < 2 or aligned.n_train < 2:
        raise LayerflowError(f"Need at least 2 train and 2 held-out words, have {aligned.n_train} train and "
                             f"{aligned.n_heldout} held-out: read more documents (document i is held out when "
                             f"i % {aligned.heldout_every} == {aligned.heldout_every - 1}).")


# --- same depth vs all depths --------------------------------------------------------------------


def nearest_depth_pairs(sources: list[Site], targets: list[Site]) -> list[tuple[int, int]]:
    """(source i, target j) with j the target of nearest relative depth (ties: the shallower)."""
    depths = np.array([t.relative_depth for t in targets])
    return [(i, int(np.argmin(np.abs(depths - s.relative_depth)))) for i, s in enumerate(sources)]


def same_depth_pairs(matrix: TransferMatrix) -> list[tuple[int, int]]:
    return nearest_depth_pairs(matrix.sources, matrix.targets)


@dataclass(frozen=True)
class DepthComparison:
    metric: str
    same_depth_mean: float
    same_depth_n: int
    all_mean: float
    all_n: int
    difference: float  # same_depth_mean - all_mean
    difference_low: float | None = None  # its percentile interval over the matrix's resamples (None without)
    difference_high: float | None = None


def compare_same_depth(matrix: TransferMatrix, metric: str = "relative_transfer",
                       level: float = defaults.INTERVAL_LEVEL) -> DepthComparison:
    """Mean of `metric` over same-depth pairs and over all pairs (NaN entries left out), each entry
    clipped to `summary.BOUNDS` first, as every average of transfer figures is (`transfer.summary`);
    their difference, with its `level` interval when the matrix has resamples of `metric` (the same
    pairs on each resample)."""
    M = matrix[metric]
    resamples = matrix.replicates.get(metric, np.empty((0, *M.shape)))
    stack = np.clip(np.concatenate([M[None], resamples]), *BOUNDS)
    same = np.zeros(M.shape, dtype=bool)
    for i, j in same_depth_pairs(matrix):
        same[i, j] = True
    ok = np.isfinite(M)
    mean = lambda mask: stack[:, mask].mean(1) if mask.any() else np.full(len(stack), math.nan)  # noqa: E731
    same_mean, all_mean = mean(ok & same), mean(ok)
    gap = same_mean - all_mean
    low = high = None
    if len(gap) > 1 and np.isfinite(gap[1:]).all():
        low, high = (float(v) for v in percentile_interval(gap[1:], level))
    return DepthComparison(metric, float(same_mean[0]), int((ok & same).sum()), float(all_mean[0]), int(ok.sum()),
                           float(gap[0]), low, high)
