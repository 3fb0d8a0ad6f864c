"""Summaries of a layer-to-layer transfer matrix: universality, hubs, strong pairs, decay, divergence.

Input. `M` is a square [n, n] float array: M[i, j] is how well the dictionary (SAE) trained at
layer `layers[i]` explains layer `layers[j]` (source i, target j). `layers` are model layer
indices, strictly increasing, a subset of range(n_layers). Every summary reads M as
higher-is-better; for a lower-is-better metric (`delta_fvu`, `transfer_recon_ratio_inverse`) pass
-M, or hubs, strong pairs, bands and divergence read upside down.

Conventions.
- An entry is *computed* when it is finite. NaN ("not computed") and +-inf entries are ignored
  everywhere; a mean over no computed entries is NaN.
- The diagonal (each SAE on its own layer) is reported as `diagonal` and left out of every other
  summary: those use the off-diagonal entries, the ordered pairs (i, j) with i != j.
- Distance is counted in model layers, d(i, j) = |layers[i] - layers[j]|, not in positions in
  `layers`. Depth is relative: layers[i] / (n_layers - 1), 0 = first block, 1 = last.
- Standard deviations are population ones (ddof = 0).
- A value *stands out* among a set of values when it lies more than one standard deviation from
  their mean (the set includes the value itself): above the mean for hubs, below it for
  divergence. Values equal up to rounding (1e-9) never stand out, so a flat matrix has neither
  hubs nor a divergence. Two values alone never stand out either: each lies exactly one standard
  deviation from their mean.

Summaries, with t = strong_threshold (default 0.7, the notes' "strong") and f = hub_fraction
(default 0.5).
- universality[i]: the mean over j != i of M[i, j]. Outgoing: how well layer i's dictionary
  explains the other layers (the notes' "universality score").
- universality_incoming[i]: the mean over j != i of M[j, i]: how well the other layers'
  dictionaries explain layer i.
- hub_layers: the layers i that both
    (a) transfer strongly to many layers: M[i, j] >= t for at least a fraction f of the other
        layers j with a computed M[i, j], and
    (b) stand out: universality[i] exceeds the mean of all layers' universality by more than one
        standard deviation.
  (a) alone would make every layer of a uniformly high matrix a hub; (b) alone, the best of
  uniformly poor layers.
- bidirectional_pairs: the layer pairs a < b with M[a->b] >= t and M[b->a] >= t, shallowest
  first. `forward` is M[a->b] (the shallower dictionary on the deeper layer), `backward` M[b->a].
- distance_decay: for each distance d >= 1 with at least one computed entry, the number of
  entries at distance d (n_pairs; ordered pairs, both directions count) and their mean, std, min
  and max.
- decay_rate: minus the slope of the ordinary least-squares line of value against distance,
  fit to all computed off-diagonal entries (equivalently, to the decay curve's means weighted by
  n_pairs). In metric units per layer of distance; > 0 when transfer falls with distance; exactly
  r for M = c - r * d. NaN with fewer than two distinct distances.
- divergence_layer: where the layer-to-layer chain breaks. The links are the adjacent forward
  entries M[k, k+1] between consecutive entries of `layers` (the dictionary at one sampled layer
  on the next sampled layer). The divergence layer is layers[k+1] for the weakest computed link,
  if that link stands out below the others; ties go to the shallower link. None when no link
  stands out: links all alike (uniformly high or uniformly poor) or fewer than three of them.
  A steady decline of the links points at the last one. Unevenly spaced layers make links span
  different distances; the rule does not correct for that.
  divergence_depth is the relative depth of divergence_layer.
- band_counts: the number of computed off-diagonal entries in each band of BANDS (the notes'
  heatmap bands): HIGH >= 0.9, MODERATE [0.6, 0.9), LOW [0.4, 0.6), SPECIALISED < 0.4. Every band
  is listed, zero counts included.
- mean, min, max: over the computed off-diagonal entries.

`TransferSummary.to_dict()` writes NaN as None (JSON null), as `matrix.TransferMatrix` does.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass

import numpy as np

from layerflow.errors import LayerflowError
from layerflow.files import json_safe

BANDS = ((0.9, "HIGH"), (0.6, "MODERATE"), (0.4, "LOW"), (-math.inf, "SPECIALISED"))
NOT_AVAILABLE = "N/A"
_ROUNDING = 1e-9  # differences below this are rounding, not structure


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
class DecayPoint:
    distance: int  # |layer_a - layer_b| in model layers
    n_pairs: int  # computed entries at this distance, both directions
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class BidirectionalPair:
    layer_a: int  # the shallower layer
    layer_b: int
    forward: float  # M[a -> b]
    backward: float  # M[b -> a]


@dataclass(frozen=True)
class TransferSummary:
    metric: str
    layers: list[int]
    relative_depth: list[float]
    diagonal: list[float]
    universality: list[float]
    universality_incoming: list[float]
    hub_layers: list[int]
    bidirectional_pairs: list[BidirectionalPair]
    distance_decay: list[DecayPoint]
    decay_rate: float
    divergence_layer: int | None
    divergence_depth: float | None
    band_counts: dict[str, int]
    mean: float
    min: float
    max: float
    strong_threshold: float
    hub_fraction: float

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def summarize(M, layers, n_layers, metric, strong_threshold=0.7, hub_fraction=0.5) -> TransferSummary:
    """Every summary of the module docstring for one metric's [n, n] transfer matrix."""
    M, layers = _validated(M, layers, n_layers, hub_fraction)
    n, t = len(layers), strong_threshold
    computed = np.isfinite(M) & ~np.eye(n, dtype=bool)
    C = np.where(computed, M, np.nan)  # NaN compares False, so a left-out entry passes no test below
    distance = np.abs(np.subtract.outer(layers, layers))
    values, value_distances = M[computed], distance[computed]

    universality = [_mean(M[i, computed[i]]) for i in range(n)]
    incoming = [_mean(M[computed[:, i], i]) for i in range(n)]

    stands_out = _stands_out(np.array(universality), above=True)
    hubs = [layers[i] for i in range(n)
            if stands_out[i] and np.mean(C[i, computed[i]] >= t) >= hub_fraction]

    pairs = [BidirectionalPair(layers[a], layers[b], float(M[a, b]), float(M[b, a]))
             for a in range(n) for b in range(a + 1, n) if C[a, b] >= t and C[b, a] >= t]

    decay = []
    for d in np.unique(value_distances):
        v = values[value_distances == d]
        decay.append(DecayPoint(int(d), int(v.size), _mean(v), float(v.std()), float(v.min()), float(v.max())))

    decay_rate = math.nan
    if np.unique(value_distances).size >= 2:
        x = value_distances - value_distances.mean()
        decay_rate = -float(x @ (values - values.mean()) / (x @ x))

    links = np.array([C[k, k + 1] for k in range(n - 1)])
    divergence_layer = divergence_depth = None
    if _stands_out(links, above=False).any():
        divergence_layer = layers[int(np.nanargmin(links)) + 1]  # first minimum: ties go shallower
        divergence_depth = divergence_layer / (n_layers - 1)

    band_counts = {name: 0 for _, name in BANDS}
    for v in values:
        band_counts[band(v)] += 1

    return TransferSummary(
        metric=metric, layers=layers, relative_depth=[layer / (n_layers - 1) for layer in layers],
        diagonal=[float(v) for v in np.diag(M)], universality=universality, universality_incoming=incoming,
        hub_layers=hubs, bidirectional_pairs=pairs, distance_decay=decay, decay_rate=decay_rate,
        divergence_layer=divergence_layer, divergence_depth=divergence_depth, band_counts=band_counts,
        mean=_mean(values), min=float(values.min()) if values.size else math.nan,
        max=float(values.max()) if values.size else math.nan,
        strong_threshold=float(strong_threshold), hub_fraction=float(hub_fraction),
    )


def _mean(v: np.ndarray) -> float:
    if not v.size:
        return math.nan
    # The float mean of equal values can land one ulp outside them; keep min <= mean <= max.
    return float(np.clip(v.mean(), v.min(), v.max()))


def _stands_out(x: np.ndarray, above: bool) -> np.ndarray:
    """Which finite values lie more than one standard deviation above (or below) the finite values' mean."""
    finite = np.isfinite(x)
    out = np.zeros(x.shape, dtype=bool)
    if finite.any():
        mean, std = x[finite].mean(), x[finite].std()
        gap = x[finite] - mean if above else mean - x[finite]
        out[finite] = gap > std + _ROUNDING
    return out


def _validated(M, layers, n_layers, hub_fraction) -> tuple[np.ndarray, list[int]]:
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
    if not 0 < hub_fraction <= 1:
        raise LayerflowError(f"hub_fraction must be in (0, 1]; got {hub_fraction}.")
    return M, layers
