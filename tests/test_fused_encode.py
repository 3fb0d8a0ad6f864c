"""The C kernels of `fused_encode` against torch doing the same thing step by step."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layerflow.models.sites import site_at as SiteId
from layerflow.transfer import Calibration, LinearCoder, SparseLatents, TransferOptions, fused_encode, within_model_matrix

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: layerflow uses torch ops instead")


def torch_variant(P, alpha, bias, scale=None):
    z = torch.add(bias, P, alpha=alpha)  # what LinearCoder's torch path computes
    return z * scale if scale is not None else z


@pytest.fixture(params=["openmp", "thread pool"])
def kernel_build(request, monkeypatch):
    """Run a test with the library built with OpenMP (the default where the compiler has it) and
    without (rows split by fused_encode.py's thread pool)."""
    try:
        lib = fused_encode.load(fused_encode.find_compiler(), request.param == "openmp")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"this compiler cannot build the {request.param} variant")
    monkeypatch.setattr(fused_encode, "_library", lambda: lib)
    monkeypatch.setattr(fused_encode, "MIN_ROWS_PER_THREAD", 16)  # several ranges even for small tests
    return request.param


def test_kernel_is_available_with_a_compiler():
    assert fused_encode.available(), fused_encode.unavailable_reason


@pytest.mark.parametrize("T,F,k", [(5, 64, 1), (37, 100, 7), (300, 512, 32), (130, 48, 48)])
@pytest.mark.parametrize("with_scale", [False, True])
def test_topk_equals_torch_topk(T, F, k, with_scale, kernel_build):
    g = torch.Generator().manual_seed(T + F + k)
    wide = torch.randn(T, F + 9, generator=g)
    P = wide[:, 4:4 + F]  # rows with a stride larger than F
    alphas = [1.0, 2.5, -0.3]
    biases = torch.randn(3, F, generator=g)
    scale = torch.rand(F, generator=g) + 0.5 if with_scale else None
    values, indices = fused_encode.topk(P, alphas, biases, scale, k)
    for v, alpha in enumerate(alphas):
        z = torch_variant(P, alpha, biases[v], scale)
        expected_values, expected_indices = z.topk(k, dim=-1)
        assert torch.equal(indices[v].sort(-1).values, expected_indices.sort(-1).values)
        assert torch.equal(values[v].sort(-1).values, expected_values.relu().sort(-1).values)
        assert torch.equal(values[v], z.gather(-1, indices[v]).relu())


def test_topk_is_exact_when_rows_differ_wildly_in_scale(kernel_build):
    """The threshold guess comes from the previous row; rows 1000x larger or smaller must not fool it."""
    g = torch.Generator().manual_seed(1)
    T, F, k = 400, 1024, 16
    P = torch.randn(T, F, generator=g) * torch.logspace(-3, 3, T)[torch.randperm(T, generator=g)][:, None]
    P[::7] = -P[::7].abs() - 1  # whole rows below zero: the top k are negative, kept as 0 after the ReLU
    bias = torch.zeros(1, F)
    values, indices = fused_encode.topk(P, [1.0], bias, None, k)
    expected = P.topk(k, dim=-1)
    assert torch.equal(indices[0].sort(-1).values, expected.indices.sort(-1).values)
    assert torch.equal(values[0].sort(-1).values, expected.values.relu().sort(-1).values)
    assert (values[0][::7] == 0).all()


def test_topk_with_ties_keeps_k_of_the_largest():
    g = torch.Generator().manual_seed(2)
    T, F, k = 200, 256, 20
    P = torch.randint(0, 6, (T, F), generator=g).float()  # many ties at the k-th value
    values, indices = fused_encode.topk(P, [1.0], torch.zeros(1, F), None, k)
    expected = P.topk(k, dim=-1).values
    assert torch.equal(values[0].sort(-1).values, expected.sort(-1).values)  # the same multiset of values
    assert all(len(set(row.tolist())) == k for row in indices[0])  # k distinct latents
    kth = expected[:, -1:]
    unselected = P.scatter(-1, indices[0], float("-inf"))
    assert (unselected <= kth).all() and (values[0] >= kth).all()


@pytest.mark.parametrize("with_cut", [False, True])
def test_threshold_equals_torch_nonzero(with_cut, kernel_build):
    g = torch.Generator().manual_seed(3)
    T, d_sae = 300, 200
    P = torch.randn(T, d_sae, generator=g)
    P[5] = -10.0  # a token with no active latent
    alphas = [1.0, 0.7]
    biases = torch.randn(2, d_sae, generator=g) * 0.5
    cut = torch.rand(d_sae, generator=g) * 1.5 if with_cut else None
    for (offsets, cols, values), v in zip(fused_encode.threshold(P, alphas, biases, None, cut), range(2)):
        z = torch_variant(P, alphas[v], biases[v])
        rows, expected_cols = (z > (cut if with_cut else 0.0)).nonzero(as_tuple=True)
        assert torch.equal(offsets, F.pad(torch.bincount(rows, minlength=T).cumsum(0), (1, 0)))
        assert torch.equal(cols, expected_cols)
        assert torch.equal(values, z[rows, expected_cols])


def test_threshold_grows_its_capacity_for_dense_rows(kernel_build):
    g = torch.Generator().manual_seed(4)
    T, d_sae = 150, 1500
    P = torch.randn(T, d_sae, generator=g)
    P[77] = torch.rand(d_sae, generator=g) + 0.1  # every latent active on one token: more than the first capacity
    [(offsets, cols, values)] = fused_encode.threshold(P, [1.0], torch.zeros(1, d_sae), None, None)
    rows, expected_cols = (P > 0).nonzero(as_tuple=True)
    assert offsets[78] - offsets[77] == d_sae
    assert torch.equal(cols, expected_cols) and torch.equal(values, P[rows, expected_cols])


def _topk_and_jumprelu_saes(d: int, d_sae: int, n: int):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(5)
    saes, acts, sites = {}, {}, []
    for i in range(n):
        hook = f"blocks.{i}.hook_resid_post"
        if i % 2:
            sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=d_sae))
        else:
            sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=d_sae, k=8, rescale_acts_by_decoder_norm=True))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d, d_sae, generator=g) / d ** 0.5)
            sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) * 0.3)
            sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
            if i % 2:
                sae.threshold.copy_(torch.rand(d_sae, generator=g))
        saes[hook] = sae
        acts[hook] = torch.randn(700, d, generator=g) * (1 + i)
        sites.append(SiteId("synthetic", hook, i, n))
    return saes, acts, sites


def test_transfer_matrix_is_the_same_with_and_without_the_c_kernels():
    saes, acts, sites = _topk_and_jumprelu_saes(d=48, d_sae=160, n=3)
    assert all(LinearCoder.from_sae(sae) is not None for sae in saes.values())
    options = TransferOptions(max_tokens=None, batch_tokens=256, match_distance=0)
    fused = within_model_matrix(saes, acts, sites, Calibration.of(acts), options)
    with fused_encode.disabled():
        assert not fused_encode.available()
        plain = within_model_matrix(saes, acts, sites, Calibration.of(acts), options)
    for name, values in plain.metrics.items():
        torch.testing.assert_close(torch.tensor(fused[name]), torch.tensor(values), rtol=1e-5, atol=1e-6,
                                   equal_nan=True, msg=name)


def test_can_be_turned_off_by_environment():
    code = "from layerflow.transfer import fused_encode; print(fused_encode.available(), fused_encode.unavailable_reason)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "LAYERFLOW_FUSED_ENCODE": "0"}).stdout
    assert out.startswith("False") and "LAYERFLOW_FUSED_ENCODE=0" in out


def test_bad_input_is_refused():
    P = torch.randn(10, 32)
    with pytest.raises(ValueError, match="k must be in 1..32"):
        fused_encode.topk(P, [1.0], torch.zeros(1, 32), None, 33)
    with pytest.raises(ValueError, match="biases must have shape"):
        fused_encode.topk(P, [1.0, 2.0], torch.zeros(1, 32), None, 3)
    with pytest.raises(ValueError, match="float32 CPU"):
        fused_encode.topk(P.double(), [1.0], torch.zeros(1, 32), None, 3)
    assert not fused_encode.accepts(P.double()) and not fused_encode.accepts(P.t())


@pytest.mark.parametrize("topk", [True, False])
def test_sparse_latents_sum_and_count_per_group_as_the_dense_latents_do(topk):
    g = torch.Generator().manual_seed(3)
    dense = torch.relu(torch.randn(40, 12, generator=g))
    if topk:
        values, indices = dense.topk(3, dim=1)
        values[::5, 2] = 0.0  # a TopK value the ReLU zeroed: present, but not firing
        latents = SparseLatents(indices, values, 40)
    else:
        nonzero = dense.nonzero()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(nonzero[:, 0], minlength=40).cumsum(0)])
        latents = SparseLatents(nonzero[:, 1], dense[nonzero[:, 0], nonzero[:, 1]], 40, offsets)
    z = latents.dense(12).double()
    groups = torch.arange(40) // 7
    per_group = torch.zeros(6, 12, dtype=torch.float64).index_add_(0, groups, z)
    squares = torch.zeros(6, 12, dtype=torch.float64).index_add_(0, groups, z * z)
    sums = latents.sums(12, groups, 6)
    assert torch.allclose(sums[0], per_group) and torch.allclose(sums[1], squares)
    counts, n_active, by_group = latents.firing(12, groups, 6)
    assert torch.equal(counts, (z != 0).sum(0)) and n_active == int((z != 0).sum())
    assert torch.equal(by_group, torch.bincount(groups, (z != 0).sum(1), 6).long())
