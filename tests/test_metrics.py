"""Reconstruction metrics against planted cases, an independent two-pass computation, and SAELens."""

import pytest
import torch
from sae_lens.evals import ExplainedVarianceCalculator

from layerflow.metrics import ReconstructionStats, reconstruction_metrics


def _activations(n=2000, d=16, mean=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 3.0, d)
    return mean + torch.randn(n, d, generator=g) * scales


def test_perfect_reconstruction_has_fvu_zero():
    x = _activations()
    assert reconstruction_metrics(x, x.clone()).fvu == pytest.approx(0.0, abs=1e-12)


def test_mean_predictor_has_fvu_one():
    x = _activations()
    m = reconstruction_metrics(x, x.mean(0, keepdim=True).expand_as(x))
    assert m.fvu == pytest.approx(1.0, abs=1e-9)
    # variance around zero (SAELens before #659) would call this a good reconstruction
    around_zero = 1 - m.mse / x.double().pow(2).sum(-1).mean().item()
    assert around_zero > 0.7


@pytest.mark.parametrize("c", [0.5, 0.8, 1.3])
def test_scaled_reconstruction(c):
    x = _activations().double()  # float64 so that c * x is exact to the tolerance below
    m = reconstruction_metrics(x, c * x)
    assert m.l2_ratio == pytest.approx(c, rel=1e-9)
    assert m.relative_reconstruction_bias == pytest.approx(c, rel=1e-9)
    x64 = x.double()
    expected_fvu = ((1 - c) ** 2 * x64.pow(2).sum(-1).mean() / (x64 - x64.mean(0)).pow(2).sum(-1).mean()).item()
    assert m.fvu == pytest.approx(expected_fvu, rel=1e-9)


def test_streaming_equals_two_pass_with_large_mean():
    x = _activations(n=3000, mean=1e3)  # cancellation-prone: variance is tiny next to E||x||^2
    x_hat = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    stats = ReconstructionStats()
    for chunk_x, chunk_hat in zip(x.split(512), x_hat.split(512)):  # uneven last batch
        stats.add(chunk_x, chunk_hat)
    x64, h64 = x.double(), x_hat.double()
    two_pass = ((x64 - h64).pow(2).sum(-1).mean() / (x64 - x64.mean(0)).pow(2).sum(-1).mean()).item()
    assert stats.compute().fvu == pytest.approx(two_pass, rel=1e-6)


def test_matches_sae_lens_explained_variance():
    x = _activations(n=1500)
    x_hat = 0.9 * x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    theirs = ExplainedVarianceCalculator()
    ours = ReconstructionStats()
    for cx, ch in zip(x.split(400), x_hat.split(400)):
        theirs.add_batch(ch, cx)
        ours.add(cx, ch)
    assert ours.compute().explained_variance == pytest.approx(theirs.compute(), rel=1e-6)


def test_sparsity_metrics_on_planted_latents():
    n, d_sae = 1000, 8
    latents = torch.zeros(n, d_sae)
    latents[:, 0] = 1.0  # fires everywhere: dense
    latents[: n // 20, 1] = 2.0  # fires on 5%: neither dense nor dead
    latents[: n // 5, 2] = 0.5  # fires on 20%: dense
    # latents 3..7 never fire: dead
    x = _activations(n=n)
    m = reconstruction_metrics(x, x, latents)
    assert m.l0 == pytest.approx(1 + 0.05 + 0.2)
    assert m.dead_fraction == pytest.approx(5 / 8)
    assert m.dense_fraction == pytest.approx(2 / 8)


def test_bootstrap_from_group_sums_equals_recomputing_on_the_resampled_tokens():
    # Each replicate draws whole groups with replacement; the figure from the reweighted per-group
    # sums must equal the figure computed on the tokens of the drawn groups, duplicates included.
    from layerflow.metrics import InputSums, ReconstructionStats, reconstruction_metrics

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * 3 + 5  # a large mean, as in the residual stream
    x_hat = x + torch.randn(600, 8, generator=g)
    groups = torch.arange(600) // 50
    stats = ReconstructionStats()
    for c in range(0, 600, 256):  # batches that cut across groups
        stats.add(x[c:c + 256], x_hat[c:c + 256], x_sums=InputSums.of(x[c:c + 256], groups[c:c + 256], 12))
    draws = torch.randint(12, (5, 12), generator=g)
    counts = torch.stack([torch.bincount(row, minlength=12) for row in draws])
    boot, boot_mse = stats.bootstrap(counts), stats.bootstrap_mse(counts)
    for b in range(5):
        rows = torch.cat([torch.arange(k * 50, k * 50 + 50).repeat(int(counts[b, k])) for k in range(12)])
        again = reconstruction_metrics(x[rows], x_hat[rows])
        deviation = (x[rows].double() - x.double().mean(0)).square().sum(-1).mean()  # around the full sample's mean
        assert boot[b].item() == pytest.approx(1 - again.mse / deviation.item(), abs=1e-12)
        assert boot_mse[b].item() == pytest.approx(again.mse, rel=1e-12)
    assert stats.bootstrap(torch.ones(1, 12))[0].item() == pytest.approx(stats.compute().explained_variance, abs=1e-12)


def test_resample_gives_l0_and_l2_ratio_of_the_resampled_tokens():
    from layerflow.metrics import InputSums, ReconstructionStats, reconstruction_metrics

    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g) * 3 + 5
    x_hat = x * 0.8 + torch.randn(600, 8, generator=g)
    latents = torch.relu(torch.randn(600, 16, generator=g) - 0.5)  # a different number of latents on each token
    groups = torch.arange(600) // 50
    stats = ReconstructionStats()
    for c in range(0, 600, 256):
        rows = slice(c, c + 256)
        stats.add(x[rows], x_hat[rows], latents[rows], x_sums=InputSums.of(x[rows], groups[rows], 12))
    counts = torch.stack([torch.bincount(row, minlength=12) for row in torch.randint(12, (4, 12), generator=g)])
    resampled = stats.resample(counts)
    assert "dead_fraction" not in resampled  # never-seen latents cannot be resampled (see `resample`)
    for b in range(4):
        rows = torch.cat([torch.arange(k * 50, k * 50 + 50).repeat(int(counts[b, k])) for k in range(12)])
        again = reconstruction_metrics(x[rows], x_hat[rows], latents[rows])
        assert resampled["l0"][b].item() == pytest.approx(again.l0, rel=1e-12)
        assert resampled["l2_ratio"][b].item() == pytest.approx(again.l2_ratio, rel=1e-12)
        assert resampled["mse"][b].item() == pytest.approx(again.mse, rel=1e-12)


def test_median_centred_resamples_keep_their_spread_around_the_figure():
    import numpy as np

    from layerflow.metrics import median_centred, percentile_interval

    rng = np.random.default_rng(0)
    figure = np.array([[0.62, np.nan], [0.3, 0.99]])
    resamples = figure - 0.02 + rng.normal(0, 0.005, (200, 2, 2))  # all to one side, as a thresholded count's are
    low, high = percentile_interval(resamples, 0.95)
    assert (high[[0, 1, 1], [0, 0, 1]] < figure[[0, 1, 1], [0, 0, 1]]).all()  # the figure outside its own interval
    centred = median_centred(resamples, figure, (0, 1))
    low, high = percentile_interval(centred, 0.95)
    ok = np.isfinite(figure)
    assert (low[ok] < figure[ok]).all() and (figure[ok] < high[ok]).all() and np.isnan(low[0, 1])
    assert np.nanmedian(centred, 0)[0, 0] == pytest.approx(0.62) and np.nanmax(centred) <= 1.0
    assert np.std(centred[:, 0, 0]) == pytest.approx(np.std(resamples[:, 0, 0]))


def test_variance_concentration_finds_the_few_tokens_fvu_measures():
    """Planted: 999 ordinary tokens and one 80x larger (an attention sink). An SAE that reconstructs
    only the sink's direction gets a good FVU; the concentration says why, and FVU without the sink
    is what it is on the ordinary tokens."""
    from layerflow.metrics import variance_concentration

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 32, generator=g, dtype=torch.float64)
    even = variance_concentration(x)
    assert 0.01 < even < 0.03  # the top 1% of a Gaussian cloud: a little above 1%
    x[7] = 0
    x[7, 0] = 80 * x.norm(dim=-1).median()
    sink_only = torch.zeros_like(x)
    sink_only[:, 0] = x[:, 0]  # reconstructs dimension 0 exactly, nothing else
    fvu = lambda a, b: ((a - b).square().sum() / (a - a.mean(0)).square().sum()).item()  # noqa: E731
    assert fvu(x, sink_only) < 0.5 < fvu(torch.cat([x[:7], x[8:]]), torch.cat([sink_only[:7], sink_only[8:]]))
    assert variance_concentration(x) > 0.5
