"""Transfer-matrix summaries: invariants on random matrices, planted structures, bands, bad input."""

import json
import math

import numpy as np
import pytest

from layerflow.errors import LayerflowError
from layerflow.transfer.summary import BANDS, band, band_matrix, summarize

pytestmark = pytest.mark.filterwarnings("error")  # no "mean of empty slice" on NaN-heavy input

LAYERS, N_LAYERS = [0, 6, 12, 17, 23, 29], 30  # non-contiguous and unevenly spaced, as in a real sweep


def random_case(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(3, 40))
    n = int(rng.integers(2, min(n_layers, 12) + 1))
    layers = sorted(rng.choice(n_layers, n, replace=False).tolist())
    M = rng.uniform(-0.3, 1.1, (n, n))
    M[rng.random((n, n)) < rng.uniform(0, 0.5)] = np.nan
    if seed % 4 == 0:
        M[rng.integers(n)] = np.nan  # a source never computed
    return M, layers, n_layers


def off_diagonal(M, layers):
    """(value, distance) of every finite off-diagonal entry, by brute force."""
    return [(M[i, j], abs(layers[i] - layers[j])) for i in range(len(M)) for j in range(len(M))
            if i != j and np.isfinite(M[i, j])]


def block_matrix(boundary, n=6, seed=0, inside=(0.75, 0.95), across=(0.05, 0.25)):
    rng = np.random.default_rng(seed)
    first = np.arange(n) < boundary
    same = np.equal.outer(first, first)
    return np.where(same, rng.uniform(*inside, (n, n)), rng.uniform(*across, (n, n)))


@pytest.mark.parametrize("seed", range(16))
def test_invariants_on_random_matrices(seed):
    M, layers, n_layers = random_case(seed)
    s = summarize(M, layers=layers, n_layers=n_layers, metric="relative_transfer")
    entries = off_diagonal(M, layers)

    if entries:
        assert s.min <= s.mean <= s.max
        assert s.mean == pytest.approx(np.mean([v for v, _ in entries]))
    else:
        assert math.isnan(s.mean) and math.isnan(s.min) and math.isnan(s.max)
    np.testing.assert_array_equal(s.diagonal, np.diag(M))
    assert sum(s.band_counts.values()) == len(entries)
    assert list(s.band_counts) == [name for _, name in BANDS]

    by_distance = {}
    for v, d in entries:
        by_distance.setdefault(d, []).append(v)
    assert [p.distance for p in s.distance_decay] == sorted(by_distance)
    assert sum(p.n_pairs for p in s.distance_decay) == len(entries)
    for p in s.distance_decay:
        assert p.distance >= 1 and p.std >= 0
        assert p.min <= p.mean <= p.max
        assert p.n_pairs == len(by_distance[p.distance])
        assert p.mean == pytest.approx(np.mean(by_distance[p.distance]))
        assert p.std == pytest.approx(np.std(by_distance[p.distance]))  # population std

    n = len(layers)
    for i in range(n):
        out = [M[i, j] for j in range(n) if j != i and np.isfinite(M[i, j])]
        into = [M[j, i] for j in range(n) if j != i and np.isfinite(M[j, i])]
        assert s.universality[i] == pytest.approx(np.mean(out) if out else math.nan, nan_ok=True)
        assert s.universality_incoming[i] == pytest.approx(np.mean(into) if into else math.nan, nan_ok=True)

    if len(by_distance) >= 2:
        slope = np.polyfit([d for _, d in entries], [v for v, _ in entries], 1)[0]
        assert s.decay_rate == pytest.approx(-slope)
    else:
        assert math.isnan(s.decay_rate)

    strong = [(layers[a], layers[b]) for a in range(n) for b in range(a + 1, n)
              if M[a, b] >= 0.7 and M[b, a] >= 0.7]
    assert [(p.layer_a, p.layer_b) for p in s.bidirectional_pairs] == strong
    assert all(p.forward == M[layers.index(p.layer_a), layers.index(p.layer_b)] for p in s.bidirectional_pairs)

    finite_u = [u for u in s.universality if math.isfinite(u)]
    for hub in s.hub_layers:
        assert s.universality[layers.index(hub)] > np.mean(finite_u)
    assert s.relative_depth == pytest.approx([layer / (n_layers - 1) for layer in layers])
    assert all(0 <= r <= 1 for r in s.relative_depth)
    if s.divergence_layer is not None:
        assert s.divergence_layer in layers[1:]
        assert s.divergence_depth == pytest.approx(s.divergence_layer / (n_layers - 1))

    text = json.dumps(s.to_dict(), allow_nan=False)  # NaN -> null; every field serializable
    assert json.loads(text)["layers"] == layers


@pytest.mark.parametrize("hub", range(6))
def test_one_hub_row_among_low_values_is_the_only_hub(hub):
    rng = np.random.default_rng(hub)
    M = rng.uniform(0.1, 0.35, (6, 6))
    M[hub] = rng.uniform(0.8, 0.95, 6)
    M[hub, (hub + 1) % 6] = np.nan  # an uncomputed entry in the hub's row changes nothing
    np.fill_diagonal(M, 1.0)
    s = summarize(M, LAYERS, N_LAYERS, "m")
    assert s.hub_layers == [LAYERS[hub]]
    assert int(np.nanargmax(s.universality)) == hub


def test_a_hub_must_transfer_strongly_not_just_best():
    M = np.full((6, 6), 0.1)
    M[2] = 0.6  # stands out, but below the strong threshold
    assert summarize(M, LAYERS, N_LAYERS, "m").hub_layers == []
    assert summarize(M, LAYERS, N_LAYERS, "m", strong_threshold=0.55).hub_layers == [LAYERS[2]]


def test_hub_fraction_counts_the_strongly_explained_layers():
    M = np.full((6, 6), 0.2)
    M[4, [0, 1]] = 0.9  # strong to 2 of the other 5 layers
    assert summarize(M, LAYERS, N_LAYERS, "m", hub_fraction=0.5).hub_layers == []
    assert summarize(M, LAYERS, N_LAYERS, "m", hub_fraction=0.4).hub_layers == [LAYERS[4]]


@pytest.mark.parametrize("boundary", range(1, 6))
def test_block_diagonal_diverges_at_the_block_boundary(boundary):
    s = summarize(block_matrix(boundary, seed=boundary), LAYERS, N_LAYERS, "m")
    assert s.divergence_layer == LAYERS[boundary]
    assert s.divergence_depth == pytest.approx(LAYERS[boundary] / (N_LAYERS - 1))


def test_block_diagonal_bidirectional_pairs_are_the_strong_within_block_pairs():
    M = block_matrix(3, inside=(0.85, 0.85), across=(0.15, 0.15))
    M[2, 0] = 0.65  # one direction of a within-block pair below the threshold: pair (0, 12) drops out
    M[3, 5] = M[5, 3] = 0.7  # exactly at the threshold: kept
    s = summarize(M, LAYERS, N_LAYERS, "m")
    pairs = [(p.layer_a, p.layer_b, p.forward, p.backward) for p in s.bidirectional_pairs]
    assert pairs == [(0, 6, 0.85, 0.85), (6, 12, 0.85, 0.85),
                     (17, 23, 0.85, 0.85), (17, 29, 0.7, 0.7), (23, 29, 0.85, 0.85)]
    assert s.divergence_layer == 17


def test_exponential_decay_is_measured_in_model_layers():
    L = np.array(LAYERS)
    D = np.abs(L[:, None] - L[None, :])
    s = summarize(np.exp(-D / 5), LAYERS, N_LAYERS, "m")
    expected = sorted({abs(a - b) for a in LAYERS for b in LAYERS if a != b})
    assert [p.distance for p in s.distance_decay] == expected
    for p in s.distance_decay:
        assert p.mean == pytest.approx(math.exp(-p.distance / 5), rel=1e-12)
        assert p.min == p.max and p.std == pytest.approx(0, abs=1e-15)
        assert p.n_pairs == int(np.sum(D == p.distance))
    assert s.decay_rate > 0


@pytest.mark.parametrize("offset", [0.0, -0.4])
def test_decay_rate_recovers_an_exact_linear_decay(offset):
    L = np.array(LAYERS)
    M = offset + 0.95 - 0.03 * np.abs(L[:, None] - L[None, :])
    M[0, 3] = M[4, 1] = np.nan  # missing entries leave an exact fit exact
    s = summarize(M, LAYERS, N_LAYERS, "m")
    assert s.decay_rate == pytest.approx(0.03, abs=1e-6)


def test_pure_distance_decay_on_even_layers_has_no_divergence():
    layers = [0, 5, 10, 15, 20, 25]
    L = np.array(layers)
    s = summarize(np.exp(-np.abs(L[:, None] - L[None, :]) / 5), layers, 30, "m")
    assert s.divergence_layer is None and s.divergence_depth is None


@pytest.mark.parametrize("c", [0.05, 1 / 3, 0.1, 0.75, 0.95])
def test_flat_matrix_has_no_hubs_and_no_divergence(c):
    M = np.full((6, 6), c)
    np.fill_diagonal(M, 1.0)
    s = summarize(M, LAYERS, N_LAYERS, "m")
    assert s.hub_layers == []
    assert s.divergence_layer is None
    assert s.decay_rate == pytest.approx(0, abs=1e-12)
    assert s.min == s.mean == s.max == c
    assert len(s.bidirectional_pairs) == (15 if c >= 0.7 else 0)
    assert s.band_counts[band(c)] == 30


def test_rounding_sized_differences_do_not_stand_out():
    M = 0.8 + np.random.default_rng(0).uniform(-1e-12, 1e-12, (6, 6))
    M[2] += 1e-11  # a "hub" row and, below, a "drop" no bigger than rounding
    M[3, 4] -= 1e-11
    s = summarize(M, LAYERS, N_LAYERS, "m")
    assert s.hub_layers == [] and s.divergence_layer is None


@pytest.mark.parametrize("value, expected", [
    (1.2, "HIGH"), (0.9, "HIGH"), (0.8999, "MODERATE"), (0.6, "MODERATE"), (0.5999, "LOW"),
    (0.4, "LOW"), (0.3999, "SPECIALISED"), (-2.0, "SPECIALISED"), (math.nan, "N/A"), (math.inf, "N/A"),
])
def test_band_boundaries(value, expected):
    assert band(value) == expected


def test_band_matrix_bands_every_entry():
    M, _, _ = random_case(3)
    bands = band_matrix(M)
    assert len(bands) == len(M) and all(len(row) == len(M) for row in bands)
    assert all(bands[i][j] == band(M[i, j]) for i in range(len(M)) for j in range(len(M)))


def test_all_uncomputed_gives_nans_and_empty_lists():
    M = np.full((3, 3), np.nan)
    np.fill_diagonal(M, 1.0)
    s = summarize(M, [0, 1, 2], 3, "m")
    assert s.distance_decay == [] and s.hub_layers == [] and s.bidirectional_pairs == []
    assert math.isnan(s.decay_rate) and s.divergence_layer is None
    d = s.to_dict()
    assert d["mean"] is None and d["universality"] == [None, None, None] and d["diagonal"] == [1.0] * 3


@pytest.mark.parametrize("M, layers, n_layers, match", [
    (np.zeros((2, 3)), [0, 1], 4, r"square.*\(2, 3\)"),
    (np.zeros(4), [0, 1], 4, r"square.*\(4,\)"),
    (np.zeros((1, 1)), [0], 4, "at least 2 layers"),
    (np.zeros((3, 3)), [0, 1], 4, r"layers has 2 entries.*3 x 3"),
    (np.zeros((3, 3)), [0, 5, 3], 8, r"strictly increasing.*\[0, 5, 3\]"),
    (np.zeros((3, 3)), [0, 3, 3], 8, r"strictly increasing.*\[0, 3, 3\]"),
    (np.zeros((3, 3)), [0, 3, 30], 30, r"Layer 30 is outside \[0, 30\)"),
    (np.zeros((3, 3)), [-1, 3, 5], 30, r"Layer -1 is outside"),
    (np.zeros((3, 3)), [0, 1.5, 3], 30, r"integer.*1\.5"),
    ([["a", "b"], ["c", "d"]], [0, 1], 2, "numeric"),
])
def test_bad_input_is_a_layerflow_error(M, layers, n_layers, match):
    with pytest.raises(LayerflowError, match=match):
        summarize(M, layers, n_layers, "m")


def test_bad_hub_fraction():
    with pytest.raises(LayerflowError, match="hub_fraction.*0"):
        summarize(np.zeros((3, 3)), [0, 1, 2], 3, "m", hub_fraction=0)
