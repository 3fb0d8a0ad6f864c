"""Training runs: SAELens folders, determinism, resume, bad input, and the 30-layer end-to-end run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE

from conftest import run_cli, tiny_twin
from layerflow.capture import ActivationStore, CaptureConfig, capture
from layerflow.errors import LayerflowError
from layerflow.files import CHECKPOINT_DIR, TrainManifest
from layerflow.train import LayerSchedule, TrainConfig, train

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    capture(CaptureConfig(model="gpt2-twin", layers=[0, 1], n_tokens=6144, context_size=32, source="random"),
            root, loaded=tiny_twin("gpt2-twin"))
    return root


def _schedule(arch: str) -> LayerSchedule:
    base = {"expansion_factor": 4, "normalize_activations": "expected_average_only_in", "lr": 1e-3}
    if "topk" in arch:
        base["k"] = 8
    elif arch in ("standard", "gated"):
        base["l1_coefficient"] = 1.0
    return LayerSchedule(arch, base)


def _weights(run) -> dict:
    return {h: load_file(run / "saes" / h / "sae_weights.safetensors") for h in HOOKS}


@pytest.mark.parametrize("arch", ["batchtopk", "standard"])  # the stacked sparse path and SAELens' own step
def test_same_seed_same_result_and_resume_continues_exactly(tiny_store, tmp_path, arch):
    cfg = TrainConfig(str(tiny_store), schedule=_schedule(arch), steps=12, batch_tokens=256, checkpoint_every=4)
    full = train(cfg, tmp_path / "full", evaluate=False)
    again = train(cfg, tmp_path / "again", evaluate=False)
    assert train(cfg, tmp_path / "interrupted", evaluate=False, stop_after=6) is None
    assert sorted(p.name for p in (tmp_path / "interrupted" / CHECKPOINT_DIR).iterdir()) == ["step-000000006"]
    assert not (tmp_path / "interrupted" / "train.json").exists()
    resumed = train(cfg, tmp_path / "interrupted", evaluate=False)
    assert [s.final_loss for s in full.sites] == [s.final_loss for s in again.sites] == [s.final_loss for s in resumed.sites]
    a, b, c = _weights(tmp_path / "full"), _weights(tmp_path / "again"), _weights(tmp_path / "interrupted")
    for h in HOOKS:
        for key in a[h]:
            assert torch.equal(a[h][key], b[h][key]) and torch.equal(a[h][key], c[h][key]), (h, key)
    assert not (tmp_path / "interrupted" / CHECKPOINT_DIR).exists()  # cleaned up once complete


def test_different_seed_gives_different_saes(tiny_store, tmp_path):
    runs = [train(TrainConfig(str(tiny_store), schedule=_schedule("topk"), steps=3, batch_tokens=256, seed=s),
                  tmp_path / str(s), evaluate=False) for s in (0, 1)]
    assert runs[0].sites[0].final_loss != runs[1].sites[0].final_loss


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"])
def test_every_architecture_saves_a_folder_saelens_loads(tiny_store, tmp_path, arch):
    manifest = train(TrainConfig(str(tiny_store), schedule=_schedule(arch), steps=4, batch_tokens=256), tmp_path,
                     evaluate=False)
    store = ActivationStore(tiny_store)
    for site in manifest.sites:
        sae = SAE.load_from_disk(tmp_path / site.folder)
        meta = sae.cfg.metadata
        assert meta.hook_name == site.hook_name and meta.model_name == store.manifest.model["official_name"]
        assert meta.context_size == 32 and meta.prepend_bos is True
        assert meta.exclude_special_tokens == store.manifest.special_token_ids
        assert meta.model_from_pretrained_kwargs == store.manifest.model["from_pretrained_kwargs"]
        assert (tmp_path / site.folder / "sparsity.safetensors").exists()
        x = store.activations(site.hook_name, "heldout")[:64]
        assert sae(x).shape == x.shape and torch.isfinite(sae(x)).all()


def test_scale_is_folded_so_saved_saes_read_raw_activations(tiny_store, tmp_path):
    """Train on activations scaled to norm sqrt(d); the saved SAE must reconstruct raw ones just as well."""
    manifest = train(TrainConfig(str(tiny_store), schedule=_schedule("topk"), steps=30, batch_tokens=512,
                                 dead_feature_window=1000), tmp_path,  # no AuxK term in the final loss
                     evaluate=False)
    store = ActivationStore(tiny_store)
    site = manifest.sites[1]
    assert abs(site.scaling_factor - 1.0) > 0.05  # the test means something only if scaling did something
    sae = SAE.load_from_disk(tmp_path / site.folder)
    x = store.activations(site.hook_name, "train")[:2048]
    x = x[~store.special_mask("train")[:2048]]
    raw_loss = (sae(x) - x).pow(2).sum(-1).mean().item()
    # final_loss is in scaled units: MSE scales with the square of the factor.
    assert raw_loss * site.scaling_factor**2 == pytest.approx(site.final_loss, rel=0.25)


def test_bad_input_is_refused_clearly(tiny_store, tmp_path):
    cfg = TrainConfig(str(tiny_store), schedule=_schedule("topk"), steps=2, batch_tokens=256)
    with pytest.raises(LayerflowError, match=r"blocks.7.hook_resid_post.*Captured: blocks.0"):
        train(TrainConfig(str(tiny_store), hooks=["blocks.7.hook_resid_post"]), tmp_path / "a")
    foreign = tmp_path / "foreign"
    (foreign / "some_sae").mkdir(parents=True)
    (foreign / "some_sae" / "cfg.json").write_text("{}")
    with pytest.raises(LayerflowError, match="holds SAEs that this run did not write"):
        train(cfg, foreign)
    assert (foreign / "some_sae" / "cfg.json").exists()
    train(cfg, tmp_path / "run", evaluate=False)
    other = TrainConfig(str(tiny_store), schedule=_schedule("topk"), steps=3, batch_tokens=256)
    with pytest.raises(LayerflowError, match="different training run.*steps: 2 -> 3"):
        train(other, tmp_path / "run")


def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(tiny_store, tmp_path):
    schedule = LayerSchedule("topk", {"expansion_factor": 4, "k": 8, "lr": 1e4})
    cfg = TrainConfig(str(tiny_store), schedule=schedule, steps=50, batch_tokens=256, checkpoint_every=1)
    with pytest.raises(LayerflowError, match="diverged at step") as info:
        train(cfg, tmp_path, evaluate=False)
    assert "last good checkpoint is kept" in str(info.value)
    checkpoints = list((tmp_path / CHECKPOINT_DIR).iterdir())
    assert len(checkpoints) == 1 and not (tmp_path / "train.json").exists()


def test_cli_train_and_eval_on_a_twin(tiny_store, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", str(tiny_store), "--out", str(run), "--steps", "3", "--batch-tokens", "256",
                     "--set", "expansion_factor=2", "--set", "k=4", "--no-model-eval")
    assert result.returncode == 0, result.stderr
    assert "FVU" in result.stdout and (run / "evals.csv").exists()
    manifest = TrainManifest.from_json((run / "train.json").read_text())
    assert all(s.evals and s.evals["fvu"] > 0 for s in manifest.sites)
    assert all(s.hyperparameters["k"] == 4 for s in manifest.sites)
    result = run_cli("eval", str(run), "--no-model-eval")
    assert result.returncode == 0, result.stderr
    bad = run_cli("train", str(tiny_store), "--out", str(tmp_path / "x"), "--set", "kk=4", "--no-model-eval")
    assert bad.returncode == 2 and "Unknown hyperparameter 'kk'" in bad.stderr and "Traceback" not in bad.stderr


def test_thirty_layers_of_the_default_model_end_to_end(tmp_path):
    """`layerflow train` on all 30 layers of SmolLM2: 30 SAELens folders whose held-out FVU, recomputed
    here from the raw activations, is what the manifest reports."""
    store_dir, run = tmp_path / "capture", tmp_path / "train"
    result = run_cli("capture", "smollm2-135m", "--layers", "all", "--tokens", "2560", "--context-size", "64",
                     "--holdout", "0.25", "--out", str(store_dir))
    assert result.returncode == 0, result.stderr
    # Spliced CE/KL on the real model are left out here (30 sites x held-out passes); twins cover them.
    result = run_cli("train", str(store_dir), "--out", str(run), "--steps", "30", "--batch-tokens", "512",
                     "--architecture", "topk", "--set", "expansion_factor=2", "--set", "k=16", "--set", "lr=3e-3",
                     "--no-model-eval")
    assert result.returncode == 0, result.stderr
    manifest = TrainManifest.from_json((run / "train.json").read_text())
    store = ActivationStore(store_dir)
    assert len(manifest.sites) == 30
    keep = ~store.special_mask("heldout")
    for site in manifest.sites:
        sae = SAE.load_from_disk(run / site.folder)
        assert sae.cfg.metadata.hook_name == site.hook_name == f"blocks.{site.layer}.hook_resid_post"
        x = store.activations(site.hook_name, "heldout")[keep].double()
        with torch.no_grad():
            x_hat = sae(x.float()).double()
        fvu = ((x - x_hat).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()).item()
        assert site.evals["fvu"] == pytest.approx(fvu, rel=1e-4), site.hook_name
        assert fvu < 0.95  # better than the mean, at every depth (an untrained SAE is far worse)
    rows = (run / "evals.csv").read_text().splitlines()
    assert len(rows) == 31


def test_online_training_from_model_forwards(tmp_path):
    """Online: the training split is never stored; its activations come from live forwards."""
    from layerflow.capture.batches import model_chunks

    loaded = tiny_twin("gpt2-twin")
    online = CaptureConfig(model="gpt2-twin", layers=[0, 1], n_tokens=6144, context_size=32, source="random")
    cfg = TrainConfig(str(tmp_path / "heldout"), schedule=_schedule("topk"), steps=30, batch_tokens=512, online=online)
    manifest = train(cfg, tmp_path / "run", loaded=loaded)
    store = ActivationStore(tmp_path / "heldout")
    assert store.shards("train") == [] and store.shards("heldout")
    assert all(s.evals["fvu"] < 1 for s in manifest.sites)
    # The live activations are the ones a full capture stores for the same sequences.
    full = tmp_path / "full"
    capture(online, full, loaded=loaded)
    full_store = ActivationStore(full)
    tokens = full_store.tokens("train")[:4]
    acts, ids = next(model_chunks(loaded.model, tokens, HOOKS, batch_size=4))
    assert torch.equal(ids, tokens.reshape(-1))
    for i, h in enumerate(HOOKS):
        torch.testing.assert_close(acts[i], full_store.activations(h, "train")[: tokens.numel()])
    assert train(cfg, tmp_path / "run", loaded=loaded).sites == manifest.sites  # complete: returned as is


def test_stacked_path_equals_saelens_trainer_through_a_whole_run(tiny_store, tmp_path):
    """Same run, TopK SAEs stepped by the stacked sparse path or by SAELens' SAETrainer: same SAEs.
    Covers warm-up and decay of the LR schedule, and a learning rate that varies with depth."""
    schedule = LayerSchedule("topk", {"expansion_factor": 4, "k": 8, "normalize_activations": "expected_average_only_in"},
                             [(0.5, {"lr": 3e-3}), (1.0, {"lr": 1e-3})])
    runs = {}
    for fast in (True, False):
        cfg = TrainConfig(str(tiny_store), schedule=schedule, steps=12, batch_tokens=256, lr_warm_up_steps=3,
                          lr_decay_steps=4, dead_feature_window=2, fast_path=fast)
        runs[fast] = train(cfg, tmp_path / str(fast), evaluate=False)
    a, b = _weights(tmp_path / "True"), _weights(tmp_path / "False")
    for h in HOOKS:
        for key in a[h]:
            torch.testing.assert_close(a[h][key], b[h][key], rtol=2e-4, atol=2e-5, msg=f"{h} {key}")
    assert [s.hyperparameters["lr"] for s in runs[True].sites] == [3e-3, 1e-3]


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_decoder_bias_starts_at_the_training_mean(tiny_store, tmp_path, arch):
    """init_b_dec="mean": before any real learning (lr ~ 0) the saved b_dec, in raw units, is the mean
    training activation; "zeros" keeps SAELens' init."""
    schedule = LayerSchedule(arch, {**_schedule(arch).base, "lr": 1e-12})
    store = ActivationStore(tiny_store)
    keep = ~store.special_mask("train")
    for init in ("mean", "zeros"):
        manifest = train(TrainConfig(str(tiny_store), schedule=schedule, steps=1, batch_tokens=256, init_b_dec=init),
                         tmp_path / init, evaluate=False)
        for site in manifest.sites:
            b_dec = SAE.load_from_disk(tmp_path / init / site.folder).b_dec.detach()
            if init == "zeros":
                assert b_dec.abs().max() < 1e-6
                continue
            x = store.activations(site.hook_name, "train")[keep]
            mean, spread = x.mean(0), x.std(0) / (8 * 256) ** 0.5  # the estimate uses 8 batches of 256 tokens
            assert ((b_dec - mean).abs() < 5 * spread + 1e-6).all(), site.hook_name
    with pytest.raises(LayerflowError, match="Unknown init_b_dec 'median'. Valid: mean, zeros"):
        train(TrainConfig(str(tiny_store), schedule=schedule, steps=1, init_b_dec="median"), tmp_path / "bad")


def test_dead_feature_window_scales_with_the_run(tiny_store, tmp_path):
    """The default window is a fifth of the run (10 to 1000 steps), so AuxK acts in a short run too;
    the plan records the window used, and an explicit one is kept."""
    from layerflow.train.config import dead_feature_window

    assert [dead_feature_window(n) for n in (3, 104, 2_000, 50_000)] == [10, 21, 400, 1000]
    schedule = _schedule("batchtopk")
    for window, expected in ((None, 10), (7, 7)):
        cfg = TrainConfig(str(tiny_store), schedule=schedule, steps=12, batch_tokens=128, dead_feature_window=window)
        train(cfg, tmp_path / str(window), evaluate=False)
        assert json.loads((tmp_path / str(window) / "plan.json").read_text())["dead_feature_window"] == expected
