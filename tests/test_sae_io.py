"""SAEs saved by layerflow load with SAELens' own loader and read raw (unscaled) activations."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class

from conftest import tiny_twin
from layerflow.capture import ActivationStore, CaptureConfig, capture
from layerflow.dictionaries.io import sae_metadata, save_sae
from layerflow.models.sites import SiteKind
from layerflow.train import LayerSchedule


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap")
    cfg = CaptureConfig("gpt2-twin", [1], [SiteKind.resid_post], n_tokens=32 * 16, context_size=16, source="random")
    capture(cfg, out, loaded=tiny_twin("gpt2-twin"))
    return ActivationStore(out)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saved_sae_loads_in_sae_lens_and_reads_raw_activations(tmp_path, store, architecture):
    x = store.activations("blocks.1.hook_resid_post", "heldout")
    d_in = x.shape[-1]
    cfg = LayerSchedule(architecture, {"expansion_factor": 4}).sae_config(1, 2, d_in=d_in)
    sae = get_sae_training_class(architecture)[0](cfg)
    with torch.no_grad():  # non-trivial weights and biases
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scale = (d_in ** 0.5) / x.norm(dim=-1).mean().item()  # as expected_average_only_in would scale
    with torch.no_grad():
        expected = sae(x * scale) / scale  # what training-time code computes, mapped back to raw units
    sparsity = torch.log10(torch.rand(cfg.d_sae) + 1e-6)
    folder = save_sae(sae, tmp_path / "L1", sae_metadata(store.manifest, "blocks.1.hook_resid_post"), sparsity, scale)

    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    loaded = SAE.load_from_disk(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)
    meta = loaded.cfg.metadata
    assert meta.hook_name == "blocks.1.hook_resid_post" and meta.model_name == "gpt2"
    assert meta.context_size == 16 and meta.prepend_bos is True
    assert meta.model_from_pretrained_kwargs["fold_ln"] is False
    assert loaded.cfg.normalize_activations == "none"
    # the SAE handed in is untouched (training can continue after a checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(sae(x * scale) / scale, expected)
