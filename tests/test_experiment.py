"""Experiment configs: the shipped files load, defaults agree, every bad field gets a clear message."""

import dataclasses
from pathlib import Path

import pytest

from conftest import run_cli
from layerflow.errors import LayerflowError
from layerflow.experiment import ExperimentConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_default_toml_is_the_default_config():
    assert load_config(CONFIGS / "default.toml") == ExperimentConfig() == load_config(None)


@pytest.mark.parametrize("name", ["default.toml", "offline-two-models.toml", "notes-four-models.toml"])
def test_shipped_configs_load_and_resolve(name):
    cfg = load_config(CONFIGS / name)
    for model in cfg.models:
        from layerflow.models.zoo import get_spec

        assert cfg.layers(model) == list(range(get_spec(model.name).n_layers))  # all layers, as promised
    schedule = cfg.train.schedule()
    assert schedule.values(0, 30)["expansion_factor"] == cfg.train.set["expansion_factor"]


def test_notes_config_is_the_notes_four_models():
    cfg = load_config(CONFIGS / "notes-four-models.toml")
    assert [m.name for m in cfg.models] == ["gpt2-medium", "gemma-2b", "phi-2", "pythia-1.4b"]
    assert cfg.capture.sites == ["resid_post"]


def test_schedule_overrides_apply_over_the_preset():
    cfg = ExperimentConfig.from_dict({"train": {"preset": "notes", "set": {"expansion_factor": 2},
                                                "by_depth": [{"upper": 0.5, "l1_coefficient": 1e-3},
                                                             {"upper": 1.0, "l1_coefficient": 1e-5}]}})
    schedule = cfg.train.schedule()
    assert schedule.architecture == "standard"
    assert schedule.values(0, 10)["l1_coefficient"] == 1e-3 and schedule.values(9, 10)["l1_coefficient"] == 1e-5
    assert schedule.sae_config(0, 10, 64).d_sae == 128


def test_quick_keeps_four_spread_layers_and_shrinks_budgets():
    cfg = ExperimentConfig().quick()
    assert cfg.models[0].layers == [0, 10, 19, 29]
    assert cfg.capture.tokens <= 6000 and cfg.train.steps == 40 and cfg.transfer.max_tokens <= 512
    assert cfg.eval.spliced_tokens <= 512
    small = dataclasses.replace(ExperimentConfig(), models=[dataclasses.replace(ExperimentConfig().models[0], layers="3,5")])
    assert small.quick().models[0].layers == [3, 5]


@pytest.mark.parametrize("data,message", [
    ({"captur": {}}, r"unknown field 'captur'.*Did you mean 'capture'"),
    ({"capture": {"tokns": 5}}, r"unknown field 'capture.tokns'.*Did you mean 'tokens'"),
    ({"capture": {"tokens": "many"}}, r"capture.tokens must be an integer, got 'many'"),
    ({"capture": {"tokens": 0}}, r"capture.tokens = 0 must be positive"),
    ({"capture": {"holdout": 0.0}}, r"capture.holdout 0.0 must lie in \(0, 1\)"),
    ({"capture": {"dtype": "float8"}}, r"capture.dtype 'float8'.*Valid: float32, bfloat16, float16"),
    ({"capture": {"sites": ["resid_middle"]}}, r"test.toml: capture.sites: .*resid_middle.*resid_mid"),
    ({"capture": {"sites": "resid_post"}}, r"capture.sites must be a list"),
    ({"models": [{"name": "gpt3"}]}, r"models.name 'gpt3' is not in the zoo"),
    ({"models": [{"name": "gpt2", "layers": "0:40"}]}, r"test.toml: models\[0\].layers: .*out of range: gpt2 has 12 layers"),
    ({"models": [{"name": "gpt2", "layers": [3, 12]}]}, r"Layer 12 is out of range"),
    ({"models": []}, r"\[\[models\]\] is empty"),
    ({"models": [{"name": "gpt2"}, {"name": "gpt2"}]}, r"listed twice"),
    ({"train": {"architecture": "topkk"}}, r"Unknown SAE architecture 'topkk'.*Did you mean 'topk'"),
    ({"train": {"set": {"kk": 3}}}, r"Unknown hyperparameter 'kk'"),
    ({"train": {"by_depth": [{"k": 3}]}}, r"train.by_depth\[0\] has no 'upper'"),
    ({"train": {"preset": "fast"}}, r"Unknown schedule preset 'fast'"),
    ({"train": {"preset": "transcoder"}}, r"test.toml: train 'matryoshka_batchtopk_transcoder' is a transcoder.*--preset transcoder"),
    ({"train": {"epochs": True}}, r"train.epochs must be a number, got True"),
    ({"transfer": {"match_distance": -1}}, r"transfer.match_distance = -1 must be >= 0"),
    ({"eval": {"spliced": "yes"}}, r"eval.spliced must be true or false"),
])
def test_bad_fields_are_named_with_what_is_valid(data, message):
    with pytest.raises(LayerflowError, match=message):
        ExperimentConfig.from_dict(data, where="test.toml")


def test_another_architecture_keeps_only_the_preset_keys_it_accepts():
    schedule = ExperimentConfig.from_dict({"train": {"architecture": "standard", "set": {"l1_coefficient": 1e-3}}}).train.schedule()
    assert schedule.architecture == "standard" and "k" not in schedule.base
    assert ExperimentConfig.from_dict({"train": {"architecture": "topk"}}).train.schedule().base["k"] == 32


def test_bad_cross_model_matching_choice():
    with pytest.raises(LayerflowError, match=r"cross_model.match_pairs 'same' is not valid. Valid: all, same_depth, none"):
        ExperimentConfig.from_dict({"cross_model": {"match_pairs": "same"}})


def test_integers_are_accepted_for_floats():
    assert ExperimentConfig.from_dict({"train": {"epochs": 3}}).train.epochs == 3.0


def test_cli_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[capture]\ntokens = "lots"\n')
    result = run_cli("run", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "capture.tokens must be an integer, got 'lots'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    broken = tmp_path / "broken.toml"
    broken.write_text("[capture\n")
    result = run_cli("run", str(broken))
    assert result.returncode == 2 and "not valid TOML" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("run", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
