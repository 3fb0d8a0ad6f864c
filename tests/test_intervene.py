"""`intervene`: feature edits through the SAE with its error term kept, and what they change.

A tiny random-init GPT-2 twin and real SAELens SAEs trained on it by a tiny `layerflow run`
(test_trace.py uses the same kind of run). The end-to-end check on the real model is in
test_trace.py (slow)."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_twin
from layerflow.errors import LayerflowError
from layerflow.evaluate import next_token_nll
from layerflow.experiment import ExperimentConfig
from layerflow.features.describe import decoder_directions
from layerflow.features.intervene import FeatureEdit, edit_hooks, edited, heldout_effects, intervene, rank_features
from layerflow.features.run_saes import RunSAEs
from layerflow.pipeline import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "gpt2-twin"
L0, L1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
PROMPT = [3, 17, 33, 99, 100, 7, 250, 41]  # token ids: the twin has no tokenizer


def tiny_run(folder):
    cfg = ExperimentConfig.from_dict({
        "name": "tiny", "models": [{"name": MODEL, "layers": [0, 1]}],
        "capture": {"tokens": 1600, "context_size": 32, "source": "random", "holdout": 0.2},
        "train": {"steps": 12, "batch_tokens": 128, "set": {"expansion_factor": 2, "lr": 1e-3}},
        "eval": {"spliced": False}, "transfer": {"max_tokens": 256}})
    run_experiment(cfg, folder, load=tiny_twin, until="transfer")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def loaded(run):
    return RunSAEs.open(run).load(tiny_twin)


@torch.no_grad()
def _site(loaded, hook, tokens):
    _, cache = loaded.tl_model.run_with_cache(torch.tensor([tokens]), names_filter=hook)
    return cache[hook]


def test_edit_modes_set_the_latent_as_documented():
    a = torch.tensor([[0.0, 2.0, 3.0]])
    expected = {("ablate", None): 0.0, ("scale", 0.5): 1.0, ("clamp", 7.0): 7.0, ("steer", -0.5): 1.5}
    for (mode, value), want in expected.items():
        b = a.clone()
        FeatureEdit(1, mode, value).apply(b)
        assert b.tolist() == [[0.0, want, 3.0]], mode
    with pytest.raises(LayerflowError, match="needs a value"):
        FeatureEdit(1, "clamp")
    with pytest.raises(LayerflowError, match="Unknown mode 'ablaet'.*Did you mean 'ablate'"):
        FeatureEdit(1, "ablaet")


@torch.no_grad()
def test_ablation_moves_the_site_by_exactly_minus_activation_times_decoder_direction(loaded):
    sae = loaded.saes[L0]
    x = _site(loaded, L0, PROMPT)[0]
    latents = loaded.encode(L0, x)
    active = (latents > 0).sum(0)
    f = int(((active > 0) & (active < len(PROMPT))).nonzero()[0])  # active at some positions, silent at others
    new, clean_latents = edited(sae, x, x, [FeatureEdit(f)])
    assert torch.equal(clean_latents, latents)
    direction = decoder_directions(sae, [f])[0]
    expected = x - latents[:, f:f + 1] * direction
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-5)
    silent = latents[:, f] == 0
    assert silent.any() and torch.equal(new[silent], x[silent])  # bit for bit where the feature is silent
    # the reconstruction error term is kept: the edited activation is dec(a') + (x - dec(a)), not dec(a')
    changed = latents.clone()
    changed[:, f] = 0
    torch.testing.assert_close(new, sae.decode(changed) + (x - sae.decode(latents)), rtol=0, atol=1e-5)
    assert (new - sae.decode(changed)).norm() > 1e-3


@torch.no_grad()
def test_zero_scale_ablation_of_an_inactive_feature_changes_nothing(loaded):
    x = _site(loaded, L0, PROMPT)[0]
    silent = ((loaded.encode(L0, x) > 0).sum(0) == 0).nonzero()[:, 0]
    f = int(silent[0])
    model = loaded.tl_model
    tokens = torch.tensor([PROMPT])
    clean = model(tokens)
    for edit in (FeatureEdit(f, "scale", 0.0), FeatureEdit(f)):
        with model.hooks(fwd_hooks=edit_hooks(loaded.saes[L0], L0, L0, [edit], None)):
            assert torch.equal(model(tokens), clean)  # bit for bit
    result = intervene(loaded, 0, f, "scale", 0.0, prompt=PROMPT, heldout_tokens=64, describe=False)
    assert result.clean_activation == {f: 0.0}
    assert all(layer.n_changed == 0 and layer.changes == [] for layer in result.downstream)
    assert result.kl_at_token == 0 and result.kl_prompt_mean == 0


@torch.no_grad()
def test_downstream_changes_equal_an_independent_patched_forward(loaded):
    x = _site(loaded, L0, PROMPT)[0]
    latents = loaded.encode(L0, x)
    f = int(latents[-1].argmax())  # the strongest feature at the last token
    value = float(x.norm(dim=-1).mean())  # clamped far above its activation: a large, measurable effect
    result = intervene(loaded, 0, f, "clamp", value, prompt=PROMPT, tokens=["5", "9"], top_n=4, heldout_tokens=0)
    assert result.layer == 0 and result.position == len(PROMPT) - 1
    assert result.clean_activation[f] == pytest.approx(float(latents[-1, f]))
    # independent: add (v - a_f) * W_dec[f] (JumpReLU decodes linearly) at every position, by hand
    sae = loaded.saes[L0]

    def patch(act, hook):
        a = sae.encode(act)
        return act + (value - a[..., f:f + 1]) * sae.W_dec[f]

    model = loaded.tl_model
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(tokens, names_filter=L1)
        with model.hooks(fwd_hooks=[(L0, patch)]):
            new_logits, new = model.run_with_cache(tokens, names_filter=L1)
    delta = loaded.encode(L1, new[L1][0, -1]) - loaded.encode(L1, clean[L1][0, -1])
    [layer] = result.downstream
    assert layer.hook == L1 and layer.n_changed >= 1
    top = delta.abs().topk(4).indices.tolist()
    assert [c.feature for c in layer.changes] == top
    for c in layer.changes:
        assert c.delta == pytest.approx(float(delta[c.feature]), abs=1e-4)
    assert [t.token_id for t in result.logits] == [5, 9]
    for t in result.logits:
        assert t.clean == pytest.approx(float(clean_logits[0, -1, t.token_id]), abs=1e-5)
        assert t.edited == pytest.approx(float(new_logits[0, -1, t.token_id]), abs=1e-4)
    kl = F.kl_div(new_logits.log_softmax(-1), clean_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert result.kl_at_token == pytest.approx(float(kl[0, -1]), rel=1e-3, abs=1e-7)
    assert result.logit_difference == pytest.approx((result.logits[0].clean - result.logits[1].clean,
                                                     result.logits[0].edited - result.logits[1].edited))


@torch.no_grad()
def test_heldout_effects_equal_a_full_forward_from_the_tokens(loaded):
    f = int(loaded.feature_stats([L1])[L1].density.argmax())
    [effect] = heldout_effects(loaded, L1, [[FeatureEdit(f)]], max_tokens=64)
    tokens = loaded.store.tokens("heldout")[:2]  # 64 tokens = two sequences of 32
    specials = torch.tensor(loaded.special_ids)
    keep = ~torch.isin(tokens, specials)
    model = loaded.tl_model
    clean = model(tokens).log_softmax(-1)
    with model.hooks(fwd_hooks=edit_hooks(loaded.saes[L1], L1, L1, [FeatureEdit(f)], keep)):
        new = model(tokens).log_softmax(-1)
    assert effect.n_tokens == int(keep[:, :-1].sum())
    assert effect.ce_clean == pytest.approx(float(next_token_nll(clean, tokens)[keep[:, :-1]].mean()), rel=1e-5)
    assert effect.ce_edited == pytest.approx(float(next_token_nll(new, tokens)[keep[:, :-1]].mean()), rel=1e-5)
    kl = F.kl_div(new, clean, log_target=True, reduction="none").sum(-1)
    assert effect.kl_mean == pytest.approx(float(kl[keep].mean()), rel=1e-3)
    active = keep & (loaded.encode(L1, model.run_with_cache(tokens, names_filter=L1)[1][L1])[..., f] > 0)
    assert effect.active_fraction == pytest.approx(float(active.sum() / keep.sum()))
    assert effect.kl_when_active == pytest.approx(float(kl[active].mean()), rel=1e-3)


@torch.no_grad()
def test_steering_along_a_planted_unembedding_direction_moves_that_tokens_logit(loaded):
    planted = copy.copy(loaded)
    planted.saes = dict(loaded.saes)
    sae = planted.saes[L1] = copy.deepcopy(loaded.saes[L1])
    model = loaded.tl_model
    target, other, f = 123, 45, 7
    with torch.no_grad():
        u = model.W_U[:, target] - model.W_U[:, other]
        sae.W_dec[f] = u / u.norm()  # decoding feature f now writes "target over other" into the last residual
    norm = float(_site(loaded, L1, PROMPT)[0, -1].norm())
    moves = {}
    for value in (-2 * norm, 2 * norm):
        r = intervene(planted, 1, f, "steer", value, prompt=PROMPT, tokens=[str(target), str(other)],
                      heldout_tokens=0, describe=False)
        clean, steered = r.logit_difference
        moves[value > 0] = steered - clean
    assert moves[True] > 1.0 and moves[False] < -1.0
    # and the effect is the planted direction's: the target's log-prob rises with +v, falls with -v
    tokens = torch.tensor([PROMPT])
    logp = {}
    for value in (-2 * norm, 0.0, 2 * norm):
        with model.hooks(fwd_hooks=edit_hooks(sae, L1, L1, [FeatureEdit(f, "steer", value)], None)):
            logp[value] = float(model(tokens).log_softmax(-1)[0, -1, target])
    assert logp[-2 * norm] < logp[0.0] < logp[2 * norm]


@torch.no_grad()
def test_rank_features_ranks_by_effect_and_reports_selectivity(loaded):
    ranking = rank_features(loaded, [0, 1], n=4, heldout_tokens=64)
    assert [layer.hook for layer in ranking.layers] == [L0, L1]
    stats = loaded.feature_stats()
    for layer in ranking.layers:
        assert len(layer.features) == 4
        kls = [r.effect.kl_mean for r in layer.features]
        assert kls == sorted(kls, reverse=True)
        density = stats[layer.hook].density
        assert {r.feature for r in layer.features} == set(density.topk(4).indices.tolist())
        for r in layer.features:
            assert r.density == pytest.approx(float(density[r.feature]))
            assert r.description is not None and r.description.feature == r.feature
        for rho in (layer.spearman_density_kl, layer.spearman_density_kl_when_active):
            assert rho is None or -1 <= rho <= 1
    on_prompt = rank_features(loaded, [0], n=3, prompt=PROMPT, heldout_tokens=32)
    acts = loaded.encode(L0, _site(loaded, L0, PROMPT)[0, -1])
    assert {r.feature for r in on_prompt.layers[0].features} == set(acts.topk(3).indices.tolist())
    assert "selection" in on_prompt.to_dict()


# ------------------------------------------------------------------ bad input


def test_bad_input_through_the_api(run, loaded):
    with pytest.raises(LayerflowError, match=r"Feature 99999 is out of range for blocks.0.hook_resid_post: valid ids are 0..127"):
        intervene(run, 0, 99999, prompt=PROMPT, load=tiny_twin)
    with pytest.raises(LayerflowError, match="The prompt is empty"):
        intervene(run, 0, 1, prompt="  ", load=tiny_twin)
    with pytest.raises(LayerflowError, match="longer than gpt2-twin's context of 256 tokens"):
        intervene(loaded, 0, 1, prompt=list(range(300)), heldout_tokens=0)
    with pytest.raises(LayerflowError, match=r"Layer 5 is out of range: gpt2-twin has 2 layers \(0..1\)"):
        intervene(run, 5, 1, prompt=PROMPT, load=tiny_twin)
    with pytest.raises(LayerflowError, match="is of gpt2-twin, not 'smollm2-135m'"):
        intervene(run, 0, 1, prompt=PROMPT, model="smollm2-135m")
    with pytest.raises(LayerflowError, match="no tokenizer: give token ids, not 'x'"):
        intervene(loaded, 0, 1, prompt=PROMPT, tokens=["x"], heldout_tokens=0)
    with pytest.raises(LayerflowError, match="Mode 'clamp' needs a value"):
        intervene(run, 0, 1, "clamp", prompt=PROMPT, load=tiny_twin)


@pytest.fixture(scope="module")
def broken_runs(run, tmp_path_factory):
    """Copies of the run: one with layer 0's SAE removed, one whose SAE says it was trained on another model."""
    missing = tmp_path_factory.mktemp("missing") / "run"
    shutil.copytree(run, missing)
    shutil.rmtree(missing / "saes" / MODEL / L0)
    foreign = tmp_path_factory.mktemp("foreign") / "run"
    shutil.copytree(run, foreign)
    cfg = foreign / "saes" / MODEL / L1 / "cfg.json"
    cfg.write_text(cfg.read_text().replace(f'"layerflow_model": "{MODEL}"', '"layerflow_model": "pythia-70m"'))
    return missing, foreign


def test_bad_run_folders(broken_runs):
    missing, foreign = broken_runs
    with pytest.raises(LayerflowError, match=r"Layer 0 has no SAE in the run at .* Layers with SAEs: 1\."):
        RunSAEs.open(missing).hook_at(0)
    with pytest.raises(LayerflowError, match="was trained on 'pythia-70m', but it sits in the run's folder for 'gpt2-twin'"):
        RunSAEs.open(foreign)


@pytest.mark.parametrize("case", ["feature out of range", "layer without SAE"])  # "other model": test_trace.py
def test_bad_input_through_the_cli(case, run, broken_runs):
    missing, _ = broken_runs
    args, expected = {
        "feature out of range": ((run, "--layer", "1", "--feature", "99999", "--prompt", "a"),
                                 "Feature 99999 is out of range for blocks.1.hook_resid_post: valid ids are 0..127."),
        "layer without SAE": ((missing, "--layer", "0", "--feature", "1"), "Layer 0 has no SAE in the run at"),
    }[case]
    done = run_cli("intervene", "--run", str(args[0]), *args[1:])
    assert done.returncode != 0
    assert expected in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory):
    """A run whose dictionaries are transcoders (mlp_in -> mlp_out), trained into its SAE folder."""
    from layerflow.train import TrainConfig, get_preset, train

    folder = tmp_path_factory.mktemp("tc-run")
    cfg = ExperimentConfig.from_dict({
        "name": "tiny", "models": [{"name": MODEL, "layers": [0, 1]}],
        "capture": {"tokens": 1600, "context_size": 32, "source": "random", "holdout": 0.2,
                    "sites": ["mlp_in", "mlp_out"]}})
    run_experiment(cfg, folder, load=tiny_twin, until="capture")
    schedule = get_preset("transcoder").with_overrides(base={"expansion_factor": 2, "k": 8, "lr": 1e-3})
    train(TrainConfig(str(folder / "activations" / MODEL), schedule=schedule, steps=12, batch_tokens=128),
          folder / "saes" / MODEL, sae_subdir="", evaluate=False)
    return folder


@torch.no_grad()
def test_transcoders_are_traced_at_their_input_and_edited_at_their_output(transcoder_run):
    from layerflow.features.trace import trace

    hook_in, hook_out = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    loaded = RunSAEs.open(transcoder_run).load(tiny_twin)
    tc = loaded.saes[hook_in]
    assert loaded.output_hook(hook_in) == hook_out
    tokens = torch.tensor([PROMPT])
    _, cache = loaded.tl_model.run_with_cache(tokens, names_filter=[hook_in, hook_out])
    x_in, x_out = cache[hook_in][0], cache[hook_out][0]
    # trace: the latents are the transcoder's encoding of the MLP input
    traced = trace(transcoder_run, PROMPT, top_k=3, load=tiny_twin).models[MODEL]
    layer = [entry for entry in traced.positions[0].layers if entry.hook == hook_in][0]
    values, features = tc.encode(x_in[-1]).topk(3)
    assert [h.feature for h in layer.top] == features.tolist()
    assert [h.activation for h in layer.top] == pytest.approx(values.tolist())
    # an ablation moves the MLP output (not the input) by -a_f W_dec[f], and only where f fires
    latents = tc.encode(x_in)
    active = (latents > 0).sum(0)
    f = int(((active > 0) & (active < len(PROMPT))).nonzero()[0])
    new, _ = edited(tc, x_in, x_out, [FeatureEdit(f)])
    torch.testing.assert_close(new, x_out - latents[:, f:f + 1] * tc.W_dec[f], rtol=0, atol=1e-5)
    silent = latents[:, f] == 0
    assert torch.equal(new[silent], x_out[silent])
    seen = {}
    edits = [FeatureEdit(int(((active == 0)).nonzero()[0]))]  # a feature silent on the whole prompt
    clean = loaded.tl_model(tokens)
    with loaded.tl_model.hooks(fwd_hooks=edit_hooks(tc, hook_in, hook_out, edits, None, seen)):
        assert torch.equal(loaded.tl_model(tokens), clean)
    assert torch.equal(seen["latents"], latents.unsqueeze(0))
