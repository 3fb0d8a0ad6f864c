"""Feature matching: brute force on small problems, planted correspondences, an independent correlation."""

import itertools
import json

import numpy as np
import pytest
import torch

from layerflow.metrics import reconstruction_metrics
from layerflow.testing import planted_layers, true_sae
from layerflow.transfer.calibration import Calibration
from layerflow.transfer.coder import LinearCoder
from layerflow.transfer.within import feature_flow
from layerflow.transfer.matching import (
    null_shift,
    resampled_fraction,
    ActivationCorrelation,
    FeatureMatching,
    decoder_top1_cosine,
    match_activations,
    match_decoders,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _recovery(m: FeatureMatching, truth: dict[int, int]) -> float:
    got = dict(zip(m.source_index.tolist(), m.target_index.tolist()))
    return float(np.mean([got.get(s) == t for s, t in truth.items()]))


def _significant(m: FeatureMatching) -> dict[int, bool]:
    return dict(zip(m.source_index.tolist(), m.significant.tolist()))


@pytest.mark.parametrize("chunk", [3, 4096])
def test_decoder_top1_cosine_is_brute_force_max(chunk):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 5, generator=g) * torch.rand(10, 1, generator=g) * 5  # rows of any norm
    b = torch.randn(7, 5, generator=g)
    brute = (_unit(a) @ _unit(b).T).max(1).values
    top1 = decoder_top1_cosine(torch.nn.Parameter(a), b, chunk=chunk)
    assert top1.shape == (10,) and not top1.requires_grad
    torch.testing.assert_close(top1, brute, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fa,fb", [(6, 6), (4, 6), (7, 5), (7, 7)])
def test_match_decoders_is_the_best_one_to_one_assignment(fa, fb):
    g = torch.Generator().manual_seed(fa * 10 + fb)
    a, b = torch.randn(fa, 4, generator=g), torch.randn(fb, 4, generator=g)
    cos = (_unit(a.double()) @ _unit(b.double()).T).numpy()
    if fa <= fb:  # every row of A gets a distinct row of B
        best = max(cos[np.arange(fa), list(p)].sum() for p in itertools.permutations(range(fb), fa))
    else:
        best = max(cos[list(p), np.arange(fb)].sum() for p in itertools.permutations(range(fa), fb))
    m = match_decoders(torch.nn.Parameter(a), torch.nn.Parameter(b))  # as an SAE's W_dec comes
    assert len(m.source_index) == min(fa, fb)
    assert np.all(np.diff(m.source_index) > 0) and len(set(m.target_index.tolist())) == len(m.target_index)
    np.testing.assert_allclose(m.similarity, cos[m.source_index, m.target_index], atol=1e-6)
    assert m.similarity.sum() == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_match_decoders_recovers_planted_features(noise):
    """Clean and noisy (per-row Gaussian noise of norm ~0.3, renormalised) decoders: >= 95% recovered."""
    p = planted_layers([1.0, 0.5], d=128, n_features=64, seed=0)
    truth = p.correspondence(0, 1)
    g = torch.Generator().manual_seed(1)
    a, b = (_unit(d + noise * torch.randn(d.shape, generator=g) / d.shape[1] ** 0.5) for d in p.dictionaries)
    m = match_decoders(a, b)
    assert m.kind == "decoder"
    assert _recovery(m, truth) >= 0.95
    sig = _significant(m)
    assert all(sig[s] for s in truth)
    non_shared = [s for s in sig if s not in truth]
    assert len(non_shared) == 32 and np.mean([not sig[s] for s in non_shared]) >= 0.9


def test_match_decoders_null_is_seeded():
    p = planted_layers([1.0, 0.5], d=128, n_features=64, seed=0)
    assert match_decoders(*p.dictionaries, seed=3) == match_decoders(*p.dictionaries, seed=3)
    assert match_decoders(*p.dictionaries, seed=3).null_threshold != match_decoders(*p.dictionaries, seed=4).null_threshold


def test_match_activations_recovers_persistent_features():
    p = planted_layers([1.0, 0.5], shared_codes=True, seed=1)
    truth = p.correspondence(0, 1)
    m = match_activations(p.codes[0].requires_grad_(), p.codes[1])
    assert m.kind == "activation"
    assert _recovery(m, truth) >= 0.95
    sig = _significant(m)
    assert all(sig[s] for s in truth)


def _with_dead_columns(x: torch.Tensor, dead: list[int]) -> tuple[torch.Tensor, list[int]]:
    """x with all-zero columns inserted at positions `dead`, and where x's columns went."""
    n = x.shape[1] + len(dead)
    keep = [i for i in range(n) if i not in dead]
    wide = torch.zeros(len(x), n)
    wide[:, keep] = x
    return wide, keep


def test_match_activations_skips_dead_latents_and_keeps_original_indices():
    p = planted_layers([1.0, 0.5], shared_codes=True, seed=1)
    a, b = p.codes
    dead_a, dead_b = [0, 5, 40], [3, 63]
    (wide_a, keep_a), (wide_b, keep_b) = _with_dead_columns(a, dead_a), _with_dead_columns(b, dead_b)
    truth = {keep_a[s]: keep_b[t] for s, t in p.correspondence(0, 1).items()}
    m = match_activations(wide_a, wide_b)
    assert not set(m.source_index.tolist()) & set(dead_a) and not set(m.target_index.tolist()) & set(dead_b)
    assert len(m.source_index) == 64
    assert _recovery(m, truth) >= 0.95


def test_independent_codes_are_rarely_significant():
    p = planted_layers([1.0, 0.5], shared_codes=False, seed=1)
    assert match_activations(p.codes[0], p.codes[1]).fraction_significant < 0.1


def test_streamed_correlation_equals_corrcoef():
    g = torch.Generator().manual_seed(0)
    t, fa, fb = 200, 6, 5
    a = torch.randn(t, fa, generator=g).relu()
    b = torch.randn(t, fb, generator=g) + a[:, :1] @ torch.randn(1, fb, generator=g)  # some real correlation
    a[:, 2] = 0.0  # dead latent
    a[:, 4] += 1e4  # large mean next to a small spread
    b[:, 1] = 3.7  # alive but constant: zero variance too
    corr = ActivationCorrelation()
    for lo, hi in [(0, 90), (90, 127), (127, t)]:
        corr.add(a[lo:hi], b[lo:hi])
    a64, b64 = a.double().numpy(), b.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.nan_to_num(np.corrcoef(a64.T, b64.T)[:fa, fa:], nan=0.0)
    result = corr.compute()
    assert result.dtype == np.float64 and result.shape == (fa, fb)
    np.testing.assert_allclose(result, reference, atol=1e-10, rtol=0)
    assert np.all(result[2] == 0) and np.all(result[:, 1] == 0)
    live_a, live_b = corr.live()
    assert live_a.tolist() == [True, True, False, True, True, True]
    assert live_b.tolist() == [True, False, True, True, True]


def test_feature_matching_json_round_trip():
    p = planted_layers([1.0, 0.5], d=128, n_features=64, seed=0)
    m = match_decoders(*p.dictionaries)
    back = FeatureMatching.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    assert back.source_index.dtype == np.int64 and back.significant.dtype == np.bool_
    assert back.fraction_significant == m.fraction_significant and back.mean_similarity == m.mean_similarity
    empty = FeatureMatching("activation", [], [], [], float("nan"), [])
    assert FeatureMatching.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty
    assert back != FeatureMatching.from_dict({**m.to_dict(), "significant": [not s for s in m.significant.tolist()]})


def _subspace_dictionary(n: int, basis: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _unit(torch.randn(n, basis.shape[0], generator=g) @ basis)


def test_decoder_null_inside_the_data_subspace_is_not_beaten_by_unrelated_dictionaries():
    # Two unrelated dictionaries whose rows live in the data's 12-dimensional principal subspace of
    # a 128-dimensional space. Against a rotation of the whole space, chance cosines inside the
    # subspace look significant; against a rotation inside the subspace they do not.
    g = torch.Generator().manual_seed(0)
    d, m = 128, 12
    basis = torch.linalg.qr(torch.randn(d, m, generator=g)).Q.T  # [m, d] orthonormal rows
    data = torch.randn(20_000, m, generator=g) @ basis + 0.01 * torch.randn(20_000, d, generator=g)
    calibration = Calibration.of({"site": data}, covariance=True)
    assert m - 2 <= calibration.principal_dimension("site") <= m  # 90% of an isotropic 12-d subspace
    a, b = _subspace_dictionary(64, basis, g), _subspace_dictionary(64, basis, g)
    whole = match_decoders(a, b, min_cosine=-1.0)
    inside = match_decoders(a, b, rotation=calibration.rotation("site", seed=1), min_cosine=-1.0)
    assert whole.fraction_significant > 0.5  # the old null: most unrelated pairs "match"
    assert inside.fraction_significant < 0.1
    assert inside.null_threshold > whole.null_threshold + 0.2
    # The absolute floor: a cosine below 0.7 is never a match, whatever the null.
    assert match_decoders(a, b).significant.sum() == (whole.similarity > max(whole.null_threshold, 0.7)).sum()
    # Shared features still match inside the subspace.
    shared = _unit(a + 0.05 * _subspace_dictionary(64, basis, g))
    assert match_decoders(a, shared, rotation=calibration.rotation("site", seed=1)).fraction_significant > 0.95


def test_calibration_rotation_stays_inside_the_principal_subspace():
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(32, 5, generator=g)).Q  # [32, 5]
    data = torch.randn(5000, 5, generator=g) @ basis.T * 3 + 0.01 * torch.randn(5000, 32, generator=g) + 7
    calibration = Calibration.of({"site": data}, covariance=True)
    Q = calibration.rotation("site", seed=0).double()
    torch.testing.assert_close(Q @ Q.T, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)
    outside = torch.eye(32, dtype=torch.float64) - basis.double() @ basis.double().T
    torch.testing.assert_close(Q @ outside, outside, atol=2e-3, rtol=0)  # the complement is left alone
    centered = data.double() - data.double().mean(0)
    torch.testing.assert_close(calibration.covariances["site"], centered.T @ centered / len(data), atol=1e-4, rtol=1e-4)


def test_activation_null_keeps_dependence_within_sequences():
    # Latents that hold one value for a whole sequence (a topic), independent between A and B: on
    # 40 sequences chance correlations are of order 1 / sqrt(40), far above what a permutation of
    # single tokens (1 / sqrt(2560)) would allow. The whole-sequence shift calls few of them matches.
    g = torch.Generator().manual_seed(0)
    n_seq, length, f = 40, 64, 24
    sequences = torch.arange(n_seq).repeat_interleave(length)
    a = torch.rand(n_seq, f, generator=g).repeat_interleave(length, 0)
    b = torch.rand(n_seq, f, generator=g).repeat_interleave(length, 0)
    m = match_activations(a, b, sequences=sequences)
    assert m.fraction_significant < 0.15
    # The single-token permutation null that this replaced: nearly every chance match beats it.
    perm = torch.randperm(len(b), generator=g)
    token_null = match_activations(a, b[perm], sequences=sequences).similarity
    assert (m.similarity > np.quantile(token_null, 0.99)).mean() > 0.5
    assert null_shift(len(a), sequences, seed=0) % length == 0


def test_feature_flow_transition_recovers_a_planted_relabelling():
    # Layer 1 holds layer 0's features in another order on the same tokens, at 3x the spread:
    # sending each latent to its top-1 decoder partner reconstructs layer 1 as SAE_1 itself does.
    p = planted_layers([1.0, 1.0], [1.0, 3.0], shared_codes=True, seed=4, noise=0.0)
    sae0, sae1 = true_sae(p, 0), true_sae(p, 1)
    coder1 = LinearCoder.from_sae(sae1)
    z0 = sae0.encode(p.activations[0]).detach()
    calibration = Calibration.of({"0": p.train[0], "1": p.train[1]})
    ev = feature_flow(z0, LinearCoder.from_sae(sae0), coder1, p.activations[1],
                      calibration.spread("1") / calibration.spread("0"), 1000).compute().explained_variance
    own = reconstruction_metrics(p.activations[1], sae1(p.activations[1]).detach()).explained_variance
    assert ev == pytest.approx(own, abs=0.02) and ev > 0.9
    fresh = planted_layers([1.0, 0.0], [1.0, 3.0], seed=4, noise=0.0)  # layer 1 shares no feature
    sae_fresh = true_sae(fresh, 1)
    z_fresh = true_sae(fresh, 0).encode(fresh.activations[0]).detach()
    unrelated = feature_flow(z_fresh, LinearCoder.from_sae(true_sae(fresh, 0)), LinearCoder.from_sae(sae_fresh),
                             fresh.activations[1], 3.0, 1000).compute().explained_variance
    assert unrelated < 0.1


def test_resampled_fraction_recomputes_the_matched_correlations_on_the_drawn_sequences():
    # B's latents are A's, permuted, with noise rising across latents: correlations from about 1 down to 0.3,
    # so the floor of 0.5 cuts through them and the fraction moves between resamples.
    g = torch.Generator().manual_seed(5)
    a = torch.relu(torch.randn(1200, 10, generator=g))
    perm = torch.randperm(10, generator=g)
    b = a[:, perm] + torch.linspace(0, 8, 10)[perm] * torch.rand(1200, 10, generator=g)
    sequences = torch.arange(1200) // 40
    m = match_activations(a, b, sequences=sequences)
    counts = torch.stack([torch.bincount(r, minlength=30) for r in torch.randint(30, (6, 30), generator=g)])
    fractions = resampled_fraction(m, a, b, sequences, torch.cat([torch.ones(1, 30), counts]))
    assert fractions[0].item() == pytest.approx(m.fraction_significant, abs=1e-12)  # every sequence once
    assert 0 < m.fraction_significant < 1 and fractions[1:].std() > 0
    floor = max(m.null_threshold, m.min_similarity)
    for k in range(6):
        rows = torch.cat([torch.arange(j * 40, j * 40 + 40).repeat(int(counts[k, j])) for j in range(30)])
        x = a[rows][:, m.source_index].double() - a[:, m.source_index].double().mean(0)  # around all tokens' means
        y = b[rows][:, m.target_index].double() - b[:, m.target_index].double().mean(0)
        r = (x * y).sum(0) / (x.square().sum(0) * y.square().sum(0)).sqrt()
        assert fractions[k + 1].item() == pytest.approx((r > floor).double().mean().item(), abs=1e-12)
    with pytest.raises(ValueError, match="decoder matching"):
        resampled_fraction(match_decoders(a.T, b.T), a, b, sequences, counts)
