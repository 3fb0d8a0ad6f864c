"""Transcoders trained by `layerflow.train`: several layers from one store, SAELens folders, evals
against the target (an independent splice with the MLP replaced), resume, samples, compare, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE

import layerflow.dictionaries.transcoders  # noqa: F401  (registers the transcoder classes)
from conftest import run_cli, tiny_twin
from layerflow.capture import ActivationStore, CaptureConfig, capture
from layerflow.capture.batches import heldout_batches
from layerflow.dictionaries.top_activations import top_activations
from layerflow.errors import LayerflowError
from layerflow.evaluate import read_eval_results
from layerflow.models.sites import SiteKind
from layerflow.report import compare_layers
from layerflow.train import LayerSchedule, TrainConfig, get_preset, read_samples, train

pytestmark = pytest.mark.usefixtures("one_thread")
K = SiteKind
# Each family's input site -> mlp_out: GPT-2 (mlp_in), Gemma 2 (resid_mid; RMSNorm, gated MLP,
# post-norms: mlp_out is after the post-norm), Pythia (parallel attention/MLP: resid_pre).
FAMILIES = {"gpt2-twin": K.mlp_in, "gemma-2-2b-twin": K.resid_mid, "pythia-70m-twin": K.resid_pre}
_stores: dict = {}


def _store(name, tmp_path_factory):
    if name not in _stores:
        root = tmp_path_factory.mktemp(f"tc-{name}")
        capture(CaptureConfig(model=name, layers=[0, 1], kinds=[FAMILIES[name], K.mlp_out], n_tokens=96 * 32,
                              context_size=32, source="random", holdout_fraction=0.25), root, loaded=tiny_twin(name))
        _stores[name] = ActivationStore(root)
    return _stores[name]


def _schedule(architecture="matryoshka_batchtopk_transcoder", **extra):
    base = {"expansion_factor": 4, "lr": 1e-3, "normalize_activations": "expected_average_only_in"} | extra
    if "topk" in architecture:
        base.setdefault("k", 8)
    return get_preset("transcoder").with_overrides(architecture, base) if architecture.startswith("matryoshka") \
        else LayerSchedule(architecture, base)


def _fvu(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat).square().sum(-1).mean() / (x - x.mean(0)).square().sum(-1).mean()).item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transcoders_on_every_layer_load_through_saelens_and_their_evals_are_independent(name, tmp_path_factory):
    store = _store(name, tmp_path_factory)
    run = tmp_path_factory.mktemp(f"run-{name}")
    loaded = tiny_twin(name)
    manifest = train(TrainConfig(str(store.root), schedule=_schedule(), steps=8, batch_tokens=256), run,
                     loaded=loaded)
    inputs = [s["hook_name"] for s in store.manifest.sites if s["kind"] != "mlp_out"]
    assert [s.hook_name for s in manifest.sites] == inputs and len(inputs) == 2
    keep = ~store.special_mask("heldout")
    tokens = store.tokens("heldout")
    for site in manifest.sites:
        target = f"blocks.{site.layer}.hook_mlp_out"
        assert site.hook_name_out == target
        sae = SAE.load_from_disk(run / site.folder)
        assert type(sae).__name__ == "JumpReLUTranscoder"
        assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (site.hook_name, target)
        assert sae.cfg.d_in == sae.cfg.d_out == loaded.model.cfg.d_model
        widths = sae.cfg.metadata.training_architecture_details["matryoshka_widths"]
        # Held-out FVU against mlp_out, recomputed from the folder with SAELens' own forward.
        x_in, x_out = (store.activations(h, "heldout")[keep] for h in (site.hook_name, target))
        with torch.no_grad():
            latents = sae.encode(x_in)
            fvu = _fvu(x_out, sae(x_in))
            prefix = [_fvu(x_out, latents[:, :w] @ sae.W_dec[:w] + sae.b_dec) for w in widths]
        evals = site.evals
        assert evals["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert evals["prefix_widths"] == widths and evals["prefix_fvu"] == pytest.approx(prefix, rel=1e-4)
        assert evals["l0"] == pytest.approx((latents > 0).sum(-1).double().mean().item(), rel=1e-6)

        # Spliced CE: a full forward in which the MLP output is replaced by the transcoder's prediction
        # from the same forward's input site (no cache, no start_at_layer).
        specials = torch.tensor(store.manifest.special_token_ids)
        keep_tok = ~torch.isin(tokens, specials)
        seen = {}
        hooks = [(site.hook_name, lambda a, hook: seen.update(x=a)),
                 (target, lambda a, hook: torch.where(keep_tok.unsqueeze(-1), sae(seen["x"]), a))]
        with torch.no_grad():
            clean = loaded.model(tokens)
            spliced = loaded.model.run_with_hooks(tokens, fwd_hooks=hooks)
        ce = lambda logits: -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0][keep_tok[:, :-1]].double().mean().item()
        assert evals["ce_spliced"] == pytest.approx(ce(spliced), rel=1e-5)
        assert evals["delta_ce"] == pytest.approx(ce(spliced) - ce(clean), rel=1e-3, abs=1e-6)
    frequency = read_eval_results(run)[inputs[0]].frequency
    assert frequency.shape == (4 * loaded.model.cfg.d_model,) and 0 <= frequency.min() <= frequency.max() <= 1


def test_transcoder_training_resumes_bit_identically(tmp_path_factory, tmp_path):
    store = _store("gpt2-twin", tmp_path_factory)
    cfg = TrainConfig(str(store.root), schedule=_schedule(), steps=6, batch_tokens=256, checkpoint_every=2)
    whole = train(cfg, tmp_path / "whole", evaluate=False)
    assert train(cfg, tmp_path / "cut", evaluate=False, stop_after=3) is None
    resumed = train(cfg, tmp_path / "cut", evaluate=False)
    for a, b in zip(whole.sites, resumed.sites):
        wa, wb = (load_file(tmp_path / run / a.folder / "sae_weights.safetensors") for run in ("whole", "cut"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    curves = [json.loads((tmp_path / run / "curves.json").read_text()) for run in ("whole", "cut")]
    assert curves[0] == curves[1] and len(curves[0][whole.sites[0].hook_name]["prefix_fvu"]) == 6


def test_training_samples_are_each_latents_top_activating_tokens(tmp_path_factory, tmp_path):
    store = _store("gpt2-twin", tmp_path_factory)
    cfg = TrainConfig(str(store.root), schedule=_schedule("topk_transcoder"), steps=4, batch_tokens=256,
                      samples_every=2, samples_tokens=400)
    manifest = train(cfg, tmp_path, evaluate=False)
    step, tops = read_samples(tmp_path)
    assert step == 4 and read_samples(tmp_path, 2)[0] == 2
    site = manifest.sites[0]
    # The saved TopK transcoder's latents are the training ones times 1/scale_out (folded in), so
    # the same tokens are each latent's top ones.
    sae = SAE.load_from_disk(tmp_path / site.folder)
    batches = ((acts[site.hook_name], pos) for acts, pos in heldout_batches(store, [site.hook_name],
                                                                           store.manifest.special_token_ids, 400))
    expected = top_activations(sae.encode, batches, sae.cfg.d_sae, k=tops[site.hook_name].k)
    got = tops[site.hook_name]
    assert torch.equal(got.positions, expected.positions)
    assert torch.allclose(got.values / site.target_scaling_factor, expected.values, rtol=1e-4, atol=1e-6)
    with pytest.raises(LayerflowError, match="Recorded steps: 2, 4"):
        read_samples(tmp_path, 3)


def test_bad_transcoder_input(tmp_path_factory, tmp_path):
    store = _store("gpt2-twin", tmp_path_factory)
    only_inputs = tmp_path / "inputs"
    capture(CaptureConfig(model="gpt2-twin", layers=[0], kinds=[K.mlp_in], n_tokens=512, context_size=32,
                          source="random"), only_inputs, loaded=tiny_twin("gpt2-twin"))
    with pytest.raises(LayerflowError, match=r"blocks.0.hook_mlp_out is not in the capture.*--sites <input>,mlp_out"):
        train(TrainConfig(str(only_inputs), schedule=_schedule(), steps=1), tmp_path / "a")
    with pytest.raises(LayerflowError, match="mlp_out site is what the transcoders predict, not an input"):
        train(TrainConfig(str(store.root), hooks=["blocks.0.hook_mlp_out"], schedule=_schedule(), steps=1),
              tmp_path / "b")
    with pytest.raises(LayerflowError, match="Unknown site kind"):
        train(TrainConfig(str(store.root), schedule=_schedule(), steps=1, transcoder_target="mlp_output"),
              tmp_path / "c")


def test_cli_trains_compares_and_shows_samples(tmp_path_factory, tmp_path):
    store = _store("gpt2-twin", tmp_path_factory)
    run = tmp_path / "run"
    done = run_cli("train", str(store.root), "--preset", "transcoder", "--set", "k=8", "--steps", "4",
                   "--batch-tokens", "256", "--samples-every", "2", "--out", str(run), "--no-model-eval")
    assert done.returncode == 0, done.stderr
    assert "2 transcoders (matryoshka_batchtopk_transcoder)" in done.stdout and "0.mlp_out" in done.stdout
    shown = run_cli("compare", str(run), "--layers", "0,1")
    assert shown.returncode == 0, shown.stderr
    assert (run / "plots" / "compare-L0-L1.png").stat().st_size > 10_000
    comparison = compare_layers(run, [1])
    assert [s.layer for s in comparison.sites] == [1] and comparison.sites[0].target == "blocks.1.hook_mlp_out"
    assert len(comparison.sites[0].curves["fvu"]) == 4
    samples = run_cli("samples", str(run), "--hook", "blocks.1.mlp.hook_in", "--features", "2")
    assert samples.returncode == 0 and "[[<" in samples.stdout  # twins have no tokenizer: token ids, marked
    for args, message in ((("compare", str(run), "--layers", "0,7"), "Layer 7 has no dictionary"),
                          (("compare", str(run), "--layers", "a"), "is not a comma-separated list"),
                          (("samples", str(run), "--step", "3"), "Recorded steps: 2, 4")):
        bad = run_cli(*args)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr


def test_matryoshka_saes_get_the_same_prefix_evals(tmp_path_factory, tmp_path):
    """SAELens' own matryoshka_batchtopk SAE, from the same schedule machinery: per-prefix FVU too."""
    store = _store("gpt2-twin", tmp_path_factory)
    schedule = LayerSchedule("matryoshka_batchtopk", {"expansion_factor": 4, "k": 8, "lr": 1e-3,
                                                      "matryoshka_fractions": [0.25, 1.0]})
    manifest = train(TrainConfig(str(store.root), hooks=["blocks.1.hook_mlp_out"], schedule=schedule, steps=6,
                                 batch_tokens=256), tmp_path, model_eval=False)
    site = manifest.sites[0]
    sae = SAE.load_from_disk(tmp_path / site.folder)
    x = store.activations(site.hook_name, "heldout")[~store.special_mask("heldout")]
    with torch.no_grad():
        latents = sae.encode(x)
        coarse = _fvu(x, latents[:, :64] @ sae.W_dec[:64] + sae.b_dec)
    assert site.evals["hook_name_out"] is None and site.evals["prefix_widths"] == [64, 256]
    assert site.evals["prefix_fvu"] == pytest.approx([coarse, _fvu(x, sae(x))], rel=1e-4)
