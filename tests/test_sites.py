"""Every site of every zoo model resolves, fires, and satisfies the residual-stream identities."""

import pytest
import torch

from conftest import TWINS, needs_gemma3, tiny_twin
from layerflow.errors import LayerflowError
from layerflow.models.sites import Site, SiteKind, available_kinds, parse_layers, prepare_hooks, resolve


def _independent_norm(x, ln, cfg):
    """The pre-MLP norm with its affine, written out by hand."""
    if cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt() * ln.w + ln.b
    return x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt() * ln.w


def check_sites(model, layers):
    cfg = model.cfg
    kinds = available_kinds(cfg)
    sites = resolve(model, layers, kinds)
    names = [s.hook_name for s in sites]
    prepare_hooks(model, names)
    tokens = torch.randint(0, cfg.d_vocab, (2, 12))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names + [f"blocks.{L}.ln2.hook_normalized" for L in layers])
    for name in names:
        assert name in cache, f"{name} did not fire"
        assert torch.isfinite(cache[name]).all()
    scale = max(cache[n].abs().max().item() for n in names)
    tol = 1e-5 * scale + 1e-6
    for L in layers:
        c = lambda kind: cache[Site(L, SiteKind(kind)).hook_name]
        if SiteKind.resid_mid in kinds:
            torch.testing.assert_close(c("resid_mid"), c("resid_pre") + c("attn_out"), atol=tol, rtol=0)
            torch.testing.assert_close(c("resid_post"), c("resid_mid") + c("mlp_out"), atol=tol, rtol=0)
            mlp_residual_input = c("resid_mid")
        else:  # parallel attention and MLP both read resid_pre
            torch.testing.assert_close(c("resid_post"), c("resid_pre") + c("attn_out") + c("mlp_out"), atol=tol, rtol=0)
            mlp_residual_input = c("resid_pre")
        block = model.blocks[L]
        torch.testing.assert_close(c("mlp_in"), _independent_norm(mlp_residual_input, block.ln2, cfg), atol=tol, rtol=1e-5)
        # mlp_hidden is what W_out reads: reproduce mlp_out from it (plus the post-norm where there is one).
        out = c("mlp_hidden") @ block.mlp.W_out + block.mlp.b_out
        if cfg.use_normalization_before_and_after:
            out = _independent_norm(out, block.ln2_post, cfg)
        torch.testing.assert_close(out, c("mlp_out"), atol=tol, rtol=1e-4)
        if not torch.allclose(block.ln2.w, torch.ones_like(block.ln2.w)):
            # The TransformerLens 3 pitfall: hook_normalized fires before the affine weight.
            assert not torch.allclose(c("mlp_in"), cache[f"blocks.{L}.ln2.hook_normalized"], atol=tol)
    return kinds


def _randomize_norms(model):
    # Random-init twins start with unit norm weights, which would hide the pre-affine pitfall.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].startswith("ln") and name.endswith((".w", ".b")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", TWINS)
def test_twin_sites(name):
    loaded = tiny_twin(name)
    _randomize_norms(loaded.model)
    kinds = check_sites(loaded.model, [0, loaded.model.cfg.n_layers - 1])
    parallel = name.startswith(("pythia", "phi"))
    assert (SiteKind.resid_mid not in kinds) == parallel
    assert loaded.model.cfg.use_normalization_before_and_after == name.startswith("gemma-2-2b")


def test_smollm2_sites(smollm2):
    assert set(check_sites(smollm2.model, [0, 14, 29])) == set(SiteKind)


@needs_gemma3
def test_gemma3_sites(gemma3):
    assert set(check_sites(gemma3.model, [0, 5, 17])) == set(SiteKind)


@pytest.mark.parametrize("name", ["pythia-70m-twin", "phi-2-twin"])
def test_parallel_models_have_no_resid_mid(name):
    model = tiny_twin(name).model
    with pytest.raises(LayerflowError, match=r"parallel.*no resid_mid.*resid_pre"):
        resolve(model, [0], [SiteKind.resid_mid])


def test_silent_hooks_are_switched_on():
    model = tiny_twin("gpt2-twin").model
    prepare_hooks(model, ["blocks.0.hook_mlp_in"])
    _, cache = model.run_with_cache(torch.randint(0, 100, (1, 5)), names_filter=["blocks.0.hook_mlp_in", "blocks.0.hook_resid_mid"])
    torch.testing.assert_close(cache["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])
    model.set_use_hook_mlp_in(False)


@pytest.mark.parametrize("spec,expected", [
    ("all", list(range(30))), ("0:30:2", list(range(0, 30, 2))), ("3,7,11", [3, 7, 11]),
    ("-1", [29]), ("25:", [25, 26, 27, 28, 29]), (" 11, 3 ,3", [3, 11]),
])
def test_layer_specs(spec, expected):
    assert parse_layers(spec, 30) == expected


@pytest.mark.parametrize("spec,match", [
    ("30", r"Layer 30 is out of range.*0\.\.29"), ("0:40", r"out of range.*0\.\.29"),
    ("a,b", r"Bad layer spec 'a,b'"), ("5:5", r"selects no layers"),
])
def test_bad_layer_specs(spec, match):
    with pytest.raises(LayerflowError, match=match):
        parse_layers(spec, 30)


def test_site_parse_round_trip():
    site = Site(12, SiteKind.resid_post)
    assert Site.parse(str(site)) == site
    with pytest.raises(LayerflowError, match="Unknown site kind 'resid_mdi'.*resid_mid"):
        Site.parse("L3.resid_mdi")
