"""Held-out evals: planted cases, an independent splice, pass counts, and SAELens' own run_evals."""

import pytest
import torch
from datasets import Dataset
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from conftest import tiny_twin
from layerflow.capture import ActivationStore, CaptureConfig, capture
from layerflow.errors import LayerflowError
from layerflow.evaluate import evaluate_saes, read_eval_results, spliced_metrics, write_eval_results
from layerflow.models.load import TINY_SHAPE, load_model
from layerflow.models.sites import SiteKind

K = SiteKind
RESID, MLP = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"
# Sites per model: every way the spliced pass can start (residual input at L, at L+1, at n_layers;
# hook inside block L), on a GPT-2, a llama-like (Gemma 2: RMSNorm, rotary, GQA, gated MLP,
# post-norms, softcaps) and a parallel attention/MLP (Pythia) architecture.
CASES = {
    "gpt2-twin": [K.resid_pre, K.resid_post, K.mlp_out],
    "gemma-2-2b-twin": [K.resid_pre, K.attn_out, K.mlp_in, K.mlp_hidden, K.resid_post],
    "pythia-70m-twin": [K.mlp_in, K.mlp_out, K.resid_post],
}
_stores: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def _store(name, tmp_path_factory, loaded=None, **kw):
    """A small capture of `name` (cached per model): 12 held-out sequences of 16 tokens."""
    key = (name, id(loaded))
    if key not in _stores:
        loaded = loaded or tiny_twin(name)
        root = tmp_path_factory.mktemp(name)
        cfg = dict(model=name, layers=[0, 1], kinds=CASES.get(name, [K.resid_post]), n_tokens=48 * 16,
                   context_size=16, source="random", holdout_fraction=0.25, **kw)
        capture(CaptureConfig(**cfg), root, loaded=loaded)
        _stores[key] = loaded, ActivationStore(root)
    return _stores[key]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _store("gpt2-twin", tmp_path_factory)


def _sae(d: int, W_enc=None, W_dec=None, b_dec=None, b_enc=None, seed=0, center=False) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=W_enc.shape[1] if W_enc is not None else 4 * d,
                                        apply_b_dec_to_input=center))
    with torch.no_grad():
        for param, value in ((sae.W_enc, W_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec), (sae.b_enc, b_enc)):
            if value is not None:
                param.copy_(value)
    return sae


def _exact_sae(d: int, scale: float = 1.0) -> StandardSAE:
    """ReLU(x) - ReLU(-x) = x: a perfect reconstruction with 2d latents."""
    eye = torch.eye(d)
    return _sae(d, torch.cat([eye, -eye], 1), scale * torch.cat([eye, -eye], 0), torch.zeros(d), torch.zeros(2 * d))


def _heldout(store, hook, exclude=True):
    x = store.activations(hook, "heldout")
    return x[~store.special_mask("heldout")] if exclude else x


def test_planted_reconstructions(setup, tmp_path):
    _, store = setup
    d = 64
    hooks = store.hook_names
    x = _heldout(store, RESID)
    mean_sae = _sae(d, torch.zeros(d, 8), torch.zeros(8, d), x.mean(0))
    calls = []
    results = evaluate_saes({RESID: _exact_sae(d), MLP: _exact_sae(d, 0.5), hooks[0]: mean_sae}, store,
                            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    exact, half, mean = results[RESID].reconstruction, results[MLP].reconstruction, results[hooks[0]].reconstruction
    assert exact.fvu == pytest.approx(0, abs=1e-10) and exact.l2_ratio == pytest.approx(1, abs=1e-6)
    assert exact.n_tokens == len(x) < store.manifest.split["heldout_tokens"]  # BOS positions left out
    assert exact.l0 == pytest.approx((x != 0).sum(-1).double().mean().item())
    assert half.l2_ratio == pytest.approx(0.5, abs=1e-6)
    assert half.relative_reconstruction_bias == pytest.approx(0.5, rel=1e-6)
    x_mlp = _heldout(store, MLP).double()
    expected = 0.25 * x_mlp.pow(2).sum(-1).mean() / (x_mlp - x_mlp.mean(0)).pow(2).sum(-1).mean()
    assert half.fvu == pytest.approx(expected.item(), rel=1e-6)
    assert mean.fvu != pytest.approx(1, abs=1e-3)  # hooks[0] is not RESID: the mean of another site
    assert evaluate_saes({RESID: mean_sae}, store)[RESID].reconstruction.fvu == pytest.approx(1, abs=1e-6)
    # With special tokens counted, the non-special mean is no longer the mean: FVU > 1.
    with_bos = evaluate_saes({RESID: mean_sae}, store, exclude_special_tokens=False)[RESID].reconstruction
    assert with_bos.n_tokens == store.manifest.split["heldout_tokens"] and with_bos.fvu > 1 + 1e-4
    assert results[RESID].ce_clean is None  # no model given: reconstruction only

    json_path, csv_path = write_eval_results(results, tmp_path)
    assert read_eval_results(json_path) == results == read_eval_results(tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("hook_name,n_tokens,fvu,") and ",kl_div," in lines[0] and len(lines) == 4
    # no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals.csv", "evals.json", "feature_frequency.safetensors"]


def _independent_splice(model, tokens, hook, sae, specials):
    """Full forward passes with run_with_hooks: no caching, no start_at_layer, no doubled batch."""
    keep = ~torch.isin(tokens, torch.tensor(specials, dtype=torch.long))
    splice = lambda a, hook: torch.where(keep.unsqueeze(-1), sae(a), a)
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))])

    def ce(logits):
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -logp[keep[:, :-1]].double().mean().item()

    p = clean.double().softmax(-1)
    kl = (p * (p.log() - spliced.double().log_softmax(-1))).sum(-1)[keep].mean().item()
    return ce(clean), ce(spliced), ce(ablated), kl


@pytest.mark.parametrize("name,exclude", [("gpt2-twin", True), ("gpt2-twin", False),
                                          ("gemma-2-2b-twin", True), ("pythia-70m-twin", True)])
def test_spliced_figures_equal_an_independent_computation(name, exclude, tmp_path_factory):
    loaded, store = _store(name, tmp_path_factory)
    model = loaded.model
    sites = store.manifest.sites
    saes = {s["hook_name"]: _sae(s["d"], seed=i) for i, s in enumerate(sites)}
    specials = store.manifest.special_token_ids if exclude else []
    tokens = store.tokens("heldout")
    batch_size, n_batches = 5, 3  # 12 sequences: batches of 5, 5, 2
    # Count what runs: the embedding only in the clean passes; block L once per clean pass plus
    # once per site whose spliced pass starts at or below L; every spliced pass is doubled.
    fired = {}
    count = lambda a, hook: fired.setdefault(hook.name, []).append(a.shape[0])
    watched = ["hook_embed"] + [f"blocks.{L}.hook_resid_pre" for L in range(2)] + ["ln_final.hook_normalized"]
    with model.hooks(fwd_hooks=[(h, count) for h in watched]):
        results = evaluate_saes(saes, store, loaded=loaded, exclude_special_tokens=exclude, batch_size=batch_size)
    n_seqs = [5, 5, 2]
    starts = {s["hook_name"]: s["layer"] + (s["kind"] == "resid_post") for s in sites}
    assert fired["hook_embed"] == n_seqs
    for L in range(2):
        n_sites = sum(start <= L for start in starts.values())
        assert sorted(fired[f"blocks.{L}.hook_resid_pre"]) == sorted(n_seqs + [2 * n for n in n_seqs] * n_sites)
    assert len(fired["ln_final.hook_normalized"]) == n_batches * (1 + len(saes))

    for hook, sae in saes.items():
        with torch.no_grad():
            clean, spliced, ablated, kl = _independent_splice(model, tokens, hook, sae, specials)
        r = results[hook]
        assert r.ce_clean == pytest.approx(clean, rel=1e-5)
        assert r.ce_spliced == pytest.approx(spliced, rel=1e-5)
        assert r.ce_zero_ablation == pytest.approx(ablated, rel=1e-5)
        assert r.kl_div == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert r.delta_ce == pytest.approx(spliced - clean, rel=1e-3, abs=1e-6)
        assert r.ce_loss_score == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-4)
        assert r.kl_div > 1e-3 and abs(r.delta_ce) > 1e-4  # the splice changed something
        assert r.reconstruction.n_tokens == (len(_heldout(store, hook)) if exclude else tokens.numel())


def test_spliced_figures_on_fewer_tokens_use_the_first_sequences(tmp_path_factory):
    loaded, store = _store("gpt2-twin", tmp_path_factory)
    sites = store.manifest.sites
    saes = {s["hook_name"]: _sae(s["d"], seed=i) for i, s in enumerate(sites)}
    tokens = store.tokens("heldout")
    specials = store.manifest.special_token_ids
    context = tokens.shape[1]
    results = evaluate_saes(saes, store, loaded=loaded, spliced_max_tokens=3 * context - 1)  # -> 3 sequences
    for hook, sae in saes.items():
        with torch.no_grad():
            clean, spliced, ablated, kl = _independent_splice(loaded.model, tokens[:3], hook, sae, specials)
        assert results[hook].ce_spliced == pytest.approx(spliced, rel=1e-5)
        assert results[hook].kl_div == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert results[hook].reconstruction.n_tokens == len(_heldout(store, hook))  # reconstruction: all tokens


def test_resampled_spliced_figures_equal_splicing_the_drawn_sequences(tmp_path_factory):
    from layerflow.evaluate.splice import splice_start, spliced_metrics, spliced_sums

    loaded, store = _store("gpt2-twin", tmp_path_factory)
    sites = store.manifest.sites
    saes = {s["hook_name"]: _sae(s["d"], seed=i) for i, s in enumerate(sites)}
    starts = {s["hook_name"]: splice_start(s["layer"], s["kind"]) for s in sites}
    tokens, specials = store.tokens("heldout"), store.manifest.special_token_ids
    sums = spliced_sums(saes, loaded.model, tokens, starts, specials)
    counts = torch.stack([torch.bincount(r, minlength=len(tokens))
                          for r in torch.randint(len(tokens), (2, len(tokens)), generator=torch.Generator().manual_seed(0))])
    for b in range(2):
        drawn = spliced_metrics(saes, loaded.model, tokens.repeat_interleave(counts[b], dim=0), starts, specials)
        for hook in saes:
            again = sums.resample(hook, counts)
            assert again["delta_ce"][b].item() == pytest.approx(drawn[hook]["delta_ce"], rel=1e-4, abs=1e-6)
            assert again["kl_div"][b].item() == pytest.approx(drawn[hook]["kl_div"], rel=1e-4, abs=1e-7)
    for hook, r in sums.metrics().items():  # every sequence once is the figure itself
        once = sums.resample(hook, torch.ones(1, len(tokens)))
        assert once["delta_ce"].item() == pytest.approx(r["delta_ce"], rel=1e-12)


def test_left_padding_tokenizer_masks_both_passes():
    """With a left-padding tokenizer TL masks leading pads itself; the spliced pass must too."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    loaded = load_model("gemma-2-2b-twin", shape=TINY_SHAPE, seed=1)
    model = loaded.model
    vocab = {f"t{i}": i for i in range(model.cfg.d_vocab)}
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                              bos_token="t2", pad_token="t0", padding_side="left")
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 12))
    tokens[:, 0] = 2
    tokens[1, :3], tokens[2, :5] = torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0, 0, 2])
    hook = "blocks.1.hook_resid_pre"
    sae = _sae(model.cfg.d_model, seed=5)
    ours = spliced_metrics({hook: sae}, model, tokens, {hook: (1, True)}, [0, 2], batch_size=4)[hook]
    with torch.no_grad():
        clean, spliced, ablated, kl = _independent_splice(model, tokens, hook, sae, [0, 2])
    assert ours["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert ours["ce_spliced"] == pytest.approx(spliced, rel=1e-5)
    assert ours["ce_zero_ablation"] == pytest.approx(ablated, rel=1e-5)
    assert ours["kl_div"] == pytest.approx(kl, rel=1e-3)


def test_cross_check_with_saelens_run_evals(tmp_path_factory):
    """Reconstruction, CE and KL figures against SAELens' run_evals on the same SAE and sequences."""
    loaded = load_model("gpt2-twin", shape=TINY_SHAPE, seed=2)
    d = loaded.model.cfg.d_model
    with torch.no_grad():  # plant a large mean in the site's activations
        loaded.model.blocks[0].mlp.b_out += 0.3 * torch.randn(d)
    _, store = _store("gpt2-twin", tmp_path_factory, loaded=loaded)
    tokens, specials = store.tokens("heldout"), store.manifest.special_token_ids
    x = _heldout(store, RESID).double()
    mean_sq, total_sq = x.mean(0).pow(2).sum().item(), x.pow(2).sum(-1).mean().item()
    assert mean_sq > 0.9 * total_sq  # variance taken around zero would be over 10x too large

    # A decent, sparse SAE: the exact one around the mean, with a noisy decoder and thresholds.
    eye = torch.eye(d)
    sae = _sae(d, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0) + 0.1 * torch.randn(2 * d, d),
               b_dec=x.mean(0).float(), b_enc=-0.05 * torch.rand(2 * d), center=True)
    sae.cfg.metadata.hook_name, sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = RESID, tokens.shape[1], False
    ours = evaluate_saes({RESID: sae}, store, loaded=loaded, batch_size=5)[RESID]

    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    make_store = lambda: ActivationsStore.from_sae(loaded.model, sae, dataset=dataset, context_size=tokens.shape[1],
                                                   store_batch_size_prompts=len(tokens), streaming=False)
    assert torch.equal(make_store().get_batch_tokens(len(tokens)).cpu(), tokens)  # the same sequences
    config = EvalConfig(batch_size_prompts=len(tokens), n_eval_reconstruction_batches=1, compute_kl=True,
                        compute_ce_loss=True, n_eval_sparsity_variance_batches=1, compute_l2_norms=True,
                        compute_sparsity_metrics=True, compute_variance_metrics=True)
    theirs, _ = run_evals(sae, make_store(), loaded.model, ActivationScaler(), config, exclude_special_tokens=specials)

    recon = ours.reconstruction
    assert 0.2 < recon.explained_variance < 0.99 and 0 < recon.l0 < 2 * d
    around_zero = 1 - recon.mse / total_sq
    assert abs(around_zero - recon.explained_variance) > 0.1  # the tolerance below would catch that bug
    assert recon.explained_variance == pytest.approx(theirs["reconstruction_quality"]["explained_variance"], abs=1e-5)
    assert recon.mse == pytest.approx(theirs["reconstruction_quality"]["mse"], rel=1e-5)
    assert recon.l0 == pytest.approx(theirs["sparsity"]["l0"], rel=1e-6)
    assert recon.l2_ratio == pytest.approx(theirs["shrinkage"]["l2_ratio"], rel=1e-5)
    assert recon.relative_reconstruction_bias == pytest.approx(theirs["shrinkage"]["relative_reconstruction_bias"], rel=1e-5)
    perf = theirs["model_performance_preservation"]
    assert ours.ce_clean == pytest.approx(perf["ce_loss_without_sae"], rel=1e-5)
    assert ours.ce_spliced == pytest.approx(perf["ce_loss_with_sae"], rel=1e-5)
    assert ours.ce_zero_ablation == pytest.approx(perf["ce_loss_with_ablation"], rel=1e-5)
    assert ours.ce_loss_score == pytest.approx(perf["ce_loss_score"], rel=1e-4)
    # A random-init model is near uniform, so zero-ablation barely moves CE; still, the score is well defined.
    assert abs(ours.ce_zero_ablation - ours.ce_clean) > 0.01
    assert ours.kl_div == pytest.approx(theirs["model_behavior_preservation"]["kl_div_with_sae"], rel=1e-3)


def test_bad_input(setup, tmp_path_factory):
    loaded, store = setup
    with pytest.raises(LayerflowError, match=r"SAE for 'blocks.0.hook_resid_post' has d_in 32.*width 64"):
        evaluate_saes({RESID: _sae(32)}, store)
    with pytest.raises(LayerflowError, match=r"'blocks.0.hook_resid_pots'.*not in the capture.*"
                                             r"Valid: blocks.0.hook_resid_pre, .*Did you mean 'blocks.0.hook_resid_post'"):
        evaluate_saes({"blocks.0.hook_resid_pots": _sae(64)}, store)
    pythia, _ = _store("pythia-70m-twin", tmp_path_factory)
    with pytest.raises(LayerflowError, match=r"capture .* is of model 'gpt2-twin', but the loaded model is 'pythia-70m-twin'"):
        evaluate_saes({RESID: _sae(64)}, store, loaded=pythia)
    with pytest.raises(LayerflowError, match=r"Batch size 0"):
        evaluate_saes({RESID: _sae(64)}, store, loaded=loaded, batch_size=0)
    with pytest.raises(LayerflowError, match=r"No eval results at"):
        read_eval_results(tmp_path_factory.mktemp("empty"))


def test_out_of_domain_fvu_equals_an_independent_computation(smollm2):
    """FVU on the shipped out-of-domain text: the model's activations on the same sequences, BOS left out,
    summed independently; the bootstrap interval brackets it."""
    from layerflow.data.tokens import TokenPlan, make_sequences
    from layerflow.evaluate.evals import ood_reconstruction

    hooks = ["blocks.3.hook_resid_post", "blocks.5.hook_mlp_out"]
    d, ctx = smollm2.model.cfg.d_model, 32
    tokens = make_sequences(12, TokenPlan("ood", ctx, True, smollm2.bos_token_id, 0), smollm2.tokenizer)
    _, cache = smollm2.model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    saes, expected = {}, {}
    for i, hook in enumerate(hooks):
        x = cache[hook][:, 1:].reshape(-1, d).double()  # BOS is the only special token here
        eye = torch.eye(d)
        saes[hook] = _sae(d, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0) + 0.05 * (i + 1) * torch.randn(2 * d, d),
                          b_dec=x.mean(0).float(), b_enc=-0.05 * torch.rand(2 * d), center=True)
        x_hat = saes[hook].decode(saes[hook].encode(x.float())).double()
        expected[hook] = ((x - x_hat).square().sum(-1).mean() / (x - x.mean(0)).square().sum(-1).mean()).item()
    specials = [smollm2.bos_token_id]
    ours = ood_reconstruction(saes, smollm2, {h: h for h in hooks}, specials, n_tokens=12 * ctx, context_size=ctx,
                              prepend_bos=True, batch_size=5)
    for hook in hooks:
        assert ours[hook]["ood_fvu"] == pytest.approx(expected[hook], rel=1e-4)
        assert ours[hook]["ood_tokens"] == 12 * (ctx - 1)
        assert ours[hook]["ood_fvu_low"] < ours[hook]["ood_fvu"] < ours[hook]["ood_fvu_high"]
    assert expected[hooks[0]] != pytest.approx(expected[hooks[1]], rel=0.1)  # the two sites are told apart
