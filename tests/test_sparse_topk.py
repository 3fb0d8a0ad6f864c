"""The stacked sparse step equals SAELens' own training step: loss, gradients and updated weights."""

import copy

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer

from layerflow.train.sparse_topk import StackedTopKSAEs, _batch_topk

D_IN, D_SAE, N_TOK = 16, 96, 64


def _saes(arch: str, n: int, **extra):
    sae_cls, cfg_cls = get_sae_training_class(arch)
    if arch == "matryoshka_batchtopk":
        extra.setdefault("matryoshka_widths", [12, 40, D_SAE])
    extra.setdefault("k", 4)
    saes = []
    for i in range(n):
        torch.manual_seed(i)
        sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float64", **extra))
        with torch.no_grad():  # non-trivial biases so every gradient path is exercised
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.5)
        saes.append(sae)
    return saes


def _batches(n_layers: int, n_steps: int):
    g = torch.Generator().manual_seed(1)
    # A large mean component, as in real residual streams.
    return [torch.randn(n_layers, N_TOK, D_IN, generator=g, dtype=torch.float64) * 2 + 3 for _ in range(n_steps)]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_loss_and_gradients_equal_saelens(arch):
    saes = _saes(arch, 3)
    x = _batches(3, 1)[0]
    dead = torch.zeros(3, D_SAE, dtype=torch.bool)
    dead[:, ::3] = True  # exercise the AuxK loss
    dead[1] = False  # ... and a layer without dead latents
    stack = StackedTopKSAEs(saes, lrs=[1e-3] * 3)
    ours = stack.losses(x, dead)
    ours["total"].sum().backward()
    for layer, sae in enumerate(saes):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x[layer], coefficients={}, dead_neuron_mask=dead[layer],
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.testing.assert_close(ours["mse"][layer], out.losses["mse_loss"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours["total"][layer], out.loss, rtol=1e-10, atol=1e-12)
        if layer != 1:
            assert ours["aux"][layer] > 0
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(stack.params[name].grad[layer], getattr(sae, name).grad, rtol=1e-9, atol=1e-12,
                                       msg=f"{arch} layer {layer} grad {name}")


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_training_steps_equal_saelens_trainer(arch):
    """Several full steps (dead-latent tracking, AuxK, clipping, Adam, threshold EMA) vs SAETrainer.step."""
    n_layers, n_steps, lrs = 2, 6, [3e-3, 1e-2]
    saes = _saes(arch, n_layers)
    theirs = [copy.deepcopy(s) for s in saes]
    trainers = [SAETrainer(SAETrainerConfig(total_training_samples=N_TOK * n_steps, train_batch_size_samples=N_TOK,
                                            lr=lr, lr_end=lr / 10, dead_feature_window=1), sae, data_provider=iter(()))
                for sae, lr in zip(theirs, lrs)]
    stack = StackedTopKSAEs(saes, lrs=lrs, dead_feature_window=1)
    for step, x in enumerate(_batches(n_layers, n_steps)):
        ours = stack.step(x)
        for layer, trainer in enumerate(trainers):
            out = trainer.step(x[layer])
            trainer.n_training_steps += 1
            torch.testing.assert_close(ours["total"][layer], out.loss.detach(), rtol=1e-9, atol=1e-12,
                                       msg=f"{arch} step {step} layer {layer} loss")
    assert stack.dead_latents().any(), "the AuxK path was never exercised"
    stack.write_back(saes)
    for ours_sae, their_sae in zip(saes, theirs):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(ours_sae, name), getattr(their_sae, name), rtol=1e-8, atol=1e-10)
        if arch != "topk":
            torch.testing.assert_close(ours_sae.topk_threshold, their_sae.topk_threshold, rtol=1e-9, atol=0)


def test_batch_topk_selection_matches_full_topk():
    g = torch.Generator().manual_seed(0)
    for shape, n_keep in [((512, 1024), 512 * 8), ((64, 300), 640), ((8, 16), 200)]:
        x = torch.randn(*shape, generator=g).relu()
        ours = _batch_topk(x, n_keep)
        reference = x.reshape(-1).topk(min(n_keep, x.numel())).indices
        reference = reference[x.reshape(-1)[reference] > 0]
        assert torch.equal(ours, reference.sort().values)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_annealed_k_is_a_larger_k(arch):
    """A step with k_factor f is the step of the same SAEs built with k = f * k (whose step equals SAELens')."""
    x = _batches(2, 1)[0]
    annealed = StackedTopKSAEs(_saes(arch, 2), lrs=[1e-3, 1e-3])
    annealed.k_factor = 2.5
    wider = StackedTopKSAEs(_saes(arch, 2, k=10), lrs=[1e-3, 1e-3])
    ours, theirs = annealed.step(x), wider.step(x)
    torch.testing.assert_close(ours["total"], theirs["total"], rtol=1e-12, atol=0)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(annealed.params[name], wider.params[name], rtol=1e-12, atol=0)
    assert len(annealed.last_acts[0].col) == 10 * N_TOK * 2


def test_k_anneal_schedule():
    """k_anneal_fraction: k falls linearly from K_ANNEAL_START * k to k over that fraction of the steps."""
    from layerflow import defaults
    from layerflow.train.config import TrainConfig
    from layerflow.train.groups import StackedGroup

    saes = _saes("batchtopk", 1)
    group = StackedGroup(saes, [1e-3], TrainConfig("unused", k_anneal_fraction=0.5), 8, [1.0], [0])
    assert group.stack.dead_feature_window == 10  # the default window: a fifth of 8 steps, at least 10
    factors = []
    for x in _batches(1, 6):
        group.step(x)
        factors.append(group.stack.k_factor)
    start = defaults.K_ANNEAL_START
    assert factors == pytest.approx([start, start - (start - 1) / 4, start - (start - 1) / 2, 1 + (start - 1) / 4, 1, 1])
