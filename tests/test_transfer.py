"""Within-model transfer: planted ground truth, independent recomputation, files, runs and the CLI."""

import csv
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from conftest import run_cli, tiny_twin
from layerflow.capture import CaptureConfig, capture
from layerflow.errors import LayerflowError
from layerflow.evaluate import read_eval_results
from layerflow.models.sites import site_at as SiteId
from layerflow.testing import planted_layers, true_sae
from layerflow.train import LayerSchedule, TrainConfig, train
from layerflow.transfer import Calibration, LinearCoder, TransferMatrix, TransferOptions, transfer_run, within_model_matrix
from layerflow.transfer.within import NO_INTERVAL

pytestmark = pytest.mark.usefixtures("one_thread")

OVERLAPS, GAINS = [1.0, 1.0, 0.5, 0.0], [1.0, 4.0, 1.0, 1.0]  # layer 1: every feature of layer 0, 4x the norm
NO_MATCH = TransferOptions(match_distance=0, batch_tokens=1000)


def _hook(i: int) -> str:
    return f"blocks.{i}.hook_resid_post"


def _planted_matrix(planted, arch="jumprelu", options=NO_MATCH, saes=None):
    n = len(planted.activations)
    saes = saes or {_hook(i): true_sae(planted, i, arch) for i in range(n)}
    acts = {_hook(i): planted.activations[i] for i in range(n)}
    sites = [SiteId("planted", _hook(i), i, n) for i in range(n)]
    calibration = Calibration.of({_hook(i): planted.train[i] for i in range(n)})
    return within_model_matrix(saes, acts, sites, calibration, options), saes


@pytest.fixture(scope="module")
def planted():
    return planted_layers(OVERLAPS, GAINS, seed=0)


def test_scale_aware_metric_ranks_planted_overlap_while_the_raw_ratio_is_fooled_by_norm_growth(planted):
    m, _ = _planted_matrix(planted)
    ev, raw_ratio = m["explained_variance"], m["transfer_recon_ratio"]
    # Layer 1 holds all of layer 0's features at 4x the norm; layer 2 half of them; layer 3 none.
    assert ev[0, 1] > ev[0, 2] > ev[0, 3]
    assert raw_ratio[0, 2] > raw_ratio[0, 1]  # the notes' ratio ranks the full-overlap layer below the half one
    assert m["explained_variance_raw"][0, 1] < ev[0, 2]  # so does EV without scale matching
    # Over every off-diagonal pair, the scale-aware figure follows the planted overlap; the raw ratio does not.
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    truth = [planted.overlap(i, j) for i, j in pairs]
    assert spearmanr(truth, [ev[p] for p in pairs]).statistic > 0.9
    assert spearmanr(truth, [raw_ratio[p] for p in pairs]).statistic < 0.5


def test_carried_forward_residual_is_persistence_not_feature_reuse():
    # Shared codes: layer 1 is layer 0 carried forward (times 3); layer 2 reuses layer 0's features
    # on tokens of its own, so only layer 2 shows transfer beyond persistence.
    carried = planted_layers([1.0, 1.0], [1.0, 3.0], shared_codes=True, seed=2)
    reused = planted_layers([1.0, 1.0], [1.0, 3.0], shared_codes=False, seed=2)
    m_carried, _ = _planted_matrix(carried)
    m_reused, _ = _planted_matrix(reused)
    assert m_carried["relative_transfer"][0, 1] > 0.95 and m_reused["relative_transfer"][0, 1] > 0.95
    assert m_carried["persistence_ev_scalar"][0, 1] > 0.95 and m_reused["persistence_ev_scalar"][0, 1] < 0.05
    assert abs(m_carried["transfer_beyond_persistence"][0, 1]) < 0.05
    assert m_reused["transfer_beyond_persistence"][0, 1] > 0.9


def _mean_ratio(x):
    return (x.mean(0).norm() / x.norm(dim=-1).mean()).item()


def test_per_layer_means_no_longer_read_as_lost_features():
    # Four layers with the same features, each with its own mean offset (||mean|| / E||x|| about
    # 0.75, as in SmolLM2's residual stream) and its own norm. Every pair shares every feature, so
    # every pair should transfer fully, the far pair (0, 3) included.
    same = planted_layers([1.0] * 4, [1.0, 3.0, 0.5, 8.0], layer_offsets=[1.2, 1.0, 1.4, 1.1], seed=5)
    assert all(0.65 < _mean_ratio(x) < 0.85 for x in same.activations)
    m, _ = _planted_matrix(same)
    off = ~np.eye(4, dtype=bool)
    assert m["relative_transfer"][off].min() > 0.97
    assert m["relative_transfer"][0, 3] > 0.97 and m["relative_transfer"][3, 0] > 0.97
    # Matching the norm alone hands SAE_i the wrong mean and charges the offset as error.
    assert m["relative_transfer_scale_only"][off].max() < 0.5
    assert m["relative_transfer_scale_only"][0, 3] < 0


def test_ranking_follows_planted_overlap_not_distance():
    # Overlap with layer 0 is 0.25 next door and 1.0 two layers away: a metric that only tracked
    # |i - j| (as norm and mean drift do) would rank them the other way.
    planted = planted_layers([1.0, 0.25, 1.0, 0.5, 0.75], [1.0, 2.0, 4.0, 6.0, 9.0],
                             layer_offsets=[1.2, 0.9, 1.3, 1.0, 1.1], seed=6)
    m, _ = _planted_matrix(planted)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    truth = [planted.overlap(i, j) for i, j in pairs]
    distance = [-abs(i - j) for i, j in pairs]
    assert spearmanr(truth, distance).statistic < 0.3  # the planted ranking is not one of distance
    assert spearmanr(truth, [m["relative_transfer"][p] for p in pairs]).statistic > 0.9
    assert spearmanr(truth, [m["relative_transfer_scale_only"][p] for p in pairs]).statistic < 0.6
    assert m["relative_transfer"][0, 2] > 0.95 > 0.5 > m["relative_transfer"][0, 1]


def test_a_copy_plus_a_constant_is_all_persistence_whichever_sae_is_better():
    # Layer 1 = layer 0 + a constant, token for token. SAE_1 is a worse dictionary than SAE_0
    # (a fifth of its decoder is noise), so EV_00 != EV_11; transfer beyond persistence must still
    # be 0 both ways: the two sides go through the same dictionary and differ only in the input.
    base = planted_layers([1.0], seed=7)
    shift = torch.randn(base.activations[0].shape[1], generator=torch.Generator().manual_seed(1)) * 3
    copy = dataclasses.replace(base, activations=[base.activations[0], base.activations[0] + shift],
                               train=[base.train[0], base.train[0] + shift],
                               dictionaries=base.dictionaries * 2, feature_ids=base.feature_ids * 2,
                               codes=base.codes * 2, gains=[1.0, 1.0])
    good, worse = true_sae(copy, 0), true_sae(copy, 1)
    with torch.no_grad():
        rows = torch.arange(0, worse.cfg.d_sae, 5)
        worse.W_dec[rows] = torch.randn(len(rows), worse.cfg.d_in, generator=torch.Generator().manual_seed(2)) * 0.03
    m, _ = _planted_matrix(copy, saes={_hook(0): good, _hook(1): worse})
    own = np.diag(m["explained_variance"])
    assert own[0] - own[1] > 0.05  # the old baseline (through the target's SAE) gave EV_00 / EV_11 - 1 here
    assert abs(m["transfer_beyond_persistence"][0, 1]) < 1e-4 and abs(m["transfer_beyond_persistence"][1, 0]) < 1e-4
    assert m["relative_transfer"][0, 1] > 1.05  # SAE_0 beats SAE_1 on layer 1: transfer, but all persistence


def test_metrics_equal_an_independent_computation(planted):
    m, saes = _planted_matrix(planted)
    x = [a.double() for a in planted.activations]

    def recon(sae, a):
        return sae.decode(sae.encode(a.float())).double()

    def ev(a, a_hat):  # ratio of totals, variance around the mean
        return 1 - (a - a_hat).pow(2).sum() / (a - a.mean(0)).pow(2).sum()

    train = [a.double() for a in planted.train]
    for s, t in [(0, 1), (2, 0), (3, 3), (1, 2)]:
        sae = saes[_hook(s)]
        rho = x[s].norm(dim=-1).mean() / x[t].norm(dim=-1).mean()
        mu_s, mu_t = train[s].mean(0), train[t].mean(0)  # the match is fit on the train split only
        spread = lambda a: (a - a.mean(0)).pow(2).sum(-1).mean().sqrt()  # noqa: E731
        alpha = spread(train[s]) / spread(train[t])
        matched = (recon(sae, (x[t] - mu_t) * alpha + mu_s) - mu_s) / alpha + mu_t
        own = ev(x[t], recon(saes[_hook(t)], x[t]))
        mse = lambda a, b: (a - b).pow(2).sum(-1).mean()  # noqa: E731
        expected = {
            "transfer_recon_ratio": mse(x[s], recon(sae, x[s])) / mse(x[t], recon(sae, x[t])),
            "explained_variance_raw": ev(x[t], recon(sae, x[t])),
            "explained_variance_scale_only": ev(x[t], recon(sae, rho * x[t]) / rho),
            "relative_transfer_scale_only": ev(x[t], recon(sae, rho * x[t]) / rho) / own,
            "explained_variance": ev(x[t], matched),
            "relative_transfer": ev(x[t], matched) / own,
            "persistence_ev_identity": ev(x[t], x[s]),
        }
        xs_c, xt_c = x[s] - x[s].mean(0), x[t] - x[t].mean(0)
        a = (xs_c * xt_c).sum() / xs_c.pow(2).sum()
        expected["persistence_ev_scalar"] = ev(x[t], x[t].mean(0) + a * xs_c)
        ts_c, tt_c = train[s] - mu_s, train[t] - mu_t
        a_train = (ts_c * tt_c).sum() / ts_c.pow(2).sum()
        carried = mu_t + a_train * (recon(sae, x[s]) - mu_s)  # SAE_i on its own layer, carried to j
        expected["persistence_ev_through_source"] = ev(x[t], carried)
        expected["transfer_beyond_persistence"] = (ev(x[t], matched) - ev(x[t], carried)) / own
        expected["l0"] = (sae.encode(((x[t] - mu_t) * alpha + mu_s).float()) != 0).double().sum(-1).mean()
        for name, value in expected.items():
            assert m[name][s, t] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), (name, s, t)


def test_diagonal_is_each_sae_on_its_own_layer(planted):
    m, saes = _planted_matrix(planted)
    from layerflow.metrics import reconstruction_metrics

    for i in range(4):
        x = planted.activations[i]
        own = reconstruction_metrics(x, saes[_hook(i)](x))
        for name in ("explained_variance", "explained_variance_raw", "explained_variance_scale_only"):
            assert m[name][i, i] == pytest.approx(own.explained_variance, abs=1e-6), name
    for name, value in [("relative_transfer", 1.0), ("relative_transfer_scale_only", 1.0), ("transfer_recon_ratio", 1.0),
                        ("delta_fvu", 0.0),
                        ("relative_persistence", 1.0), ("transfer_beyond_persistence", 0.0),
                        ("persistence_ev_scalar", 1.0), ("persistence_ev_identity", 1.0)]:
        np.testing.assert_allclose(np.diag(m[name]), value, atol=1e-6, err_msg=name)


def _topk_rescaled(planted, i):
    sae = true_sae(planted, i, "topk")
    rescaled = TopKSAE(TopKSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, k=3, rescale_acts_by_decoder_norm=True,
                                     apply_b_dec_to_input=False))
    rescaled.load_state_dict(sae.state_dict())
    with torch.no_grad():
        rescaled.W_dec.mul_(torch.linspace(0.5, 2.0, sae.cfg.d_sae)[:, None])  # unequal decoder norms
    return rescaled


def _standard(planted, i):
    sae = true_sae(planted, i, "topk")
    standard = StandardSAE(StandardSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae))
    standard.load_state_dict(sae.state_dict())
    with torch.no_grad():
        standard.b_enc.fill_(-0.3)
    return standard


@pytest.mark.parametrize("make", ["topk", "jumprelu", "standard", "topk_rescaled"])
def test_shared_matmul_path_equals_each_saes_own_encode_decode(planted, make, monkeypatch):
    builders = {"standard": _standard, "topk_rescaled": _topk_rescaled}
    saes = {_hook(i): builders[make](planted, i) if make in builders else true_sae(planted, i, make) for i in range(4)}
    assert all(LinearCoder.from_sae(s) is not None for s in saes.values())
    fast, _ = _planted_matrix(planted, saes=saes)
    monkeypatch.setattr(LinearCoder, "from_sae", classmethod(lambda cls, sae: None))
    slow, _ = _planted_matrix(planted, saes=saes)
    for name in fast.metrics:
        # float rounding differs (alpha (x W) + c vs (alpha x - b) W): a latent at its threshold may flip
        atol = 2e-3 if name in ("l0", "dead_fraction") else 1e-5
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-5, atol=atol, err_msg=name)


def test_matching_finds_planted_shared_features(planted):
    m, _ = _planted_matrix(planted, options=TransferOptions(match_distance=1))
    # layers 0-1 share every feature, 1-2 half, 2-3 none
    assert m["decoder_matched_fraction"][0, 1] > 0.95
    assert 0.4 < m["decoder_matched_fraction"][1, 2] < 0.6
    assert m["decoder_matched_fraction"][2, 3] < 0.1
    assert np.isnan(m["decoder_matched_fraction"][0, 2])  # beyond the matching distance
    pairs = m.extras["matched_features"][_hook(0), _hook(1)]["decoder"]
    truth = planted.correspondence(0, 1)
    hits = sum(truth[int(s)] == int(t) for s, t in zip(pairs.source_index, pairs.target_index))
    assert hits / len(truth) > 0.95


def test_matrix_round_trips_through_json_and_csv(planted, tmp_path):
    m, _ = _planted_matrix(planted, options=TransferOptions(match_distance=1))
    json_path, csv_path, *_ = m.write(tmp_path)
    back = TransferMatrix.read(json_path)
    assert back.equals(m)
    json.loads(json_path.read_text())  # strict JSON: NaN written as null
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(rows) == 16
    for row in rows:
        s, t = int(row["source_layer"]), int(row["target_layer"])
        for name in m.metrics:
            value = float(row[name]) if row[name] else float("nan")
            assert np.array_equal(value, m[name][s, t], equal_nan=True), name


def test_bad_inputs_are_named(planted):
    saes = {_hook(0): true_sae(planted, 0)}
    acts = {_hook(0): planted.activations[0], _hook(1): planted.activations[1][:10]}
    sites = [SiteId("planted", _hook(i), i, 2) for i in range(2)]
    calibration = Calibration.of({_hook(i): planted.train[i] for i in range(2)})
    with pytest.raises(LayerflowError, match="No SAE for site 'blocks.1.hook_resid_post'"):
        within_model_matrix(saes, acts, sites, calibration)
    saes[_hook(1)] = true_sae(planted, 1)
    with pytest.raises(LayerflowError, match="same tokens"):
        within_model_matrix(saes, acts, sites, calibration)
    acts[_hook(1)] = planted.activations[1]
    with pytest.raises(LayerflowError, match="No train-split statistics for 'blocks.1.hook_resid_post'"):
        within_model_matrix(saes, acts, sites, Calibration.of({_hook(0): planted.train[0]}))
    with pytest.raises(LayerflowError, match="'nope' is not a within_model metric"):
        TransferMatrix("within_model", sites, sites, {"nope": np.zeros((2, 2))})


# ---------------------------------------------------------------- a real (tiny) training run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    capture(CaptureConfig(model="gpt2-twin", layers=[0, 1], n_tokens=4096, context_size=32, source="random"),
            root / "store", loaded=tiny_twin("gpt2-twin"))
    schedule = LayerSchedule("topk", {"expansion_factor": 4, "k": 8, "lr": 1e-3})
    train(TrainConfig(str(root / "store"), schedule=schedule, steps=20, batch_tokens=256), root / "run")
    return root


def test_run_diagonal_equals_the_training_evals(tiny_run):
    matrix, written = transfer_run(tiny_run / "run", options=TransferOptions(max_tokens=None))
    evals = read_eval_results(tiny_run / "run")
    for i, site in enumerate(matrix.sources):
        own = evals[site.hook_name].reconstruction
        assert matrix["explained_variance"][i, i] == pytest.approx(own.explained_variance, abs=1e-5)
        assert matrix["l0"][i, i] == pytest.approx(own.l0, rel=1e-6)
    assert [s.layer for s in matrix.sources] == [0, 1] and matrix.sources[0].model == "gpt2-twin"
    assert [p.name for p in written][-1] == "transfer_matrix.json"  # the manifest is written last
    assert TransferMatrix.read(tiny_run / "run" / "transfer").equals(matrix)
    summary = json.loads((tiny_run / "run" / "transfer" / "summary.json").read_text())
    assert set(summary["summaries"]) == {"relative_transfer", "explained_variance"}  # EV-scale figures only


def test_any_saelens_folders_with_a_store(tiny_run, tmp_path):
    matrix, _ = transfer_run(tiny_run / "run" / "saes", store=tiny_run / "store", out_dir=tmp_path,
                             options=TransferOptions(max_tokens=200, match_distance=0))
    assert matrix.settings["n_tokens"] == 200
    with pytest.raises(LayerflowError, match="pass --store"):
        transfer_run(tiny_run / "run" / "saes", out_dir=tmp_path)


def test_cli_transfer_and_bad_input(tiny_run, tmp_path):
    out = tmp_path / "t"
    result = run_cli("transfer", str(tiny_run / "run"), "--out", str(out), "--max-tokens", "512")
    assert result.returncode == 0, result.stderr
    assert (out / "transfer_matrix.json").exists() and (out / "transfer_matrix.csv").exists()
    assert "0.resid_post" in result.stdout and "off-diagonal mean (clipped to [0, 1])" in result.stdout
    words = " ".join(result.stdout.split())
    assert "in brackets, the bootstrap interval" in words and re.search(r"\d \[-?[\d.]+, -?[\d.]+\] ", words)
    assert "decay rate n/a per layer" in result.stdout  # two layers: one distance, no slope
    assert "transfer_matrix.bootstrap.npz" in result.stdout
    bad = run_cli("transfer", str(tmp_path / "missing"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "No SAE folders" in bad.stderr
    bad = run_cli("transfer", str(tiny_run / "run"), "--hooks", "blocks.7.hook_resid_post", "--out", str(out))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "blocks.7.hook_resid_post" in bad.stderr


def test_spliced_diagonal_equals_the_spliced_evals(tiny_run, tmp_path):
    from layerflow.capture import ActivationStore
    from layerflow.dictionaries.io import load_saes
    from layerflow.evaluate import evaluate_saes

    loaded = tiny_twin("gpt2-twin")
    matrix, _ = transfer_run(tiny_run / "run", out_dir=tmp_path, loaded=loaded,
                             options=TransferOptions(max_tokens=None, match_distance=0, spliced=True))
    evals = evaluate_saes(load_saes(tiny_run / "run"), ActivationStore(tiny_run / "store"), loaded=loaded)
    for i, site in enumerate(matrix.sources):
        assert matrix["spliced_delta_ce"][i, i] == pytest.approx(evals[site.hook_name].delta_ce, rel=1e-4, abs=1e-6)
        assert matrix["spliced_kl"][i, i] == pytest.approx(evals[site.hook_name].kl_div, rel=1e-4, abs=1e-6)
    assert np.isfinite(matrix["spliced_delta_ce"]).all()
    for name in ("spliced_delta_ce", "spliced_kl"):  # resampled over the spliced sequences
        low, high = matrix.intervals[name]
        assert (low <= matrix[name] + 1e-9).all() and (matrix[name] <= high + 1e-9).all() and (low < high).all()


# ---------------------------------------------------------------- floors and ceilings


def test_floor_is_the_dictionary_rotated_inside_the_data_subspace_and_the_ceiling_a_seed_twin(planted):
    from layerflow.transfer.references import measure_references

    hooks = [_hook(i) for i in range(4)]
    saes = {h: true_sae(planted, i) for i, h in enumerate(hooks)}
    acts = {h: planted.activations[i] for i, h in enumerate(hooks)}
    calibration = Calibration.of({h: planted.train[i] for i, h in enumerate(hooks)}, covariance=True)
    twins = {hooks[1]: true_sae(planted, 1)}  # a perfect twin: the ceiling is "the same features"
    refs = measure_references(saes, acts, {h: i for i, h in enumerate(hooks)}, calibration, twins, seed=0)
    # The floor, recomputed from its definition: D_i rotated inside the principal subspace, on x_i.
    for i, h in enumerate(hooks):
        x, sae = acts[h].double(), saes[h]
        mu = calibration.means[h]
        Q = calibration.rotation(h, 7919 * (i + 1)).double()
        rotated_out = mu + (sae((mu + (x - mu) @ Q).float()).double() - mu) @ Q.T
        ev = lambda a, a_hat: 1 - (a - a_hat).pow(2).sum() / (a - a.mean(0)).pow(2).sum()  # noqa: E731
        expected = ev(x, rotated_out) / ev(x, sae(x.float()).double())
        assert refs.floor["relative_transfer"][h] == pytest.approx(expected.item(), abs=1e-4)
        assert refs.floor["relative_transfer"][h] < 0.6  # no shared features: far below the real transfer
    assert refs.ceiling["relative_transfer"][hooks[1]] == pytest.approx(1.0, abs=1e-6)
    assert refs.ceiling["decoder_matched_fraction"][hooks[1]] == 1.0
    assert refs.ceiling["activation_matched_fraction"][hooks[1]] == 1.0
    assert refs.floor["decoder_matched_fraction"][hooks[1]] < 0.05
    assert refs.floor["activation_matched_fraction"][hooks[1]] < 0.2
    # Between measured sites the ceiling is interpolated in depth, and says so.
    assert refs.at("ceiling", "relative_transfer", hooks[1]) == (refs.ceiling["relative_transfer"][hooks[1]], False)
    value, interpolated = refs.at("ceiling", "relative_transfer", hooks[3])
    assert interpolated and value == pytest.approx(1.0, abs=1e-6)


def test_run_writes_floors_and_ceilings_beside_the_matrix(tiny_run, tmp_path):
    import shutil

    twin_dir = tmp_path / "twins"
    shutil.copytree(tiny_run / "run" / "saes" / "blocks.1.hook_resid_post", twin_dir / "blocks.1.hook_resid_post")
    matrix, _ = transfer_run(tiny_run / "run", out_dir=tmp_path / "t", twins=twin_dir,
                             options=TransferOptions(max_tokens=1024, match_distance=1))
    refs = matrix.references
    assert refs["ceiling"]["relative_transfer"] == {"blocks.1.hook_resid_post": pytest.approx(1.0, abs=1e-9)}
    assert set(refs["floor"]["relative_transfer"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert TransferMatrix.read(tmp_path / "t").references == refs
    with pytest.raises(LayerflowError, match="seed twins in .* are for none of the sites"):
        transfer_run(tiny_run / "run", out_dir=tmp_path / "u", twins=twin_dir, hooks=["blocks.0.hook_resid_post"],
                     options=TransferOptions(max_tokens=256, match_distance=0))
    # A twin of another model (or width) at the same hook name is refused, not run into a shape error.
    wide = StandardSAE(StandardSAEConfig(d_in=40, d_sae=32))
    wide.save_model(tmp_path / "other" / "blocks.1.hook_resid_post")
    with pytest.raises(LayerflowError, match="seed twin of .blocks.1.hook_resid_post. .* reads width 40"):
        transfer_run(tiny_run / "run", out_dir=tmp_path / "v", twins=tmp_path / "other",
                     options=TransferOptions(max_tokens=256, match_distance=0))


def test_intervals_resample_whole_sequences_and_narrow_with_more_of_them(tmp_path):
    def matrix(n_tokens, options=NO_MATCH):
        p = planted_layers([1.0, 0.5, 0.0], [1.0, 2.0, 3.0], n_tokens=n_tokens, layer_offsets=[1.0, 1.2, 0.8], seed=11)
        acts = {_hook(i): p.activations[i] for i in range(3)}
        sites = [SiteId("planted", _hook(i), i, 3) for i in range(3)]
        sequences = torch.arange(n_tokens) // 64  # 64-token "sequences"
        return within_model_matrix({_hook(i): true_sae(p, i) for i in range(3)}, acts, sites,
                                   Calibration.of({_hook(i): p.train[i] for i in range(3)}), options, sequences=sequences)

    small, large, tiny = matrix(2048, TransferOptions(match_distance=2, batch_tokens=1000)), matrix(32768), matrix(256)
    # 4 sequences: a resample reuses most of them, so no intervals (and no claims downstream), and the settings say why
    assert tiny.intervals == {} and tiny.replicates == {} and "only 4 held-out sequences" in tiny.settings["intervals"]
    for m in (small, large):
        # every figure that depends on the tokens has an interval around it; the rest say why they have none
        assert set(m.intervals) == set(m.metrics) - set(NO_INTERVAL)
        assert set(m.settings["no_interval"]) - {"note"} == set(NO_INTERVAL) and "dead_fraction" in NO_INTERVAL
        # every figure lies inside its own interval, the near-zero EVs of the unrelated planted layers too
        # (re-centring each resample on its own mean put every resample below them)
        for name, (low, high) in m.intervals.items():
            off = ~np.eye(3, dtype=bool) & ~np.isnan(m[name])  # the diagonal of a ratio is 1 (or 0) in every resample
            constant = (low == high) & (high == m[name])  # TopK's L0 is k = 4; no planted latent pair beats the floor
            assert ((low < high) | constant)[off].all() and (name in ("l0", "activation_matched_fraction")
                                                             or not constant[off].any()), name
            inside = (low <= m[name] + 1e-9) & (m[name] <= high + 1e-9)
            assert (inside | np.isnan(m[name])).all(), name
        assert "whole held-out sequences" in m.settings["intervals"]
    off = ~np.eye(3, dtype=bool)
    width = lambda m: (m.intervals["relative_transfer"][1] - m.intervals["relative_transfer"][0])[off].mean()  # noqa: E731
    assert 2.5 < width(small) / width(large) < 6  # about sqrt(16) = 4 times narrower with 16 times the sequences
    rows = list(csv.DictReader(io.StringIO(small.to_csv())))
    assert float(rows[1]["relative_transfer_low"]) == small.intervals["relative_transfer"][0][0, 1]
    # the resamples travel beside the JSON (the JSON alone has none), and the intervals are their percentiles
    assert small.replicates["relative_transfer"].shape == (200, 3, 3)
    assert not TransferMatrix.from_dict(json.loads(json.dumps(small.to_dict()))).replicates
    back = TransferMatrix.read(small.write(tmp_path)[0])
    assert back.equals(small) and (tmp_path / "transfer_matrix.bootstrap.npz").exists()
    r = small.replicates["relative_transfer"][:, 0, 1]
    assert small.intervals["relative_transfer"][0][0, 1] == pytest.approx(np.quantile(r, 0.025))


def test_resampled_grams_and_rank_correlations_equal_recomputing_them_on_the_drawn_sequences():
    from scipy.stats import spearmanr

    from layerflow.transfer.within import _grams, _spearman_rows

    g = torch.Generator().manual_seed(2)
    ys = [torch.randn(300, 5, generator=g) + 3 * i for i in range(3)]  # sites with different large means
    groups = torch.arange(300) // 30
    grams = _grams(ys, [y.double().mean(0) for y in ys], groups, 10)
    counts = torch.stack([torch.bincount(r, minlength=10) for r in torch.randint(10, (4, 10), generator=g)])
    raw, centered = grams.resampled(counts)
    for b in range(4):
        rows = torch.cat([torch.arange(k * 30, k * 30 + 30).repeat(int(counts[b, k])) for k in range(10)])
        flat = torch.stack([y[rows].double().reshape(-1) for y in ys])
        around = torch.stack([(y[rows].double() - y.double().mean(0)).reshape(-1) for y in ys])  # all tokens' means
        assert torch.allclose(raw[b], flat @ flat.T, rtol=1e-10) and torch.allclose(centered[b], around @ around.T, rtol=1e-10)
    a, c = torch.rand(6, 20, generator=g, dtype=torch.float64), torch.rand(6, 20, generator=g, dtype=torch.float64)
    c[0, :10] = 0.0  # ties, as a target where half the top latents are silent
    c[1] = 0.0  # constant: no rank correlation
    rho = _spearman_rows(a, c)
    assert torch.isnan(rho[1]) and all(rho[k].item() == pytest.approx(spearmanr(a[k], c[k]).statistic, abs=1e-12)
                                       for k in (0, 2, 3, 4, 5))
