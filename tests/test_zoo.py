"""The zoo's table against the configs TransformerLens builds, and the offline real models against transformers."""

import pytest
import torch

from conftest import needs_gemma3
from layerflow.errors import LayerflowError
from layerflow.models.load import load_hf_reference, twin_config
from layerflow.models.zoo import HUB, ZOO, get_spec

HUB_MODELS = [n for n, s in ZOO.items() if s.source == HUB]


@pytest.mark.parametrize("name", HUB_MODELS)
def test_table_matches_transformer_lens_config_built_from_shipped_config(name):
    spec = get_spec(name)
    cfg = twin_config(name)  # TL's own converter on the shipped real config.json
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp) == (spec.n_layers, spec.d_model, spec.d_mlp)


def test_twin_shares_the_hub_models_architecture():
    assert twin_config("phi-2-twin").to_dict() == twin_config("phi-2").to_dict()


def test_phi2_config_loads_under_transformers_5():
    # transformers 5 moved partial_rotary_factor into rope_parameters; TL 3.9 reads the old field.
    cfg = twin_config("phi-2")
    assert cfg.parallel_attn_mlp and cfg.d_head == 80
    assert cfg.rotary_dim == round(0.4 * 80)


def test_public_facts_the_notes_got_wrong():
    # ../shared/seeds/README.md: GPT-2-medium has 24 layers (not 12), Gemma-2B has 18 (not 24).
    assert twin_config("gpt2-medium").n_layers == 24 and twin_config("gpt2-medium").d_model == 1024
    assert twin_config("gemma-2b").n_layers == 18


def test_unknown_model_names_valid_ones():
    with pytest.raises(LayerflowError, match=r"Unknown model 'gpt3'.*smollm2-135m.*Did you mean 'gpt2'"):
        get_spec("gpt3")


PROMPTS = ["The capital of France is Paris, and the capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]


def _logit_parity(loaded, name):
    hf = load_hf_reference(name)
    tok = loaded.tokenizer
    for prompt in PROMPTS:
        ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]])
        with torch.no_grad():
            ref, ours = hf(ids).logits, loaded.model(ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_matches_transformers(smollm2):
    spec = get_spec("smollm2-135m")
    cfg = smollm2.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp) == (spec.n_layers, spec.d_model, spec.d_mlp)
    assert smollm2.weights_source.startswith("gguf:") and "sha256:" in smollm2.weights_source
    _logit_parity(smollm2, "smollm2-135m")


@needs_gemma3
def test_gemma3_matches_transformers(gemma3):
    spec = get_spec("gemma3-270m")
    cfg = gemma3.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp) == (spec.n_layers, spec.d_model, spec.d_mlp)
    assert cfg.use_normalization_before_and_after  # Gemma-3 post-norms
    assert "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in gemma3.weights_source
    _logit_parity(gemma3, "gemma3-270m")
