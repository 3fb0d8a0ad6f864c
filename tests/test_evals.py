"""Held-out evals: planted cases, an independent splice, and SAELens' own run_evals."""

import pytest
import torch
from datasets import Dataset
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from conftest import tiny_twin
from layerflow.capture import CaptureConfig, capture
from layerflow.errors import LayerflowError
from layerflow.evals import evaluate_saes, read_eval_results, write_eval_results
from layerflow.sites import SiteKind
from layerflow.store import ActivationStore

RESID, MLP = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = tiny_twin("gpt2-twin")
    root = tmp_path_factory.mktemp("evalstore")
    capture(CaptureConfig(model="gpt2-twin", layers=[0, 1], kinds=[SiteKind.resid_post, SiteKind.mlp_out],
                          n_tokens=1024, context_size=32, source="random", holdout_fraction=0.5), root, loaded=loaded)
    return loaded, ActivationStore(root)


def _sae(d: int, W_enc=None, W_dec=None, b_dec=None, hook=RESID, seed=0) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=W_enc.shape[1] if W_enc is not None else 4 * d,
                                        apply_b_dec_to_input=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        if W_enc is not None:
            sae.W_enc.copy_(W_enc)
            sae.b_enc.zero_()
        if W_dec is not None:
            sae.W_dec.copy_(W_dec)
        if b_dec is not None:
            sae.b_dec.copy_(b_dec)
    sae.cfg.metadata.hook_name = hook
    return sae


def _exact_sae(d: int, scale: float = 1.0) -> StandardSAE:
    """ReLU(x) - ReLU(-x) = x: a perfect reconstruction with 2d latents."""
    eye = torch.eye(d)
    return _sae(d, torch.cat([eye, -eye], 1), scale * torch.cat([eye, -eye], 0))


def _heldout(store, hook):
    return store.activations(hook, "heldout")[~store.special_mask("heldout")]


def test_planted_reconstructions(setup, tmp_path):
    _, store = setup
    d = 64
    x = _heldout(store, RESID)
    mean_sae = _sae(d, torch.zeros(d, 8), torch.zeros(8, d), x.mean(0))
    results = evaluate_saes({RESID: _exact_sae(d), MLP: _exact_sae(d, 0.5)}, store)
    exact, half = results[RESID].reconstruction, results[MLP].reconstruction
    assert exact.fvu == pytest.approx(0, abs=1e-10) and exact.l2_ratio == pytest.approx(1, abs=1e-6)
    assert half.l2_ratio == pytest.approx(0.5, abs=1e-6)
    x_mlp = _heldout(store, MLP).double()
    expected = 0.25 * x_mlp.pow(2).sum(-1).mean() / (x_mlp - x_mlp.mean(0)).pow(2).sum(-1).mean()
    assert half.fvu == pytest.approx(expected.item(), rel=1e-6)
    assert half.relative_reconstruction_bias == pytest.approx(0.5, rel=1e-6)
    assert evaluate_saes({RESID: mean_sae}, store)[RESID].reconstruction.fvu == pytest.approx(1, abs=1e-6)
    write_eval_results(results, tmp_path)
    assert read_eval_results(tmp_path / "evals.json") == results
    assert (tmp_path / "evals.csv").read_text().splitlines()[0].startswith("hook_name,n_tokens,fvu")


def _independent_splice(model, tokens, hook, sae, specials):
    """Full forward passes with run_with_hooks: no caching, no start_at_layer."""
    keep = ~torch.isin(tokens, torch.tensor(specials))
    splice = lambda a, hook: torch.where(keep.unsqueeze(-1), sae(a), a)
    zero = lambda a, hook: torch.zeros_like(a)
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])

    def ce(logits):
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -logp[keep[:, :-1]].double().mean().item()

    p = clean.softmax(-1)
    kl = (p * (clean.log_softmax(-1) - spliced.log_softmax(-1))).sum(-1)[keep].double().mean().item()
    return ce(clean), ce(spliced), ce(ablated), kl


def test_spliced_figures_equal_an_independent_computation(setup):
    loaded, store = setup
    saes = {RESID: _sae(64, hook=RESID, seed=1), MLP: _sae(64, hook=MLP, seed=2)}
    results = evaluate_saes(saes, store, loaded=loaded, batch_size=3)
    tokens = store.tokens("heldout")
    for hook, sae in saes.items():
        with torch.no_grad():
            clean, spliced, ablated, kl = _independent_splice(loaded.model, tokens, hook, sae,
                                                              store.manifest.special_token_ids)
        r = results[hook]
        assert r.ce_clean == pytest.approx(clean, rel=1e-5)
        assert r.ce_spliced == pytest.approx(spliced, rel=1e-5)
        assert r.ce_zero_ablation == pytest.approx(ablated, rel=1e-5)
        assert r.kl_div == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert r.delta_ce == pytest.approx(spliced - clean, rel=1e-4, abs=1e-7)
        assert r.ce_loss_score == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-4)
        assert r.kl_div > 0 and r.ce_spliced != r.ce_clean  # the splice changed something


def test_cross_check_with_saelens_run_evals(setup):
    """FVU, L0, CE and KL against SAELens' run_evals on the same SAE and held-out sequences."""
    loaded, store = setup
    tokens = store.tokens("heldout")
    specials = store.manifest.special_token_ids
    x = _heldout(store, RESID).double()
    # The figures only catch a variance-around-zero bug if the activations have a real mean.
    assert x.mean(0).pow(2).sum() > 0.05 * x.pow(2).sum(-1).mean()
    sae = _sae(64, hook=RESID, seed=3)
    sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = tokens.shape[1], False
    ours = evaluate_saes({RESID: sae}, store, loaded=loaded, batch_size=tokens.shape[0])[RESID]
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    activation_store = ActivationsStore.from_sae(loaded.model, sae, dataset=dataset, context_size=tokens.shape[1],
                                                 store_batch_size_prompts=tokens.shape[0], streaming=False)
    assert torch.equal(activation_store.get_batch_tokens(tokens.shape[0]).cpu(), tokens)  # same sequences
    activation_store = ActivationsStore.from_sae(loaded.model, sae, dataset=dataset, context_size=tokens.shape[1],
                                                 store_batch_size_prompts=tokens.shape[0], streaming=False)
    config = EvalConfig(batch_size_prompts=tokens.shape[0], n_eval_reconstruction_batches=1, compute_kl=True,
                        compute_ce_loss=True, n_eval_sparsity_variance_batches=1, compute_l2_norms=True,
                        compute_sparsity_metrics=True, compute_variance_metrics=True)
    theirs, _ = run_evals(sae, activation_store, loaded.model, ActivationScaler(), config,
                          exclude_special_tokens=specials)
    assert ours.reconstruction.explained_variance == pytest.approx(
        theirs["reconstruction_quality"]["explained_variance"], rel=1e-4)
    assert ours.reconstruction.l0 == pytest.approx(theirs["sparsity"]["l0"], rel=1e-5)
    perf = theirs["model_performance_preservation"]
    assert ours.ce_clean == pytest.approx(perf["ce_loss_without_sae"], rel=1e-5)
    assert ours.ce_spliced == pytest.approx(perf["ce_loss_with_sae"], rel=1e-5)
    assert ours.ce_zero_ablation == pytest.approx(perf["ce_loss_with_ablation"], rel=1e-5)
    assert ours.ce_loss_score == pytest.approx(perf["ce_loss_score"], rel=1e-4)
    assert ours.kl_div == pytest.approx(theirs["model_behavior_preservation"]["kl_div_with_sae"], rel=1e-4)


def test_bad_input(setup):
    _, store = setup
    with pytest.raises(LayerflowError, match=r"d_in 32.*width 64"):
        evaluate_saes({RESID: _sae(32)}, store)
    with pytest.raises(LayerflowError, match=r"'blocks.5.hook_resid_post'.*Captured: blocks.0.hook_resid_post"):
        evaluate_saes({"blocks.5.hook_resid_post": _sae(64)}, store)
