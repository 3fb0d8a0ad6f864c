"""LayerSchedule: depth bands, presets, and real SAELens configs and SAEs for every architecture."""

import pytest
import torch
from sae_lens.registry import get_sae_training_class

from layerflow.dictionaries.kinds import SAE_ARCHITECTURES, TRANSCODER_ARCHITECTURES
from layerflow.errors import LayerflowError
from layerflow.train import LayerSchedule, get_preset


def test_notes_preset_reproduces_the_depth_dependent_l1():
    notes = get_preset("notes")
    l1 = [notes.values(layer, 30)["l1_coefficient"] for layer in range(30)]
    assert l1[:10] == [1.5e-4] * 10  # relative depth <= 1/3: layers 0..9
    assert l1[10:20] == [1e-4] * 10
    assert l1[20:] == [5e-5] * 10
    cfg = notes.sae_config(29, 30, d_in=576)
    assert cfg.d_sae == 8 * 576 and cfg.l1_coefficient == 5e-5


@pytest.mark.parametrize("architecture", SAE_ARCHITECTURES)
def test_every_architecture_builds_a_real_sae_lens_training_sae(architecture):
    schedule = LayerSchedule(architecture, {"expansion_factor": 4})
    cfg = schedule.sae_config(3, 6, d_in=32)
    sae_class, cfg_class = get_sae_training_class(architecture)
    assert type(cfg) is cfg_class and cfg.d_sae == 128
    sae = sae_class(cfg)
    out = sae(torch.randn(5, 32))
    assert out.shape == (5, 32)


@pytest.mark.parametrize("architecture", TRANSCODER_ARCHITECTURES)
def test_every_transcoder_architecture_builds_a_registered_training_transcoder(architecture):
    schedule = LayerSchedule(architecture, {"expansion_factor": 4, "normalize_activations": "expected_average_only_in"})
    cfg = schedule.sae_config(3, 6, d_in=32, d_out=24)
    sae_class, cfg_class = get_sae_training_class(architecture)
    assert type(cfg) is cfg_class and cfg.d_sae == 128 and cfg.d_out == 24
    assert cfg.normalize_activations == "none"  # the trainer scales input and target itself
    out = sae_class(cfg)(torch.randn(5, 32), torch.randn(5, 24))
    assert out.prediction.shape == (5, 24)


def test_transcoder_preset_is_the_notes_matryoshka_transcoder():
    cfg = get_preset("transcoder").sae_config(0, 30, d_in=576, d_out=576)
    assert type(cfg).__name__ == "MatryoshkaBatchTopKTrainingTranscoderConfig"
    assert cfg.d_sae == 2 * 576 and cfg.k == 48 and cfg.matryoshka_widths == [72, 288, 1152]


def test_default_preset_is_a_modern_sparse_coder():
    cfg = get_preset("default").sae_config(0, 30, d_in=576)
    assert type(cfg).__name__ == "BatchTopKTrainingSAEConfig" and cfg.k == 32
    assert cfg.normalize_activations == "expected_average_only_in"


def test_round_trip_through_a_dict():
    notes = get_preset("notes")
    again = LayerSchedule.from_dict(notes.to_dict())
    assert all(again.values(L, 24) == notes.values(L, 24) for L in range(24))


@pytest.mark.parametrize("kwargs,match", [
    ({"architecture": "topkk"}, r"Unknown SAE architecture 'topkk'.*Did you mean 'topk'"),
    ({"architecture": "topk", "base": {"l1_coefficient": 1e-4}}, r"Unknown hyperparameter 'l1_coefficient' for topk"),
    ({"architecture": "standard", "by_depth": [(0.5, {})]}, r"end at 1.0"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(LayerflowError, match=match):
        LayerSchedule(**kwargs)


def test_matryoshka_widths_scale_with_each_layers_width():
    schedule = LayerSchedule("matryoshka_batchtopk", {"expansion_factor": 8, "matryoshka_fractions": [0.125, 0.5]})
    cfg = schedule.sae_config(0, 4, d_in=64)
    assert cfg.matryoshka_widths == [64, 256, 512]


def test_with_overrides_drops_preset_keys_the_new_architecture_lacks():
    from layerflow.train import get_preset

    relu = get_preset("default").with_overrides("standard", {"l1_coefficient": 1e-3})
    assert relu.architecture == "standard" and "k" not in relu.base and "topk_threshold_lr" not in relu.base
    assert relu.base["l1_coefficient"] == 1e-3 and relu.base["expansion_factor"] == 8
    topk = get_preset("default").with_overrides("topk")
    assert topk.base["k"] == 32 and "topk_threshold_lr" not in topk.base
    with pytest.raises(LayerflowError, match="Unknown hyperparameter 'k' for standard"):
        get_preset("default").with_overrides("standard", {"k": 4})  # what the user sets stays strict
