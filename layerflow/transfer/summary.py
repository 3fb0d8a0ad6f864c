"""Summaries of a layer-to-layer transfer matrix, each with its bootstrap interval: universality,
hubs, strong pairs, distance decay, divergence.

Input. `M` is a square [n, n] float array: M[i, j] is how well the dictionary trained at layer
`layers[i]` explains layer `layers[j]` (source i, target j), read as higher-is-better on the scale
of relative transfer (1 = as good as the target's own dictionary, 0 = no better than its mean).
`layers` are model layer indices, strictly increasing. `replicates` ([B, n, n]) are the matrix
recomputed on B bootstrap resamples of the held-out sequences (`TransferMatrix.replicates`); every
figure below is computed on each of them too, and its interval is read from those B values.
Without replicates every figure is still computed, its interval is NaN, and no claim that needs
one (hub, divergence, universal, specialised, strong pair, "falls with distance") is made.

Conventions.
- An entry is *computed* when it is finite; NaN entries are left out everywhere. The diagonal is
  reported as `diagonal` and left out of every other summary.
- **Bounded scale.** Every average clips the entries to [0, 1] first. An entry below 0 means the
  source dictionary reconstructs the target worse than the target's mean does: it explains
  nothing, and one such entry of -4 (relative transfer has no lower bound) would otherwise outweigh
  four layers transferring perfectly. An entry above 1 (another layer's dictionary beats the
  target's own) counts as 1, "as good as its own". `median` is reported beside `mean` (unclipped;
  the median needs no bound).
- Distance is counted in model layers, d(i, j) = |layers[i] - layers[j]|. Depth is relative:
  layers[i] / (n_layers - 1).
- Intervals: `level` (default 95%) percentile intervals of the B resampled values, except for the
  per-layer hub excess and the per-link break size, where many layers (links) are tested at once:
  those intervals are simultaneous (max-|t| over the layers or links: with probability `level` all
  of them cover their true values together), so a matrix with no hub yields none anywhere with
  probability at least `level`, not one false hub in twenty layers.
- `min_effect` (default `defaults.MIN_EFFECT`): a hub or a break must also be at least this large
  on the bounded scale; with enough tokens an interval clears zero for effects too small to matter.

Figures.
- universality[i]: the mean over j != i of the clipped M[i, j] (outgoing: how well layer i's
  dictionary explains the other layers; the notes' "universality score").
  universality_incoming[i]: the mean over j != i of the clipped M[j, i].
- verdicts[i] ("universal", "specialised", "intermediate" or "not resolved"): *universal* when the
  whole universality interval is at or above UNIVERSAL_AT (0.6, the notes' MODERATE band edge),
  *specialised* when it is wholly below SPECIALISED_BELOW (0.4, the LOW band edge), *intermediate*
  when it lies wholly between the two, else not resolved at this sample size.
- expected[o]: the fitted decay, the median clipped entry at each signed layer distance o =
  layers[j] - layers[i] (forward and backward transfer may decay differently, so they are fit
  apart). No functional form is assumed; the median keeps a minority of poor layers (whose
  entries are low at every distance) from pulling the decay down and making every other layer
  look like a hub.
- hub_excess[i]: the mean over j of the clipped M[i, j] - expected[layers[j] - layers[i]]: how much
  better layer i's dictionary transfers than its distances alone predict. Middle layers are close
  to every layer, so their plain universality is high in a pure distance decay; their excess is 0.
  hub_layers: the layers whose excess is at least min_effect and whose simultaneous interval lies
  above 0.
- adjacent links: l_k = the clipped M[k, k+1] for consecutive entries of `layers`. A steady trend
  along the chain is no break: with trend = the median of l_{k+1} - l_k, the detrended links are
  l_k - trend * k, and break_size[k] = the smallest drop from a neighbouring detrended link to link
  k (both neighbours inside the chain, the one neighbour at either end). breaks: the layers
  layers[k+1] whose break size is at least min_effect with its simultaneous interval above 0;
  divergence_layer is the largest break (None without one, and always with fewer than 3 links).
- bidirectional_pairs: the pairs a < b whose entries' interval lows are both >= strong_threshold
  (0.7, the notes' "strong"); `strong_pairs_unresolved` counts the pairs whose point values both
  reach it but whose intervals do not.
- distance_decay: per distance d >= 1 the number of entries (ordered pairs), their clipped mean
  with its interval, and the unclipped std, min and max.
- decay_rate: minus the least-squares slope of the clipped entries against distance, with its
  interval; > 0 when transfer falls with distance (exactly r for M = c - r d inside [0, 1]).
- band_counts: entries per band of BANDS (HIGH >= 0.9, MODERATE >= 0.6, LOW >= 0.4, SPECIALISED);
  band_unresolved: the entries whose interval straddles a band edge. Bands are for figures on the
  relative-transfer scale; the notes' raw ratio gets none (it reaches 55 and measures norm growth).
- mean (clipped, with interval), median, min, max: over the computed off-diagonal entries.

`TransferSummary.to_dict()` writes NaN as None (JSON null).
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from layerflow import defaults
from layerflow.errors import LayerflowError
from layerflow.files import json_safe
from layerflow.metrics import percentile_interval

BANDS = ((0.9, "HIGH"), (0.6, "MODERATE"), (0.4, "LOW"), (-math.inf, "SPECIALISED"))
UNIVERSAL_AT, SPECIALISED_BELOW = 0.6, 0.4  # universality verdicts: the MODERATE and LOW band edges
STRONG = 0.7  # the notes' "strong" pair
BOUNDS = (0.0, 1.0)  # averages clip entries to this range (the module docstring says why)
NOT_AVAILABLE = "N/A"


def band(value: float) -> str:
    """The band (see BANDS) of one value: the first whose lower bound it reaches; "N/A" if not finite."""
    value = float(value)
    if not math.isfinite(value):
        return NOT_AVAILABLE
    return next(name for lower, name in BANDS if value >= lower)


def band_matrix(M) -> list[list[str]]:
    """The band of every entry of M, diagonal and NaN ("N/A") included."""
    return [[band(v) for v in row] for row in np.asarray(M, dtype=np.float64)]


@dataclass(frozen=True)
class Estimate:
    """A figure with its interval (NaN bounds: no resamples)."""

    value: float
    low: float = math.nan
    high: float = math.nan

    def above(self, x: float) -> bool:
        """Whether the whole interval lies above x (False without an interval)."""
        return bool(self.low > x)

    def below(self, x: float) -> bool:
        return bool(self.high < x)


@dataclass(frozen=True)
class DecayPoint:
    distance: int  # |layer_a - layer_b| in model layers
    n_pairs: int  # computed entries at this distance, both directions
    mean: Estimate  # clipped
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class BidirectionalPair:
    layer_a: int  # the shallower layer
    layer_b: int
    forward: Estimate  # M[a -> b]
    backward: Estimate  # M[b -> a]


@dataclass(frozen=True)
class Link:
    source: int  # layer
    target: int  # the next sampled layer
    value: Estimate  # clipped M[source, target]
    break_size: Estimate  # simultaneous interval over the links


@dataclass(frozen=True)
class TransferSummary:
    metric: str
    layers: list[int]
    relative_depth: list[float]
    diagonal: list[float]
    universality: list[Estimate]
    universality_incoming: list[Estimate]
    verdicts: list[str]
    hub_excess: list[Estimate]  # simultaneous intervals
    hub_layers: list[int]
    links: list[Link]
    link_trend: float
    breaks: list[int]
    divergence_layer: int | None
    divergence_depth: float | None
    bidirectional_pairs: list[BidirectionalPair]
    strong_pairs_unresolved: int
    distance_decay: list[DecayPoint]
    decay_rate: Estimate
    band_counts: dict[str, int]
    band_unresolved: int
    mean: Estimate
    median: float
    min: float
    max: float
    n_pairs: int
    n_replicates: int
    level: float
    strong_threshold: float
    min_effect: float

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def summarize(M, layers, n_layers, metric, replicates=None, level: float = defaults.INTERVAL_LEVEL,
              strong_threshold: float = STRONG, min_effect: float = defaults.MIN_EFFECT) -> TransferSummary:
    """Every summary of the module docstring for one metric's [n, n] matrix (and its [B, n, n] resamples)."""
    M, layers, R = _validated(M, layers, n_layers, replicates)
    n = len(layers)
    off = ~np.eye(n, dtype=bool)
    computed = np.isfinite(M) & off
    stack = np.concatenate([M[None], R])  # row 0: the figure itself; rows 1..B: the resamples
    clipped = np.where(computed, np.clip(stack, *BOUNDS), np.nan)
    est = lambda values: _estimates(values, level)  # noqa: E731  values: [1 + B, ...]
    signed = np.subtract.outer(layers, layers).T  # signed[i, j] = layers[j] - layers[i]

    universality = est(_nanmean(clipped, -1))
    incoming = est(_nanmean(clipped, -2))
    verdicts = [_verdict(u) for u in universality]

    expected = np.full(clipped.shape, np.nan)
    for o in np.unique(signed[computed]):
        at = computed & (signed == o)
        expected[:, at] = _nanmedian(clipped[:, at], -1)[:, None]
    hub_excess = _simultaneous(_nanmean(clipped - expected, -1), level)
    hubs = [layers[i] for i, e in enumerate(hub_excess) if e.value >= min_effect and e.above(0)]

    chain = np.stack([clipped[:, k, k + 1] for k in range(n - 1)], -1)  # [1 + B, n - 1]
    trend, sizes = _break_sizes(chain)
    break_size = _simultaneous(sizes, level)
    links = [Link(layers[k], layers[k + 1], v, b) for k, (v, b) in enumerate(zip(est(chain), break_size))]
    breaking = [x for x in links if x.break_size.value >= min_effect and x.break_size.above(0)]
    divergence = max(breaking, key=lambda x: x.break_size.value).target if breaking else None

    lows, highs = percentile_interval(R, level) if len(R) else np.full((2, n, n), np.nan)
    entry = lambda a, b: Estimate(float(M[a, b]), *_bounds(stack[:, a, b], level))  # noqa: E731
    upper = [(a, b) for a in range(n) for b in range(a + 1, n)]
    pairs = [BidirectionalPair(layers[a], layers[b], entry(a, b), entry(b, a))
             for a, b in upper if lows[a, b] >= strong_threshold <= lows[b, a]]
    unresolved = sum(M[a, b] >= strong_threshold <= M[b, a] and not lows[a, b] >= strong_threshold <= lows[b, a]
                     for a, b in upper)

    distance = np.abs(signed)
    decay = []
    for d in np.unique(distance[computed]):
        at, v = computed & (distance == d), M[computed & (distance == d)]
        decay.append(DecayPoint(int(d), int(v.size), est(_nanmean(clipped[:, at], -1)), float(v.std()),
                                float(v.min()), float(v.max())))
    decay_rate = est(-_slope(np.where(computed, distance, np.nan).astype(np.float64), clipped))

    values = M[computed]
    band_counts = {name: 0 for _, name in BANDS}
    for v in values:
        band_counts[band(v)] += 1
    edges = [lower for lower, _ in BANDS if math.isfinite(lower)]
    straddles = np.zeros((n, n), dtype=bool)
    for edge in edges:
        straddles |= (lows < edge) & (highs >= edge)

    return TransferSummary(
        metric=metric, layers=layers, relative_depth=[layer / (n_layers - 1) for layer in layers],
        diagonal=[float(v) for v in np.diag(M)], universality=universality, universality_incoming=incoming,
        verdicts=verdicts, hub_excess=hub_excess, hub_layers=hubs, links=links, link_trend=float(trend[0]),
        breaks=[x.target for x in breaking], divergence_layer=divergence,
        divergence_depth=divergence / (n_layers - 1) if divergence is not None else None,
        bidirectional_pairs=pairs, strong_pairs_unresolved=int(unresolved),
        distance_decay=decay, decay_rate=decay_rate,
        band_counts=band_counts, band_unresolved=int((straddles & computed).sum()),
        mean=est(_nanmean(clipped.reshape(len(stack), -1), -1)),
        median=float(np.median(values)) if values.size else math.nan,
        min=float(values.min()) if values.size else math.nan, max=float(values.max()) if values.size else math.nan,
        n_pairs=int(values.size), n_replicates=len(R), level=float(level),
        strong_threshold=float(strong_threshold), min_effect=float(min_effect),
    )


def summarize_matrix(matrix, metric: str = "relative_transfer", **kw) -> TransferSummary:
    """`summarize` of one metric of a within-model `TransferMatrix` (one site per layer), with its resamples."""
    return summarize(matrix[metric], [s.layer for s in matrix.sources], matrix.sources[0].n_layers, metric,
                     matrix.replicates.get(metric), **kw)


@dataclass(frozen=True)
class SourceRow:
    """One source site of a within-model matrix, as `layerflow transfer` lists it."""

    hook_name: str
    own_explained_variance: Estimate  # the site's dictionary on its own site
    relative_transfer: Estimate  # mean over the other sites, entries clipped to BOUNDS
    beyond_persistence: Estimate  # mean over the other sites (a difference of two fractions: not clipped)
    decoder_top1_cosine: float  # mean over the other sites (decoder weights only: no interval)


def source_rows(matrix, level: float = defaults.INTERVAL_LEVEL) -> list[SourceRow]:
    """Per source site of a within-model matrix: its own EV and its means over the other sites."""
    n = len(matrix.sources)
    off = ~np.eye(n, dtype=bool)
    nan = np.full((n, n), np.nan)

    def row_mean(metric: str, i: int, clip: bool) -> Estimate:
        M, R = matrix.metrics.get(metric, nan), matrix.replicates.get(metric)
        if clip:
            M, R = np.clip(M, *BOUNDS), None if R is None else np.clip(R, *BOUNDS)
        mask = np.zeros((n, n), dtype=bool)
        mask[i] = off[i]
        return pairs_mean(M, R, mask, level)

    rows = []
    for i, site in enumerate(matrix.sources):
        own = matrix.metrics.get("explained_variance", nan)[i, i]
        low, high = (b[i, i] for b in matrix.intervals["explained_variance"]) if "explained_variance" in matrix.intervals \
            else (math.nan, math.nan)
        cosines = matrix.metrics.get("decoder_top1_cosine_mean", nan)[i][off[i]]
        rows.append(SourceRow(site.hook_name, Estimate(float(own), float(low), float(high)),
                              row_mean("relative_transfer", i, True), row_mean("transfer_beyond_persistence", i, False),
                              float(_nanmean(cosines, 0)) if cosines.size else math.nan))
    return rows


def pairs_mean(M: np.ndarray, replicates: np.ndarray | None, mask: np.ndarray,
               level: float = defaults.INTERVAL_LEVEL) -> Estimate:
    """The mean of M over the entries of `mask` (finite ones), with its interval from the resamples;
    not clipped (for figures such as transfer beyond persistence, a difference of two fractions)."""
    stack = np.concatenate([M[None], replicates if replicates is not None else np.empty((0, *M.shape))])
    return _estimates(_nanmean(np.where(mask & np.isfinite(M), stack, np.nan).reshape(len(stack), -1), -1), level)


# --- helpers: every one takes [1 + B, ...] stacks, the figure first ------------------------------------


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as they should
        return np.nanmean(x, axis=axis)


def _nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of resamples `samples[1:]` (NaN without any, or when one is NaN)."""
    if len(samples) < 2 or not np.isfinite(samples[1:]).all():
        return math.nan, math.nan
    low, high = percentile_interval(samples[1:], level)
    return float(low), float(high)


def _estimates(values: np.ndarray, level: float):
    """One Estimate per figure: `values` is [1 + B] (one figure) or [1 + B, k] (k of them)."""
    if values.ndim == 1:
        return Estimate(float(values[0]), *_bounds(values, level))
    return [Estimate(float(values[0, i]), *_bounds(values[:, i], level)) for i in range(values.shape[1])]


def _simultaneous(values: np.ndarray, level: float) -> list[Estimate]:
    """Max-|t| intervals for k figures at once ([1 + B, k]): value +- c se, with se the resamples' std per
    figure and c the `level` quantile of the largest |resample - value| / se over the figures."""
    point, reps = values[0], values[1:]
    ok = np.isfinite(point)
    if len(reps) < 2 or not ok.any() or not np.isfinite(reps[:, ok]).all():
        return [Estimate(float(v)) for v in point]
    se = reps[:, ok].std(0)
    se = np.where(se > 0, se, np.finfo(float).tiny)  # a figure that never moves: its interval is the point
    c = float(np.quantile((np.abs(reps[:, ok] - point[ok]) / se).max(1), level))
    out, k = [], 0
    for i, v in enumerate(point):
        if ok[i]:
            out.append(Estimate(float(v), float(v - c * se[k]), float(v + c * se[k])))
            k += 1
        else:
            out.append(Estimate(float(v)))
    return out


def _break_sizes(chain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(trend [1 + B], break sizes [1 + B, links]) of adjacent-link chains (module docstring)."""
    stacks, m = chain.shape
    if m < 3:
        return np.full(stacks, np.nan), np.full((stacks, m), np.nan)
    trend = _nanmedian(np.diff(chain, axis=1), 1)
    flat = chain - trend[:, None] * np.arange(m)
    left = np.concatenate([np.full((stacks, 1), np.nan), flat[:, :-1] - flat[:, 1:]], 1)  # previous link's drop to k
    right = np.concatenate([flat[:, 1:] - flat[:, :-1], np.full((stacks, 1), np.nan)], 1)  # next link's drop to k
    return trend, np.fmin(left, right)  # fmin: the one neighbour at the ends


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y on x per stack row, over the entries where both are finite."""
    x = np.broadcast_to(x, y.shape).reshape(len(y), -1)
    y = y.reshape(len(y), -1)
    w = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(w, x, 0.0), np.where(w, y, 0.0)
    count = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm, ym = xs.sum(1) / count, ys.sum(1) / count
        dx = np.where(w, x - xm[:, None], 0.0)
        var = (dx * dx).sum(1)
        slope = (dx * np.where(w, y - ym[:, None], 0.0)).sum(1) / var
    return np.where(var > 1e-12, slope, np.nan)


def _verdict(u: Estimate) -> str:
    if u.low >= UNIVERSAL_AT:
        return "universal"
    if u.high < SPECIALISED_BELOW:
        return "specialised"
    if u.low >= SPECIALISED_BELOW and u.high < UNIVERSAL_AT:
        return "intermediate"
    return "not resolved"


def _validated(M, layers, n_layers, replicates) -> tuple[np.ndarray, list[int], np.ndarray]:
    try:
        M = np.asarray(M, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise LayerflowError(f"The transfer matrix must be numeric ({e}).") from None
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise LayerflowError(f"The transfer matrix must be square [n, n] (sources x targets); got shape {M.shape}.")
    n = M.shape[0]
    if n < 2:
        raise LayerflowError(f"Cross-layer summaries need at least 2 layers; the matrix is {n} x {n}.")
    try:
        layers = [operator.index(layer) for layer in layers]
    except TypeError:
        raise LayerflowError(f"layers must be integer layer indices; got {list(layers)}.") from None
    if len(layers) != n:
        raise LayerflowError(f"layers has {len(layers)} entries {layers} but the matrix is {n} x {n}: "
                             "give one layer per row.")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise LayerflowError(f"layers must be strictly increasing (sorted, no duplicates); got {layers}.")
    outside = [layer for layer in layers if not 0 <= layer < n_layers]
    if outside:
        raise LayerflowError(f"Layer {outside[0]} is outside [0, {n_layers}) for a model with n_layers={n_layers}.")
    R = np.empty((0, n, n)) if replicates is None else np.asarray(replicates, dtype=np.float64)
    if R.ndim != 3 or R.shape[1:] != (n, n):
        raise LayerflowError(f"replicates must be [B, {n}, {n}] (resampled matrices); got shape {R.shape}.")
    return M, layers, R
