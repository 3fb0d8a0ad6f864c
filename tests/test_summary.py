"""Transfer-matrix summaries: invariants on random matrices, planted structures, bands, bad input."""

import json
import math

import numpy as np
import pytest

from layerflow.errors import LayerflowError
from layerflow.transfer.summary import BANDS, BOUNDS, band, band_matrix, pairs_mean, summarize

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


def noisy(M, sd, rng, b=200):
    """Resampling noise: the figure observed with noise, and B resamples scattered around it the same way."""
    return M[None] + rng.normal(0, sd, (b, *np.shape(M)))


def observed_with_replicates(truth, sd, seed, b=200):
    """A planted matrix observed with sampling noise, and bootstrap-like resamples of the observation."""
    rng = np.random.default_rng(seed)
    observed = truth + rng.normal(0, sd, truth.shape)
    return observed, noisy(observed, sd, rng, b)


def decay(n=30, rate=0.03):
    d = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    return 1 - rate * d


@pytest.mark.parametrize("seed", range(16))
def test_invariants_on_random_matrices(seed):
    M, layers, n_layers = random_case(seed)
    rng = np.random.default_rng(seed)
    R = noisy(M, 0.02, rng, 50)
    s = summarize(M, layers=layers, n_layers=n_layers, metric="relative_transfer", replicates=R)
    entries = off_diagonal(M, layers)
    clip = lambda v: np.clip(v, *BOUNDS)  # noqa: E731

    if entries:
        assert s.min <= s.median <= s.max
        assert s.mean.value == pytest.approx(np.mean([clip(v) for v, _ in entries]))
        assert s.median == pytest.approx(np.median([v for v, _ in entries]))
    else:
        assert math.isnan(s.mean.value) and math.isnan(s.min) and math.isnan(s.max)
    np.testing.assert_array_equal(s.diagonal, np.diag(M))
    assert sum(s.band_counts.values()) == len(entries) == s.n_pairs
    assert list(s.band_counts) == [name for _, name in BANDS]

    by_distance = {}
    for v, d in entries:
        by_distance.setdefault(d, []).append(v)
    assert [p.distance for p in s.distance_decay] == sorted(by_distance)
    for p in s.distance_decay:
        assert p.n_pairs == len(by_distance[p.distance]) and p.min <= p.max
        assert p.mean.value == pytest.approx(np.mean(clip(by_distance[p.distance])))
        assert p.std == pytest.approx(np.std(by_distance[p.distance]))  # population std

    n = len(layers)
    for i in range(n):
        out = [clip(M[i, j]) for j in range(n) if j != i and np.isfinite(M[i, j])]
        into = [clip(M[j, i]) for j in range(n) if j != i and np.isfinite(M[j, i])]
        assert s.universality[i].value == pytest.approx(np.mean(out) if out else math.nan, nan_ok=True)
        assert s.universality_incoming[i].value == pytest.approx(np.mean(into) if into else math.nan, nan_ok=True)
        # the interval is the resamples' percentiles of the same figure, computed independently here
        rows = [[clip(R[r, i, j]) for j in range(n) if j != i and np.isfinite(M[i, j])] for r in range(len(R))]
        if out:
            low, high = np.quantile([np.mean(x) for x in rows], [0.025, 0.975])
            assert (s.universality[i].low, s.universality[i].high) == pytest.approx((low, high))

    if len(by_distance) >= 2:
        slope = np.polyfit([d for _, d in entries], [clip(v) for v, _ in entries], 1)[0]
        assert s.decay_rate.value == pytest.approx(-slope)
    else:
        assert math.isnan(s.decay_rate.value)

    lows = np.quantile(R, 0.025, axis=0)
    strong = [(layers[a], layers[b]) for a in range(n) for b in range(a + 1, n)
              if lows[a, b] >= 0.7 and lows[b, a] >= 0.7]
    assert [(p.layer_a, p.layer_b) for p in s.bidirectional_pairs] == strong
    point = [(layers[a], layers[b]) for a in range(n) for b in range(a + 1, n) if M[a, b] >= 0.7 and M[b, a] >= 0.7]
    assert s.strong_pairs_unresolved == len(set(point) - set(strong))
    for hub in s.hub_layers:
        e = s.hub_excess[layers.index(hub)]
        assert e.value >= s.min_effect and e.low > 0
    assert s.relative_depth == pytest.approx([layer / (n_layers - 1) for layer in layers])
    if s.divergence_layer is not None:
        assert s.divergence_layer in s.breaks and s.divergence_layer in layers[1:]
        assert s.divergence_depth == pytest.approx(s.divergence_layer / (n_layers - 1))

    text = json.dumps(s.to_dict(), allow_nan=False)  # NaN -> null; every field serializable
    assert json.loads(text)["layers"] == layers


# --- planted structures, each observed with sampling noise and resampled ---------------------------


@pytest.mark.parametrize("seed", range(5))
def test_a_pure_distance_decay_has_no_hub_though_middle_layers_are_most_universal(seed):
    M, R = observed_with_replicates(decay(), 0.01, seed)
    s = summarize(M, list(range(30)), 30, "m", R)
    assert s.hub_layers == []
    # the old rule's artefact is there to be fooled by: middle layers have the highest plain universality
    assert 10 <= int(np.argmax([u.value for u in s.universality])) <= 19
    assert s.decay_rate.low > 0.025 and s.decay_rate.high < 0.035  # the planted rate, 0.03 per layer


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hub", [3, 12, 26])
def test_a_planted_hub_is_found_and_only_it(seed, hub):
    truth = decay()
    truth[hub] = np.minimum(truth[hub] + 0.15, 1)  # layer `hub` transfers better than its distances predict
    M, R = observed_with_replicates(truth, 0.01, seed)
    s = summarize(M, list(range(30)), 30, "m", R)
    assert s.hub_layers == [hub]
    assert s.hub_excess[hub].low > 0.05


def chain(links, n=30, rest=0.3):
    M = np.full((n, n), rest)
    np.fill_diagonal(M, 1.0)
    for k, v in enumerate(links):
        M[k, k + 1] = v
    return M


@pytest.mark.parametrize("seed", range(5))
def test_a_steady_decline_of_the_links_is_no_divergence(seed):
    truth = chain(0.95 - 0.01 * np.arange(29))  # 0.95, 0.94, ... : the notes' rule called the last link a divergence
    M, R = observed_with_replicates(truth, 0.005, seed)
    s = summarize(M, list(range(30)), 30, "m", R)
    assert s.breaks == [] and s.divergence_layer is None
    assert s.link_trend == pytest.approx(-0.01, abs=0.003)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("at", [1, 11, 28])
def test_a_planted_break_is_found_anywhere_in_the_chain(seed, at):
    links = 0.95 - 0.01 * np.arange(29)
    links[at] -= 0.4  # layer at + 1 is not explained by layer at's dictionary
    M, R = observed_with_replicates(chain(links), 0.005, seed)
    s = summarize(M, list(range(30)), 30, "m", R)
    assert s.breaks == [at + 1] and s.divergence_layer == at + 1


def test_without_resamples_nothing_is_claimed():
    truth = decay()
    truth[12] = np.minimum(truth[12] + 0.15, 1)
    s = summarize(truth, list(range(30)), 30, "m")
    assert s.hub_layers == [] and s.breaks == [] and s.bidirectional_pairs == []
    assert set(s.verdicts) == {"not resolved"} and s.n_replicates == 0
    assert s.hub_excess[12].value > 0.1 and math.isnan(s.hub_excess[12].low)  # the figure is still there


def test_negative_entries_do_not_dominate_the_averages():
    # the default run's old failure: a few entries far below zero made every layer "specialised"
    M = np.full((6, 6), 0.8)
    np.fill_diagonal(M, 1.0)
    M[0, 5] = M[5, 0] = -4.0
    R = noisy(M, 0.01, np.random.default_rng(0))
    s = summarize(M, LAYERS, N_LAYERS, "m", R)
    assert s.mean.value == pytest.approx((28 * 0.8) / 30)
    assert np.mean(M[~np.eye(6, dtype=bool)]) < 0.5  # what the plain mean says
    assert s.verdicts[1:5] == ["universal"] * 4


def test_universal_and_specialised_need_the_whole_interval():
    M = np.full((4, 4), 0.62)
    M[1] = 0.3
    M[2] = 0.5
    np.fill_diagonal(M, 1.0)
    s = summarize(M, [0, 1, 2, 3], 4, "m", noisy(M, 0.01, np.random.default_rng(1)))
    assert s.verdicts[:3] == ["universal", "specialised", "intermediate"]
    wide = summarize(M, [0, 1, 2, 3], 4, "m", noisy(M, 0.2, np.random.default_rng(1)))
    assert wide.verdicts[0] == "not resolved"  # 0.62, but its interval reaches below 0.6


def test_pairs_mean_is_unclipped_with_its_interval():
    M = np.array([[0.0, -0.5], [0.25, 0.0]])
    R = noisy(M, 0.01, np.random.default_rng(2), 100)
    e = pairs_mean(M, R, ~np.eye(2, dtype=bool))
    assert e.value == pytest.approx(-0.125)
    assert (e.low, e.high) == pytest.approx(tuple(np.quantile(R[:, [0, 1], [1, 0]].mean(1), [0.025, 0.975])))


def test_source_rows_clip_relative_transfer_but_not_the_difference():
    from layerflow.models.sites import site_at
    from layerflow.transfer.matrix import TransferMatrix
    from layerflow.transfer.summary import source_rows

    rng = np.random.default_rng(3)
    rel = np.array([[1.0, -4.0, 0.6], [0.7, 1.0, 1.3], [0.2, 0.5, 1.0]])
    beyond = np.array([[0.0, -0.3, 0.1], [0.2, 0.0, -0.1], [0.0, 0.05, 0.0]])
    ev = np.diag([0.9, 0.8, 0.7])
    sites = [site_at("m", f"blocks.{i}.hook_resid_post", i, 3) for i in range(3)]
    R = {"relative_transfer": noisy(rel, 0.02, rng, 100), "transfer_beyond_persistence": noisy(beyond, 0.02, rng, 100)}
    m = TransferMatrix("within_model", sites, sites, {"relative_transfer": rel, "transfer_beyond_persistence": beyond,
                                                      "explained_variance": ev, "decoder_top1_cosine_mean": rel},
                       intervals={"explained_variance": (ev - 0.01, ev + 0.01)}, replicates=R)
    rows = source_rows(m)
    assert [r.relative_transfer.value for r in rows] == pytest.approx([0.3, 0.85, 0.35])  # -4 counts as 0, 1.3 as 1
    assert [r.beyond_persistence.value for r in rows] == pytest.approx([-0.1, 0.05, 0.025])  # not clipped
    clipped = np.clip(R["relative_transfer"][:, 0, 1:], 0, 1).mean(1)
    assert (rows[0].relative_transfer.low, rows[0].relative_transfer.high) == pytest.approx(
        tuple(np.quantile(clipped, [0.025, 0.975])))
    assert rows[2].own_explained_variance.low == pytest.approx(0.69) and rows[1].decoder_top1_cosine == pytest.approx(1.0)


@pytest.mark.parametrize("c", [0.05, 1 / 3, 0.75, 0.95])
def test_flat_matrix_has_no_hubs_and_no_divergence(c):
    M = np.full((6, 6), c)
    np.fill_diagonal(M, 1.0)
    s = summarize(M, LAYERS, N_LAYERS, "m", noisy(M, 0.005, np.random.default_rng(0)))
    assert s.hub_layers == [] and s.divergence_layer is None
    assert s.decay_rate.value == pytest.approx(0, abs=1e-12)
    assert s.min == s.max == c and s.mean.value == pytest.approx(c)
    assert len(s.bidirectional_pairs) == (15 if c >= 0.75 else 0)
    assert s.band_counts[band(c)] == 30


@pytest.mark.parametrize("boundary", range(2, 5))
def test_block_diagonal_breaks_at_the_block_boundary(boundary):
    M, R = observed_with_replicates(block_matrix(boundary, inside=(0.85, 0.85), across=(0.15, 0.15)), 0.01, boundary)
    s = summarize(M, LAYERS, N_LAYERS, "m", R)
    assert s.divergence_layer == LAYERS[boundary]
    assert s.divergence_depth == pytest.approx(LAYERS[boundary] / (N_LAYERS - 1))


def test_exponential_decay_is_measured_in_model_layers():
    L = np.array(LAYERS)
    D = np.abs(L[:, None] - L[None, :])
    s = summarize(np.exp(-D / 5), LAYERS, N_LAYERS, "m")
    expected = sorted({abs(a - b) for a in LAYERS for b in LAYERS if a != b})
    assert [p.distance for p in s.distance_decay] == expected
    for p in s.distance_decay:
        assert p.mean.value == pytest.approx(math.exp(-p.distance / 5), rel=1e-12)
        assert p.n_pairs == int(np.sum(D == p.distance))
    assert s.decay_rate.value > 0


def test_decay_rate_recovers_an_exact_linear_decay():
    L = np.array(LAYERS)
    M = 0.95 - 0.03 * np.abs(L[:, None] - L[None, :])
    M[0, 3] = M[4, 1] = np.nan  # missing entries leave an exact fit exact
    assert summarize(M, LAYERS, N_LAYERS, "m").decay_rate.value == pytest.approx(0.03, abs=1e-9)


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
    s = summarize(M, [0, 1, 2], 3, "m", noisy(M, 0.01, np.random.default_rng(0)))
    assert s.distance_decay == [] and s.hub_layers == [] and s.bidirectional_pairs == []
    assert math.isnan(s.decay_rate.value) and s.divergence_layer is None
    d = s.to_dict()
    assert d["mean"]["value"] is None and [u["value"] for u in d["universality"]] == [None] * 3
    assert d["diagonal"] == [1.0] * 3


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


def test_replicates_of_another_shape_are_refused():
    with pytest.raises(LayerflowError, match=r"replicates must be \[B, 3, 3\].*\(5, 2, 3\)"):
        summarize(np.zeros((3, 3)), [0, 1, 2], 3, "m", np.zeros((5, 2, 3)))
