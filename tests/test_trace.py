"""`trace`: per-layer top SAE features for a prompt, their cached descriptions, and trajectories.

Tiny random-init twins and SAEs trained on them by a tiny `layerflow run`; the chaining rule on
planted matchings; one slow end-to-end test of `trace` and `intervene` through the CLI on a
`layerflow run --quick` folder of the real embedded model."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, tiny_twin
from layerflow.errors import LayerflowError
from layerflow.experiment import ExperimentConfig
from layerflow.features.describe import cache_path, decoder_directions, promoted_tokens
from layerflow.features.run_saes import RunSAEs
from layerflow.features.trace import LayerFeatures, chain_features, trace
from layerflow.pipeline import run_experiment
from layerflow.report.plots import trace_flow
from layerflow.transfer.matching import FeatureMatching

pytestmark = pytest.mark.usefixtures("one_thread")

L0, L1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
PROMPT = [3, 17, 33, 99, 100, 7, 250, 41]  # token ids: twins have no tokenizer
MODELS = ["gpt2-twin", "pythia-70m-twin"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two tiny twins in one run (their vocabularies are both 512 at the tiny shape)."""
    cfg = ExperimentConfig.from_dict({
        "name": "tiny", "models": [{"name": m, "layers": [0, 1]} for m in MODELS],
        "capture": {"tokens": 1600, "context_size": 32, "source": "random", "holdout": 0.2},
        "train": {"steps": 12, "batch_tokens": 128, "set": {"expansion_factor": 2, "lr": 1e-3}},
        "eval": {"spliced": False}, "transfer": {"max_tokens": 256}})
    folder = tmp_path_factory.mktemp("run")
    run_experiment(cfg, folder, load=tiny_twin, until="transfer")
    return folder


@pytest.fixture(scope="module")
def traced(run):
    return trace(run, PROMPT, top_k=3, load=tiny_twin)


@torch.no_grad()
def test_top_features_per_layer_equal_an_independent_encode(run, traced):
    assert list(traced.models) == MODELS  # side by side, in the run's order
    for name in MODELS:
        loaded = RunSAEs.open(run, name).load(tiny_twin)
        _, cache = loaded.tl_model.run_with_cache(torch.tensor([PROMPT]))
        m = traced.models[name]
        [token] = m.positions
        assert token.position == len(PROMPT) - 1 and m.tokens == [f"<{t}>" for t in PROMPT]
        for layer, hook in zip(token.layers, (L0, L1)):
            latents = loaded.saes[hook].encode(cache[hook][0, -1])
            values, features = latents.topk(3)
            assert layer.hook == hook and layer.n_active == int((latents > 0).sum())
            assert [h.feature for h in layer.top] == features.tolist()
            assert [h.activation for h in layer.top] == pytest.approx(values.tolist())
            for hit in layer.top:
                assert m.description(hook, hit.feature).feature == hit.feature


def test_descriptions_are_cached_once_and_equal_an_independent_computation(run, traced):
    loaded = RunSAEs.open(run, "gpt2-twin").load(tiny_twin)
    path = cache_path(run, "gpt2-twin", L0)
    assert path.exists()
    before = path.stat().st_mtime_ns
    stats = loaded.feature_stats()[L0]
    assert path.stat().st_mtime_ns == before  # read back, not recomputed
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["n_tokens"] == str(stats.n_tokens)
    # independent: every held-out activation, special positions left out, through the SAE at once
    tokens = loaded.store.tokens("heldout").reshape(-1)
    keep = ~torch.isin(tokens, torch.tensor(loaded.special_ids))
    with torch.no_grad():
        latents = loaded.saes[L0].encode(loaded.store.activations(L0, "heldout").float()[keep])
    assert stats.n_tokens == int(keep.sum())
    assert torch.equal(stats.fire_count, (latents > 0).sum(0))
    positions = keep.nonzero()[:, 0]
    f = int(stats.density.argmax())
    values, rows = latents[:, f].topk(stats.top.k)
    assert torch.allclose(stats.top.values[f], values) and torch.equal(stats.top.positions[f], positions[rows])
    # promoted tokens: (W_dec[f] * ln_final.w) @ W_U, by hand (a JumpReLU SAE decodes linearly)
    model, sae = loaded.tl_model, loaded.saes[L0]
    torch.testing.assert_close(decoder_directions(sae, [f])[0], sae.W_dec[f].detach())
    by_hand = ((sae.W_dec[f] * model.ln_final.w) @ model.W_U).topk(5).indices.tolist()
    assert promoted_tokens(sae, model, [f])[f] == by_hand
    d = traced.models["gpt2-twin"].descriptions[L0]
    some = next(iter(d.values()))
    assert some.promoted_tokens == [f"<{t}>" for t in promoted_tokens(sae, model, [some.feature])[some.feature]]
    assert some.density == pytest.approx(float(stats.density[some.feature]))


def _matching(kind, pairs, significant=None):
    pairs = sorted(pairs)
    n = len(pairs)
    return FeatureMatching(kind, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]),
                           np.linspace(0.9, 0.5, n), 0.3, np.ones(n, bool) if significant is None else significant)


def test_trajectories_follow_significant_matches_of_active_features():
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    acts = {h: torch.zeros(8) for h in hooks}

    def fire(i, f, v):
        acts[hooks[i]][f] = v

    # chain A: 0:1 -> 1:2 (decoder) -> 2:4 (activation) -> 3:5 silent
    # chain B: 1:6 -> 2:7, then 7's partner 3:3 is active
    # 0:0 matches 1:0 but only insignificantly; 2:0 is active but matched to nothing
    for i, f, v in [(0, 1, 5.0), (1, 2, 4.0), (2, 4, 3.0), (1, 6, 2.0), (2, 7, 1.0), (3, 3, 1.0), (0, 0, 9.0),
                    (1, 0, 9.0), (2, 0, 1.5)]:
        fire(i, f, v)
    links = {
        (hooks[0], hooks[1]): {"decoder": _matching("decoder", [(1, 2), (0, 0)], np.array([False, True]))},
        (hooks[1], hooks[2]): {"activation": _matching("activation", [(2, 4), (6, 7)])},
        (hooks[2], hooks[3]): {"decoder": _matching("decoder", [(4, 5), (7, 3)])},
    }
    top = [LayerFeatures(h, i, [], 0) for i, h in enumerate(hooks)]
    from layerflow.features.trace import FeatureHit

    for i, feats in enumerate([[0, 1], [2, 6], [0], [3]]):
        top[i].top = [FeatureHit(f, float(acts[hooks[i]][f]), r) for r, f in enumerate(feats)]
    chains = chain_features(hooks, [0, 1, 2, 3], acts, top, links)
    labels = {c.label(): c for c in chains}
    a = labels["L0:1 -> L1:2 -> L2:4"]
    assert a.end == "matched feature 5 at L3 is silent here"
    assert a.steps[1].link == {"decoder": pytest.approx(0.5)} and "activation" in a.steps[2].link
    b = labels["L1:6 -> L2:7 -> L3:3"]
    assert b.end == "last SAE site" and b.persists
    assert labels["L0:0"].end == "no significant match at L1"
    assert labels["L2:0"].end == "no significant match at L3"
    assert not labels["L0:0"].persists
    # a chain reaching a feature already listed stops there and says so
    acts[hooks[0]][6] = 1.0
    links[hooks[0], hooks[1]] = {"decoder": _matching("decoder", [(6, 6), (1, 2)])}
    top[0].top.append(FeatureHit(6, 1.0, 2))
    again = {c.label(): c for c in chain_features(hooks, [0, 1, 2, 3], acts, top, links)}
    assert "L0:6 -> L1:6 -> L2:7 -> L3:3" in again
    steps = [(s.hook, s.feature) for c in again.values() for s in c.steps]
    assert len(steps) == len(set(steps))  # chains are disjoint


def test_every_token_json_and_figure(run, traced, tmp_path):
    every = trace(run, PROMPT, token="all", top_k=2, models=["gpt2-twin"], load=tiny_twin)
    assert list(every.models) == ["gpt2-twin"]
    specials = set(RunSAEs.open(run, "gpt2-twin").model.capture.special_token_ids)
    assert [t.position for t in every.models["gpt2-twin"].positions] == [i for i, t in enumerate(PROMPT)
                                                                          if t not in specials]
    data = json.loads((traced.write(tmp_path / "trace.json")).read_text())
    assert set(data["models"]) == set(MODELS) and data["top_k"] == 3
    layer = data["models"]["gpt2-twin"]["positions"][0]["layers"][0]
    assert layer["hook"] == L0 and len(layer["top"]) == 3
    first = layer["top"][0]["feature"]
    assert data["models"]["gpt2-twin"]["descriptions"][L0][str(first)]["feature"] == first
    paths = trace_flow(traced, tmp_path / "flow")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_bad_input(run, tmp_path):
    with pytest.raises(LayerflowError, match="The prompt is empty"):
        trace(run, "   ", load=tiny_twin)
    with pytest.raises(LayerflowError, match="The prompt is empty"):
        trace(run, [], load=tiny_twin)
    with pytest.raises(LayerflowError, match="300 tokens long, longer than gpt2-twin's context of 256 tokens"):
        trace(run, list(range(300)), models=["gpt2-twin"], load=tiny_twin)
    with pytest.raises(LayerflowError, match=r"Token position 8 is out of range: the prompt has 8 tokens"):
        trace(run, PROMPT, token=8, models=["gpt2-twin"], load=tiny_twin)
    with pytest.raises(LayerflowError, match="is not a layerflow run directory"):
        trace(tmp_path, PROMPT, load=tiny_twin)
    done = run_cli("trace", "--run", str(run), "--prompt", "x", "--model", "smollm2-135m")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "is of gpt2-twin, pythia-70m-twin, not 'smollm2-135m'" in " ".join(done.stderr.split())


# ------------------------------------------------------------------ the real model, end to end


@pytest.mark.slow
def test_trace_and_intervene_on_a_quick_run_of_the_real_model(quick_run, tmp_path):
    prompt = "The capital of France is"
    done = run_cli("trace", "--run", str(quick_run), "--prompt", prompt, "--out", str(tmp_path / "t.json"),
                   "--plot", str(tmp_path / "flow.png"), env_extra={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "top 5 features per layer at token ' is'" in done.stdout and "trajectories persist" in done.stdout
    data = json.loads((tmp_path / "t.json").read_text())["models"]["smollm2-135m"]
    layers = data["positions"][0]["layers"]
    assert [layer["layer"] for layer in layers] == [0, 10, 19, 29]
    assert all(layer["top"] for layer in layers)
    top = layers[-1]["top"][0]["feature"]
    described = data["descriptions"][layers[-1]["hook"]][str(top)]
    assert described["contexts"] and "[[" in described["contexts"][0] and len(described["promoted_tokens"]) == 5
    assert (tmp_path / "flow.png").exists() and (tmp_path / "flow.pdf").exists()
    assert (quick_run / "features" / "smollm2-135m" / f"{layers[0]['hook']}.safetensors").exists()

    feature = layers[1]["top"][0]["feature"]
    done = run_cli("intervene", "--run", str(quick_run), "--layer", "10", "--feature", str(feature), "--prompt", prompt,
                   "--tokens", " Paris, London", "--heldout-tokens", "256", "--out", str(tmp_path / "i.json"),
                   env_extra={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "i.json").read_text())
    assert result["clean_activation"][str(feature)] > 0
    assert [d["layer"] for d in result["downstream"]] == [19, 29]
    assert sum(d["n_changed"] for d in result["downstream"]) > 0 and result["kl_at_token"] > 0
    assert [t["token"] for t in result["logits"]] == [" Paris", " London"]
    assert "logit difference ' Paris' - ' London'" in done.stdout and "held-out text" in done.stdout

