"""Transcoder transfer (layerflow.transfer.transcoder_matrix): planted MLP maps, independent
recomputation with SAELens' own forward, scale matching, persistence, and a real capture end to end."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

import layerflow.dictionaries.transcoders as tc
from conftest import run_cli, tiny_twin
from layerflow.capture import ActivationStore, CaptureConfig, capture
from layerflow.errors import LayerflowError
from layerflow.metrics import reconstruction_metrics
from layerflow.models.sites import SiteKind
from layerflow.models.sites import site_at as SiteId
from layerflow.testing import planted_maps, true_transcoder
from layerflow.transfer import (Calibration, LinearCoder, TransferMatrix, TransferOptions, transcoder_matrix, transfer_run,
                                within_model_matrix)

pytestmark = pytest.mark.usefixtures("one_thread")

NO_MATCH = TransferOptions(match_distance=0, batch_tokens=500)  # several batches per site


def _in(i: int) -> str:
    return f"blocks.{i}.mlp.hook_in"


def _out(i: int) -> str:
    return f"blocks.{i}.hook_mlp_out"


def _matrix(planted, arch="jumprelu", skip=False, options=NO_MATCH, transcoders=None):
    n = len(planted.inputs)
    transcoders = transcoders or {_in(i): true_transcoder(planted, i, arch, skip, hook_name=_in(i),
                                                          hook_name_out=_out(i)) for i in range(n)}
    acts = {**{_in(i): planted.inputs[i] for i in range(n)}, **{_out(i): planted.outputs[i] for i in range(n)}}
    sites = [SiteId("planted", _in(i), i, n, "mlp_in") for i in range(n)]
    return transcoder_matrix(transcoders, acts, sites, _calibration(planted), options), transcoders


def _calibration(planted):
    n = len(planted.inputs)
    return Calibration.of({**{_in(i): planted.train_inputs[i] for i in range(n)},
                           **{_out(i): planted.train_outputs[i] for i in range(n)}})


def _ev(y, y_hat):  # ratio of totals, variance around the target's own mean
    y, y_hat = y.double(), y_hat.double()
    return (1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def _with_random_skip(transcoders, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in transcoders.values():
        with torch.no_grad():
            t.W_skip.copy_(0.05 * torch.randn(t.W_skip.shape, generator=g))
    return transcoders


# ---------------------------------------------------------------- planted ground truth


def test_identical_maps_transfer_and_different_maps_do_not():
    # Layers 0 and 1 compute the same map on tokens of their own; layer 2 a different one.
    planted = planted_maps([0, 0, 1], seed=1)
    m, _ = _matrix(planted)
    ev, own = m["explained_variance"], np.diag(m["explained_variance"])
    assert own.min() > 0.99
    assert ev[0, 1] == pytest.approx(own[1], abs=0.01) and ev[1, 0] == pytest.approx(own[0], abs=0.01)
    assert m["relative_transfer"][0, 1] > 0.99 and abs(m["delta_fvu"][0, 1]) < 0.01
    for s, t in [(0, 2), (1, 2), (2, 0), (2, 1)]:
        assert ev[s, t] < 0.2 and m["relative_transfer"][s, t] < 0.2, (s, t)
    # Fresh tokens: layer 0's output says nothing about layer 1's, so no persistence.
    assert m["persistence_ev_scalar"][0, 1] < 0.05
    assert m["transfer_beyond_persistence"][0, 1] > 0.9
    # T_0 on layer 1 fires on layer 1's planted features only: the planted L0.
    assert m["l0"][0, 1] == pytest.approx(planted.k, abs=0.05) and m["dead_fraction"][0, 1] == 0


def test_carried_forward_output_is_persistence_not_a_shared_map():
    # The same map and the same tokens: layer 1's MLP output is layer 0's again, so the transfer
    # is all persistence; with fresh tokens (previous test) it is all beyond persistence.
    carried = planted_maps([0, 0], shared_codes=True, seed=2)
    m, _ = _matrix(carried)
    assert m["relative_transfer"][0, 1] > 0.99
    assert m["persistence_ev_scalar"][0, 1] > 0.99 and m["relative_persistence"][0, 1] > 0.99
    assert abs(m["transfer_beyond_persistence"][0, 1]) < 0.01


def test_scale_matching_undoes_planted_norm_growth():
    # Layer 1 = layer 0 on the same tokens with x_in 4x smaller and y 3x larger; T_1 is the exact
    # transcoder of layer 1. T_0 reads layer 1's raw input with an input offset it cancels by a
    # fixed b_enc and a threshold in layer-0 units: planted codes (1 to 2) shrink to 0.25 to 0.5,
    # so next to nothing clears the threshold of 0.5 (and the offset no longer cancels), and its
    # prediction is in layer-0 units. Scale matching (rho_in = 4, rho_out = 1/3) undoes both.
    base = planted_maps([0], seed=3)
    t0 = true_transcoder(base, 0, "jumprelu", hook_name=_in(0), hook_name_out=_out(0))
    grown = planted_maps([0], in_gains=[0.25], out_gains=[3.0], seed=3)
    t1 = true_transcoder(grown, 0, "jumprelu", hook_name=_in(1), hook_name_out=_out(1))
    assert torch.allclose(grown.inputs[0], 0.25 * base.inputs[0], atol=1e-6)
    planted = replace(base, inputs=[base.inputs[0], grown.inputs[0]], outputs=[base.outputs[0], grown.outputs[0]],
                      train_inputs=[base.train_inputs[0], grown.train_inputs[0]],
                      train_outputs=[base.train_outputs[0], grown.train_outputs[0]],
                      maps=[0, 0], codes=base.codes * 2, in_gains=[1.0, 0.25], out_gains=[1.0, 3.0])
    m, _ = _matrix(planted, transcoders={_in(0): t0, _in(1): t1})
    own = np.diag(m["explained_variance"])
    assert own.min() > 0.99
    for s, t in [(0, 1), (1, 0)]:
        assert m["explained_variance"][s, t] == pytest.approx(own[t], abs=1e-4)
        assert m["relative_transfer"][s, t] == pytest.approx(1.0, abs=1e-4)
        assert m["explained_variance_raw"][s, t] < 0.5 and m["relative_transfer_raw"][s, t] < 0.5
    assert m.settings["mean_activation_norm"][_in(0)] / m.settings["mean_activation_norm"][_in(1)] == pytest.approx(4, rel=1e-5)


# ---------------------------------------------------------------- independent recomputation


ARCHS = [(arch, skip) for arch in ("relu", "jumprelu", "topk") for skip in (False, True)]


@pytest.mark.parametrize("arch,skip", ARCHS, ids=[f"{a}{'-skip' if s else ''}" for a, s in ARCHS])
def test_metrics_equal_saelens_forward(arch, skip):
    planted = planted_maps([0, 0, 1], in_gains=[1.0, 2.0, 0.5], out_gains=[1.0, 0.5, 3.0], seed=4)
    n = 3
    transcoders = {_in(i): true_transcoder(planted, i, arch, skip, hook_name=_in(i), hook_name_out=_out(i))
                   for i in range(n)}
    if skip:
        _with_random_skip(transcoders)
    m, _ = _matrix(planted, transcoders=transcoders)
    x, y = planted.inputs, planted.outputs

    def forward(i, a):  # SAELens' own forward (the skip term included by SkipTranscoder.forward)
        with torch.no_grad():
            return transcoders[_in(i)](a)

    for i in range(n):  # the diagonal: each transcoder's own eval
        own = reconstruction_metrics(y[i], forward(i, x[i]), transcoders[_in(i)].encode(x[i]))
        assert m["explained_variance"][i, i] == pytest.approx(own.explained_variance, abs=1e-5)
        assert m["explained_variance_raw"][i, i] == pytest.approx(_ev(y[i], forward(i, x[i])), abs=1e-5)
        assert m["l0"][i, i] == pytest.approx(own.l0, rel=1e-6)
        assert m["l2_ratio"][i, i] == pytest.approx(own.l2_ratio, rel=1e-5)
    for name, value in [("relative_transfer", 1.0), ("delta_fvu", 0.0), ("transfer_recon_ratio", 1.0),
                        ("persistence_ev_scalar", 1.0), ("persistence_ev_identity", 1.0),
                        ("relative_persistence", 1.0), ("transfer_beyond_persistence", 0.0)]:
        np.testing.assert_allclose(np.diag(m[name]), value, atol=1e-5, err_msg=name)

    norm = lambda a: a.norm(dim=-1).double().mean()  # noqa: E731
    mean = lambda a: a.double().mean(0)  # noqa: E731
    spread = lambda a: (a.double() - mean(a)).pow(2).sum(-1).mean().sqrt()  # noqa: E731
    tx, ty = planted.train_inputs, planted.train_outputs  # the match is fit on the train split only
    for s, t in [(0, 1), (1, 0), (2, 1), (0, 2)]:
        rho_in, rho_out = norm(x[s]) / norm(x[t]), norm(y[s]) / norm(y[t])
        scaled = forward(s, (rho_in * x[t].double()).float()) / rho_out.item()
        into = (x[t].double() - mean(tx[t])) * spread(tx[s]) / spread(tx[t]) + mean(tx[s])
        matched = (forward(s, into.float()).double() - mean(ty[s])) * spread(ty[t]) / spread(ty[s]) + mean(ty[t])
        own_t = _ev(y[t], forward(t, x[t]))
        ys_c, yt_c = y[s].double() - y[s].double().mean(0), y[t].double() - y[t].double().mean(0)
        a = (ys_c * yt_c).sum() / ys_c.pow(2).sum()
        ts_c, tt_c = ty[s].double() - mean(ty[s]), ty[t].double() - mean(ty[t])
        a_train = (ts_c * tt_c).sum() / ts_c.pow(2).sum()
        carried = mean(ty[t]) + a_train * (forward(s, x[s]).double() - mean(ty[s]))
        expected = {
            "explained_variance_raw": _ev(y[t], forward(s, x[t])),
            "explained_variance_scale_only": _ev(y[t], scaled),
            "explained_variance": _ev(y[t], matched),
            "relative_transfer": _ev(y[t], matched) / own_t,
            "persistence_ev_identity": _ev(y[t], y[s]),
            "persistence_ev_scalar": _ev(y[t], y[t].double().mean(0) + a * ys_c),
            "persistence_ev_through_source": _ev(y[t], carried),
            "transfer_recon_ratio": (y[s] - forward(s, x[s])).pow(2).sum(-1).mean().item()
            / (y[t] - forward(s, x[t])).pow(2).sum(-1).mean().item(),
            "l0": (transcoders[_in(s)].encode(into.float()) != 0).double().sum(-1).mean().item(),
        }
        for name, value in expected.items():
            assert m[name][s, t] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, s, t)


@pytest.mark.parametrize("arch,skip", [("jumprelu", True), ("topk", True), ("relu", False)])
def test_shared_matmul_path_equals_each_transcoders_own_forward(arch, skip, monkeypatch):
    planted = planted_maps([0, 0, 1], in_gains=[1.0, 3.0, 0.5], seed=5)
    transcoders = {_in(i): true_transcoder(planted, i, arch, skip, hook_name=_in(i), hook_name_out=_out(i))
                   for i in range(3)}
    if skip:
        _with_random_skip(transcoders)
    assert all(LinearCoder.from_sae(t) is not None for t in transcoders.values())
    options = TransferOptions(match_distance=1, batch_tokens=500)
    fast, _ = _matrix(planted, transcoders=transcoders, options=options)
    monkeypatch.setattr(LinearCoder, "from_sae", classmethod(lambda cls, sae: None))
    slow, _ = _matrix(planted, transcoders=transcoders, options=options)
    assert fast.metrics.keys() == slow.metrics.keys()
    for name in fast.metrics:
        atol = 2e-3 if name in ("l0", "dead_fraction") else 1e-5  # a latent at its threshold may flip
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-5, atol=atol, err_msg=name)
    # decoder matching reuses the SAE path's code: layers 0 and 1 share their map, 1 and 2 do not
    assert fast["decoder_matched_fraction"][0, 1] > 0.95 and fast["decoder_matched_fraction"][1, 2] < 0.2
    assert fast["decoder_top1_cosine_mean"][0, 1] > 0.99 > fast["decoder_top1_cosine_mean"][0, 2]


def test_bad_transcoder_inputs_are_named():
    planted = planted_maps([0, 1], seed=6)
    transcoders = {_in(i): true_transcoder(planted, i, hook_name=_in(i), hook_name_out=_out(i)) for i in range(2)}
    sites = [SiteId("planted", _in(i), i, 2, "mlp_in") for i in range(2)]
    acts = {_in(0): planted.inputs[0], _in(1): planted.inputs[1], _out(0): planted.outputs[0]}
    calibration = _calibration(planted)
    with pytest.raises(LayerflowError, match="No held-out activations for 'blocks.1.hook_mlp_out'"):
        transcoder_matrix(transcoders, acts, sites, calibration)
    acts[_out(1)] = planted.inputs[1]  # d_in wide, not d_out
    with pytest.raises(LayerflowError, match="d_out 40, but the activations of 'blocks.1.hook_mlp_out' have width 48"):
        transcoder_matrix(transcoders, acts, sites, calibration)
    with pytest.raises(LayerflowError, match="'blocks.0.mlp.hook_in' is a transcoder: use transcoder_matrix"):
        within_model_matrix(transcoders, acts, sites, calibration)  # it would score the prediction against the input
    transcoders[_in(1)].cfg.metadata.hook_name_out = None
    with pytest.raises(LayerflowError, match="no cfg.metadata.hook_name_out"):
        transcoder_matrix(transcoders, acts, sites, calibration)


# ---------------------------------------------------------------- a real (tiny) capture, end to end


ARCH_OF_LAYER = {0: ("topk", True), 1: ("batchtopk", False)}  # saved as TopKSkipTranscoder, JumpReLUTranscoder


def _trained_transcoder(store: ActivationStore, layer: int) -> tc.TrainingTranscoder:
    arch, skip = ARCH_OF_LAYER[layer]
    x_in, y = store.activations(_in(layer)), store.activations(_out(layer))
    cfg_cls, extra = {"topk": (tc.TopKTrainingTranscoderConfig, {}),
                      "batchtopk": (tc.BatchTopKTrainingTranscoderConfig, {"topk_threshold_lr": 0.1})}[arch]
    cfg = cfg_cls(d_in=x_in.shape[1], d_out=y.shape[1], d_sae=128, k=8, skip=skip,
                  metadata=SAEMetadata(hook_name=_in(layer), hook_name_out=_out(layer)), **extra)
    model = tc.TRAINING_CLASSES[cfg.architecture()][0](cfg)
    model.init_b_dec(y)
    opt = tc.make_optimizer(model, 3e-3)
    g = torch.Generator().manual_seed(layer)
    for _ in range(40):
        idx = torch.randint(len(x_in), (256,), generator=g)
        tc.train_step(model, opt, x_in[idx], y[idx])
    return model


@pytest.fixture(scope="module")
def tiny_transcoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc_transfer")
    capture(CaptureConfig(model="gpt2-twin", layers=[0, 1], kinds=[SiteKind.mlp_in, SiteKind.mlp_out], n_tokens=4096,
                          context_size=32, source="random"), root / "store", loaded=tiny_twin("gpt2-twin"))
    store = ActivationStore(root / "store")
    for layer in (0, 1):
        _trained_transcoder(store, layer).to_inference().save_model(root / "transcoders" / f"layer{layer}")
    return root


def test_transfer_run_on_saved_transcoder_folders(tiny_transcoders, tmp_path):
    root = tiny_transcoders
    matrix, written = transfer_run(root / "transcoders", store=root / "store", out_dir=tmp_path,
                                   options=TransferOptions(max_tokens=None, match_distance=1))
    assert [s.hook_name for s in matrix.sources] == [_in(0), _in(1)] and [s.layer for s in matrix.sources] == [0, 1]
    assert matrix.settings["coder"] == "transcoder"
    assert matrix.settings["hook_name_out"] == {_in(0): _out(0), _in(1): _out(1)}
    store = ActivationStore(root / "store")
    held = store.heldout([_in(0), _in(1), _out(0), _out(1)])
    for i in range(2):  # the diagonal is SAELens' own forward of the saved folder on the held-out tokens
        loaded = SAE.load_from_disk(root / "transcoders" / f"layer{i}")
        with torch.no_grad():
            own = reconstruction_metrics(held[_out(i)], loaded(held[_in(i)]), loaded.encode(held[_in(i)]))
        assert own.explained_variance > 0.2  # trained: a real map to transfer
        assert matrix["explained_variance"][i, i] == pytest.approx(own.explained_variance, abs=1e-5)
        assert matrix["l0"][i, i] == pytest.approx(own.l0, rel=1e-6)
    assert type(SAE.load_from_disk(root / "transcoders" / "layer0")) is tc.TopKSkipTranscoder
    assert np.isfinite(matrix["relative_transfer"]).all() and np.isfinite(matrix["decoder_matched_fraction"][0, 1])
    assert [p.name for p in written][-1] == "transfer_matrix.json"
    assert TransferMatrix.read(tmp_path).equals(matrix)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["summaries"]) == {"relative_transfer", "explained_variance"}
    docs = json.loads((tmp_path / "transfer_matrix.json").read_text())["metric_docs"]
    assert "persistence_ev_through_source" in docs


def test_cli_transfer_on_transcoders(tiny_transcoders, tmp_path):
    root = tiny_transcoders
    result = run_cli("transfer", str(root / "transcoders"), "--store", str(root / "store"), "--out", str(tmp_path),
                     "--max-tokens", "512")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "transfer_matrix.json").exists() and (tmp_path / "transfer_matrix.csv").exists()
    assert "0.mlp_in" in result.stdout and "off-diagonal mean (clipped to [0, 1])" in result.stdout
    assert "hubs (beyond the fitted decay)" in result.stdout


def test_mixed_folder_spliced_and_uncaptured_output_hooks_are_clear_errors(tiny_transcoders, tmp_path):
    import shutil

    root = tiny_transcoders
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "transcoders", mixed)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=16, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    sae.save_model(mixed / "sae")
    with pytest.raises(LayerflowError, match=r"mixes transcoders \(blocks.0.mlp.hook_in, blocks.1.mlp.hook_in\) "
                                             r"and SAEs \(blocks.0.hook_resid_post\)"):
        transfer_run(mixed, store=root / "store", out_dir=tmp_path / "out")
    with pytest.raises(LayerflowError, match="--spliced is not available for transcoders"):
        transfer_run(root / "transcoders", store=root / "store", out_dir=tmp_path / "out",
                     options=TransferOptions(spliced=True))
    elsewhere = tmp_path / "elsewhere"  # a transcoder predicting a hook the capture does not hold
    shutil.copytree(root / "transcoders", elsewhere)
    cfg_path = elsewhere / "layer0" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["hook_name_out"] = "blocks.0.hook_resid_post"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LayerflowError, match=r"Transcoders for blocks.0.mlp.hook_in -> blocks.0.hook_resid_post "
                                             r"have no activations"):
        transfer_run(elsewhere, store=root / "store", out_dir=tmp_path / "out")


def test_the_same_map_around_other_means_transfers_fully():
    # Layers 0 and 1 compute the same map on tokens of their own, but layer 1's input and output
    # sit around other means (as residual-stream sites do), and at other scales. Matching the
    # means and spreads finds the shared map; matching the norms alone charges the offsets as error.
    base = planted_maps([0, 0], in_gains=[1.0, 2.0], out_gains=[1.0, 0.5], seed=8)
    g = torch.Generator().manual_seed(9)
    shift_in = torch.randn(base.inputs[0].shape[1], generator=g) * 3  # in units of the planted input
    shift_out = torch.randn(base.outputs[0].shape[1], generator=g) * 3
    shifted = replace(
        base, maps=[0, 1], in_features=base.in_features * 2, out_directions=base.out_directions * 2,
        in_offsets=[base.in_offsets[0], base.in_offsets[0] + shift_in],
        out_offsets=[base.out_offsets[0], base.out_offsets[0] + shift_out],
        inputs=[base.inputs[0], base.inputs[1] + 2.0 * shift_in], outputs=[base.outputs[0], base.outputs[1] + 0.5 * shift_out],
        train_inputs=[base.train_inputs[0], base.train_inputs[1] + 2.0 * shift_in],
        train_outputs=[base.train_outputs[0], base.train_outputs[1] + 0.5 * shift_out])
    m, _ = _matrix(shifted)
    assert np.diag(m["explained_variance"]).min() > 0.99  # each transcoder is exact on its own layer
    for s, t in [(0, 1), (1, 0)]:
        assert m["relative_transfer"][s, t] > 0.98, (s, t)
        assert m["relative_transfer_scale_only"][s, t] < 0.5, (s, t)
        assert m["transfer_beyond_persistence"][s, t] > 0.9  # fresh tokens: a shared map, not persistence
