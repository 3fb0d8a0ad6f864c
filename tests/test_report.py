"""summary.json and report.md of a run: every printed number traceable, findings chosen by the data."""

import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest

from layerflow.evaluate import SiteEval, write_eval_results
from layerflow.files import CaptureManifest, SiteResult, TrainManifest, cross_dir_name
from layerflow.files import CAPTURE_MANIFEST as CAPTURE_FILE
from layerflow.files import TRAIN_MANIFEST as TRAIN_FILE
from layerflow.metrics import ReconstructionMetrics
from layerflow.models.sites import site_at as SiteId
from layerflow.report import build_summary, findings_markdown, fmt, report_run, write_report
from layerflow.results import RunResults
from layerflow.transfer import TransferMatrix, compare_same_depth, same_depth_pairs

LAYERS, N_LAYERS = [0, 2, 4, 6, 8, 10], 12
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?!\w)")


# --- a run folder from real files ----------------------------------------------------------------


def hook(layer):
    return f"blocks.{layer}.hook_resid_post"


def norms(layers):
    return [10.0 * 1.4 ** k for k in range(len(layers))]  # residual norm growing with depth


def raw_ratio(R, norm):
    """The notes' ratio of the same transfer: MSE(i on i) / MSE(i on j) grows as norm_i^2 / norm_j^2."""
    n = np.array(norm)
    return R * np.divide.outer(n, n) ** 2


def write_model(root, name, layers, n_layers, R, evals=True, train=True, nan_at=None, references=None, noise=0.01,
                quality="poor", persistence_gap=0.3, decoder_fraction=None):
    """A model's capture manifest, evals (quality "poor": FVU 0.1-0.4, up to 30% dead; "good": passes every gate),
    training manifest and within-model matrix, with `noise`-sized bootstrap resamples (None: none)."""
    sites = [{"layer": layer, "kind": "resid_post", "hook_name": hook(layer), "d": 8} for layer in layers]
    norm = norms(layers)
    capture = CaptureManifest(
        schema_version=1, layerflow_version="0.1.0", model={"name": name, "n_layers": n_layers}, sites=sites,
        layers=list(layers), d_model=8, dtype="float32", context_size=16, prepend_bos=True, bos_token_id=1,
        special_token_ids=[1], text_source={"source": "test"},
        split={"train_seqs": 36, "heldout_seqs": 4, "train_tokens": 576, "heldout_tokens": 64}, n_tokens=640,
        shards=[], mean_norm={hook(layer): v for layer, v in zip(layers, norm)}, seconds=1.5)
    (root / "activations" / name).mkdir(parents=True)
    (root / "activations" / name / CAPTURE_FILE).write_text(capture.to_json())
    saes = root / "saes" / name
    if evals:
        rng = np.random.default_rng(len(layers))
        fvu, dead = (rng.uniform(0.1, 0.4, 9), rng.uniform(0, 0.3, 9)) if quality == "poor" else \
            (rng.uniform(0.05, 0.15, 9), rng.uniform(0, 0.05, 9))
        write_eval_results({hook(layer): SiteEval(hook(layer), ReconstructionMetrics(
            n_tokens=64, fvu=float(f), explained_variance=float(1 - f), mse=float(f * 50), variance=50.0, l0=12.0,
            dead_fraction=float(d), dense_fraction=0.0, l2_ratio=0.93, relative_reconstruction_bias=0.98),
            ce_clean=3.1, ce_spliced=3.1 + float(f), ce_zero_ablation=7.4, ce_loss_score=0.9, delta_ce=float(f),
            kl_div=float(f / 2))
            for layer, f, d in zip(layers, fvu, dead)}, saes)
    if train:
        manifest = TrainManifest("0.1.0", {"store": "capture"}, {"name": name}, steps=200, tokens_per_site=4096,
                                 seconds=12.25, sites=[SiteResult(hook(layer), layer, f"saes/{hook(layer)}", {"k": 12},
                                                                  1.0, 9.0, 1.0) for layer in layers])
        (saes / TRAIN_FILE).write_text(manifest.to_json())
    if R is not None:
        R = np.array(R, dtype=np.float64)
        np.fill_diagonal(R, 1.0)
        W = raw_ratio(R, norm)
        if nan_at:
            R[nan_at] = W[nan_at] = np.nan  # a pair not computed
        ids = [SiteId(name, hook(layer), layer, n_layers) for layer in layers]
        P = R - persistence_gap  # persistence: most of each pair's transfer
        np.fill_diagonal(P, 1.0)
        metrics = {"relative_transfer": R, "transfer_recon_ratio": W, "relative_persistence": P,
                   "transfer_beyond_persistence": R - P}
        rng = np.random.default_rng(7)
        replicates = {} if noise is None else {m: metrics[m][None] + rng.normal(0, noise, (200, *R.shape))
                                               for m in ("relative_transfer", "transfer_beyond_persistence")}
        settings = {"n_tokens": 64}
        if decoder_fraction is not None:  # adjacent pairs only, from decoder weights: no interval, and the reason
            adjacent = np.abs(np.subtract.outer(np.arange(len(layers)), np.arange(len(layers)))) == 1
            metrics["decoder_matched_fraction"] = np.where(adjacent, decoder_fraction, np.nan)
            settings["no_interval"] = {"decoder_matched_fraction": "decoder weights only"}
        TransferMatrix("within_model", ids, ids, metrics, settings, references=references or {},
                       replicates=replicates).write(root / "transfer" / name)


def references(layers=LAYERS, floor=0.15, ceiling=0.95, ceiling_at=(2, 8)):
    """Floors at every layer (with a little spread), ceilings at a few."""
    return {"floor": {"relative_transfer": {hook(layer): floor + 0.01 * k for k, layer in enumerate(layers)}},
            "ceiling": {"relative_transfer": {hook(layer): ceiling for layer in ceiling_at}},
            "layers": {hook(layer): layer for layer in layers}, "how": {}}


def write_cross(root, a, b, layers_a, n_a, layers_b, n_b):
    sources = [SiteId(a, hook(layer), layer, n_a) for layer in layers_a]
    targets = [SiteId(b, hook(layer), layer, n_b) for layer in layers_b]
    gap = np.abs(np.subtract.outer([s.relative_depth for s in sources], [t.relative_depth for t in targets]))
    rt = 0.8 - gap + 0.05 * np.arange(len(sources))[:, None] / len(sources)  # peaks at the same depth
    noise = np.random.default_rng(3).normal(0, 0.01, (200, *rt.shape))
    matrix = TransferMatrix("cross_model", sources, targets, {
        "stitched_explained_variance": 0.7 * rt, "target_sae_explained_variance": np.full(rt.shape, 0.7),
        "relative_transfer": rt, "cka": 0.6 - gap / 2, "cka_p_value": np.full(rt.shape, 0.01),
        "fraction_features_with_partner": np.clip(0.5 - gap, 0, 1)},
        replicates={"relative_transfer": rt[None] + noise, "stitched_explained_variance": 0.7 * rt[None] + noise})
    folder = root / "transfer" / cross_dir_name(a, b)
    matrix.write(folder)
    metrics = ("relative_transfer", "stitched_explained_variance", "cka")
    depth = {m: asdict(compare_same_depth(matrix, m)) for m in metrics}
    (folder / "depth_comparison.json").write_text(json.dumps(depth))


def write_run_json(root, models, stages=True):
    run = {"config": {"models": [{"name": m} for m in models]}}
    if stages:
        run["stages"] = {"capture": {"status": "done", "seconds": 12.5}, "train": {"status": "done", "seconds": 300.25},
                         "transfer": {"status": "done", "seconds": 2400.0}, "report": {"status": "pending"}}
    (root / "run.json").write_text(json.dumps(run))


def hub_matrix(hub_layer=4, layers=LAYERS, background=0.3, seed=0):
    rng = np.random.default_rng(seed)
    R = background + rng.uniform(-0.05, 0.05, (len(layers), len(layers)))
    R[layers.index(hub_layer)] = 0.95
    return R


def flat_matrix(layers=LAYERS, value=0.5):
    return np.full((len(layers), len(layers)), value)


def divergence_matrix(first_after_break=8, layers=LAYERS, seed=1):
    rng = np.random.default_rng(seed)
    before = np.array(layers) < first_after_break
    same_side = np.equal.outer(before, before)
    return np.where(same_side, rng.uniform(0.8, 0.95, (len(layers),) * 2), rng.uniform(0.05, 0.2, (len(layers),) * 2))


def make_run(tmp_path, R, name="toy-a", **kwargs):
    root = tmp_path / "run"
    root.mkdir(parents=True)
    write_model(root, name, LAYERS, N_LAYERS, R, **kwargs)
    write_run_json(root, [name])
    return root


@pytest.fixture
def full_run(tmp_path):
    """Two models, a within-model matrix each (one with a pair not computed), a cross-model matrix, plots."""
    root = tmp_path / "run"
    root.mkdir()
    write_model(root, "toy-a", LAYERS, N_LAYERS, hub_matrix(), nan_at=(1, 3), references=references())
    layers_b = [0, 3, 6, 9, 12, 15, 17]
    write_model(root, "toy-b", layers_b, 18, divergence_matrix(9, layers_b))
    write_cross(root, "toy-a", "toy-b", LAYERS, N_LAYERS, layers_b, 18)
    write_run_json(root, ["toy-a", "toy-b"])
    plots = {}
    for plot_id in ("transfer_heatmap:toy-a", "universality:toy-a", "distance_decay", "cross_model:toy-a~toy-b"):
        kind, _, rest = plot_id.partition(":")
        files = [root / "plots" / f"{kind}-{rest}.{ext}" if rest else root / "plots" / f"{kind}.{ext}"
                 for ext in ("png", "pdf")]
        for f in files:
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(b"")
        plots[plot_id] = files
    plots["sae_quality"] = [root / "plots" / "sae_quality.png"]  # listed but never written: no link
    return root, plots


# --- traceability -----------------------------------------------------------------------------------


def numbers_in(value, out):
    """Every number of a JSON value, and the size of every list and dict (counts)."""
    if isinstance(value, dict):
        out.add(fmt(len(value)))
        for v in value.values():
            numbers_in(v, out)
    elif isinstance(value, list):
        out.add(fmt(len(value)))
        for v in value:
            numbers_in(v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.add(fmt(value))
    return out


def printed_numbers(report):
    """Numbers of the report's prose and tables: code spans (names, paths) and link targets left out."""
    text = re.sub(r"`[^`]*`", " ", report)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return NUMBER.findall(text)


def test_every_number_in_the_report_is_in_the_summary_or_the_matrices(full_run):
    root, plots = full_run
    summary_path, report_path = report_run(root, plots)
    summary = json.loads(summary_path.read_text())
    known = numbers_in(summary, set())
    results = RunResults.load(root)
    matrices = [m.transfer for m in results.models.values()] + [c.matrix for c in results.cross]
    for matrix in matrices:
        known |= {fmt(float(v)) for values in matrix.metrics.values() for v in values.ravel()}
    printed = printed_numbers(report_path.read_text())
    assert len(printed) > 200  # the check has something to check
    orphans = sorted(set(printed) - known)
    assert not orphans, f"numbers in report.md found neither in summary.json nor in the matrices: {orphans}"


def test_fmt_is_a_fixed_small_set_of_formats():
    assert [fmt(v) for v in (3, 0.123456, -0.0302, 55.36, 1273.4, 1.0, -0.0, 1.2345e-5, float("nan"), None)] == \
        ["3", "0.123", "-0.0302", "55.4", "1273", "1", "0", "1.23e-05", "n/a", "n/a"]


def test_plots_are_linked_relative_to_the_report_and_absent_plots_are_not(full_run):
    root, plots = full_run
    report = report_run(root, plots)[1].read_text()
    assert "](plots/transfer_heatmap-toy-a.png)" in report
    assert "[PDF](plots/transfer_heatmap-toy-a.pdf)" in report
    assert "](plots/cross_model-toy-a~toy-b.png)" in report
    assert "sae_quality" not in report and "transfer_heatmap-toy-b" not in report
    # Without a plots dict, the files already in plots/ are found and linked the same way.
    assert report_run(root)[1].read_text() == report


# --- findings chosen by the data --------------------------------------------------------------------


def findings(root):
    report = report_run(root)[1].read_text()
    return report.split("## Findings", 1)[1].split("Why the notes' raw ratio is not used", 1)[0]


def test_a_planted_hub_is_named(tmp_path):
    text = findings(make_run(tmp_path, hub_matrix(hub_layer=4)))
    assert "Layer 4 is a hub: it transfers better than its distances predict" in text
    assert "No layer is a hub" not in text


def test_a_flat_matrix_has_no_hub_no_break_and_no_decay_claim(tmp_path):
    text = findings(make_run(tmp_path, flat_matrix()))
    assert "No layer is a hub: none transfers better than its distances predict by 0.05 or more" in text
    assert "The adjacent-link chain has no break" in text
    assert "Whether transfer falls with distance is not resolved at this sample size" in text


def test_a_planted_divergence_is_named(tmp_path):
    text = findings(make_run(tmp_path, divergence_matrix(first_after_break=8)))
    assert "The adjacent-link chain breaks at layer 8 (relative depth 0.727)" in text
    assert "is a hub" not in text


def test_universal_and_specialised_need_the_interval_and_are_defined_where_used(tmp_path):
    R = np.full((6, 6), 0.2)
    R[0], R[5] = 0.95, 0.5  # layer 0 universal, layer 10 in between, the others specialised
    text = findings(make_run(tmp_path, R))
    assert ("Universal layers (definition: the whole universality interval at or above 0.6, where universality is a "
            "layer's mean clipped transfer to every other layer): layer 0. Specialised (whole interval below 0.4): "
            "layers 2, 4, 6 and 8. Intermediate (whole interval between): layer 10. Not resolved at this sample "
            "size: none.") in text
    wide = findings(make_run(tmp_path / "wide", np.full((6, 6), 0.62), noise=0.3))
    assert "Universal layers (definition" in wide and "Not resolved at this sample size: layers 0 to 10" in \
        wide.replace("layers 0, 2, 4, 6, 8 and 10", "layers 0 to 10")


def test_without_resamples_the_report_claims_nothing(tmp_path):
    text = findings(make_run(tmp_path, hub_matrix(hub_layer=4), noise=None))
    assert "This matrix has no bootstrap resamples, so no claim below is resolved" in text
    assert "is a hub" not in text and "breaks at" not in text and "falls with distance:" not in text
    assert "Not resolved at this sample size: layers 0, 2, 4, 6, 8 and 10." in text


def test_poor_dictionaries_make_every_finding_tentative_with_advice(tmp_path):
    root = make_run(tmp_path, hub_matrix(hub_layer=4))
    text = findings(root)
    q = json.loads((root / "summary.json").read_text())["models"]["toy-a"]["quality"]
    assert q["verdict"] == "tentative" and q["failing"]["fvu"]
    assert "**Dictionary quality: not good enough; every finding below is tentative.**" in text
    assert "To change: more training tokens and steps per site" in text
    bullets = [line for line in text.splitlines() if line.startswith("- ")]
    assert bullets and all(line.startswith("- (tentative) ") for line in bullets)
    good = findings(make_run(tmp_path / "good", hub_matrix(hub_layer=4), quality="good"))
    assert "**Dictionary quality: adequate for the findings below.**" in good and "(tentative)" not in good


def test_persistence_appears_next_to_transfer(tmp_path):
    root = make_run(tmp_path, flat_matrix(value=0.8))
    text = findings(root)
    p = json.loads((root / "summary.json").read_text())["models"]["toy-a"]["persistence"]
    assert p["n_pairs"] == 10 and p["transfer_beyond_persistence"]["value"] == pytest.approx(0.3)
    assert p["relative_persistence"]["value"] == pytest.approx(0.5)
    assert "Transfer beyond persistence: 0.3 [" in text
    assert "so adjacent layers share features beyond the residual stream carrying the earlier layer forward" in text
    small = findings(make_run(tmp_path / "small", flat_matrix(value=0.8), persistence_gap=0.02))
    assert "Transfer beyond persistence: 0.02 [" in small
    assert "above zero but below 0.05: nearly all of adjacent transfer is the residual stream" in small


def test_each_figure_is_read_against_its_floor_and_ceiling(tmp_path):
    # Observed mean 0.5 with a floor of about 0.175 and a ceiling of 0.95: 0.42 of the way up.
    root = make_run(tmp_path, flat_matrix(value=0.5), references=references())
    text = findings(root)
    r = json.loads((root / "summary.json").read_text())["models"]["toy-a"]["references"]["relative_transfer"]
    floor = np.mean([0.15 + 0.01 * k for k in range(6)])
    assert r["floor"] == pytest.approx(floor) and r["ceiling"] == 0.95 and r["ceiling_layers"] == [2, 8]
    assert r["position"] == pytest.approx((0.5 - floor) / (0.95 - floor))
    M = np.array(json.loads((root / "transfer" / "toy-a" / "transfer_matrix.json").read_text())["metrics"]
                 ["relative_transfer"], dtype=float)
    R = TransferMatrix.read(root / "transfer" / "toy-a").replicates["relative_transfer"]
    off = ~np.eye(6, dtype=bool)
    low, high = np.quantile(R[:, off].mean(1), [0.025, 0.975])
    assert (r["observed"], r["observed_low"], r["observed_high"]) == pytest.approx((M[off].mean(), low, high))
    assert r["position_low"] == pytest.approx((low - floor) / (0.95 - floor))
    assert (f"Scale of relative transfer: off-diagonal mean 0.5 [{fmt(low)}, {fmt(high)}], {fmt(r['position'])} "
            f"[{fmt(r['position_low'])}, {fmt(r['position_high'])}] of the way from floor to ceiling; floor "
            f"{fmt(floor)} (layers 0, 2, 4, 6, 8 and 10), ceiling 0.95 (layers 2 and 8).") in text
    low = findings(make_run(tmp_path / "low", flat_matrix(value=0.1), references=references()))
    assert "off-diagonal mean 0.1 [" in low and "], below the floor" in low
    none = findings(make_run(tmp_path / "none", flat_matrix(value=0.5)))
    assert "Scale of" not in none
    # a figure without an interval says why, and its position gets none either
    refs = references()
    refs["floor"]["decoder_matched_fraction"] = {hook(layer): 0.1 for layer in LAYERS}
    refs["ceiling"]["decoder_matched_fraction"] = {hook(layer): 0.5 for layer in (2, 8)}
    text = findings(make_run(tmp_path / "decoder", flat_matrix(value=0.5), references=refs, decoder_fraction=0.2))
    assert ("Scale of decoder-matched fraction: mean over adjacent pairs 0.2 (no interval: decoder weights only), "
            "0.25 of the way from floor to ceiling") in text


def test_the_raw_ratio_gets_no_verdicts_and_the_report_says_why(tmp_path):
    R = flat_matrix(value=0.5) + np.random.default_rng(0).uniform(-0.02, 0.02, (6, 6))  # no structure
    root = make_run(tmp_path, R)
    report = report_run(root)[1].read_text()
    summary = json.loads((root / "summary.json").read_text())
    raw = summary["models"]["toy-a"]["raw_ratio"]
    assert list(summary["models"]["toy-a"]["transfer"]) == ["relative_transfer"]  # no bands or hubs for the raw ratio
    assert raw["norm_rank_correlation"]["transfer_recon_ratio"] == pytest.approx(1.0)
    assert abs(raw["norm_rank_correlation"]["relative_transfer"]) < 1
    why = report.split("Why the notes' raw ratio is not used", 1)[1].split("##", 1)[0]
    assert "follows the residual norm: the rank correlation of its per-layer mean with the mean activation norm is 1" in why
    assert f"exceeds one for {fmt(raw['fraction_above_one'])} of the 30 pairs" in why
    assert "It therefore gets no bands, hubs or universal verdicts in this report." in why
    assert "HIGH" not in why and "universal layers" not in why.lower()


def test_cross_model_same_depth_is_reported(full_run):
    root, plots = full_run
    report = report_run(root, plots)[1].read_text()
    summary = json.loads((root / "summary.json").read_text())
    (c,) = summary["cross_model"]
    depth = c["depth_comparison"]["relative_transfer"]
    assert depth["same_depth_mean"] > depth["all_mean"]
    assert "Relative transfer (entries clipped to [0, 1]): same-depth pairs average" in report
    assert ": same depth is higher." in report
    gap = c["same_minus_all"]["relative_transfer"]
    assert gap["value"] == pytest.approx(depth["same_depth_mean"] - depth["all_mean"]) and gap["low"] > 0
    assert "CKA (entries clipped to [0, 1]): same-depth pairs average" in report  # no resamples for CKA: no claim
    assert "whether same depth is higher is not resolved at this sample size" in report
    n = c["n_sources"]
    assert f"For {n} of the {n} source layers the best target by relative transfer is the same-depth one" in report
    matrix = RunResults.load(root).cross[0].matrix
    R = matrix.replicates["relative_transfer"]
    best = [np.mean(R[:, i].argmax(1) == j) for i, j in same_depth_pairs(matrix)]
    assert c["n_best_is_same_depth_resolved"] == sum(f >= 0.95 for f in best)
    assert f"for {c['n_best_is_same_depth_resolved']} of them it stays the best in at least 95% of the resamples" in report


# --- summary consistency ------------------------------------------------------------------------------


def test_summary_is_internally_consistent(full_run):
    root, plots = full_run
    summary_path, _ = report_run(root, plots)
    summary = json.loads(summary_path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["schema_version"] == 2
    results = RunResults.load(root)
    conv = summary["conventions"]
    for name, m in summary["models"].items():
        matrix = results.models[name].transfer
        s = m["transfer"]["relative_transfer"]
        M, R = matrix["relative_transfer"], matrix.replicates["relative_transfer"]
        off = [(i, j) for i in range(len(M)) for j in range(len(M)) if i != j and np.isfinite(M[i, j])]
        assert s["n_pairs"] == len(off) == sum(s["band_counts"].values())
        clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
        assert s["mean"]["value"] == pytest.approx(np.mean([clip(M[i, j]) for i, j in off]))
        for i, layer in enumerate(s["layers"]):  # universality and its interval, recomputed from the files
            row = next(r for r in m["layers"] if r["layer"] == layer)
            out = np.mean([clip(M[i, j]) for a, j in off if a == i])
            resampled = [np.mean([clip(R[r, i, j]) for a, j in off if a == i]) for r in range(len(R))]
            low, high = np.quantile(resampled, [0.025, 0.975])
            assert (row["universality"], row["universality_low"], row["universality_high"]) == \
                pytest.approx((out, low, high))
            expected = ("universal" if low >= conv["universal_at"] else "specialised" if high < conv["specialised_below"]
                        else "intermediate" if low >= conv["specialised_below"] and high < conv["universal_at"]
                        else "not resolved")
            assert row["verdict"] == expected
        for row in m["layers"]:
            ev = results.models[name].evals[row["hook"]]
            assert row["fvu"] == ev.reconstruction.fvu and row["delta_ce"] == ev.delta_ce
            assert row["mean_norm"] == results.models[name].capture.mean_norm[row["hook"]]
        gates = conv["quality_gates"]
        assert m["quality"]["failing"]["fvu"] == [r["layer"] for r in m["layers"] if r["fvu"] > gates["fvu"]]
    (c,) = summary["cross_model"]
    matrix = results.cross[0].matrix
    for row in c["by_depth"]:  # the same-depth target is the one of nearest relative depth
        s = matrix.index(row["source_layer"])
        gaps = [abs(t.relative_depth - matrix.sources[s].relative_depth) for t in matrix.targets]
        assert row["target_layer"] == matrix.targets[int(np.argmin(gaps))].layer
    same = c["depth_comparison"]["relative_transfer"]
    assert same["same_depth_mean"] == pytest.approx(np.mean([np.clip(r["relative_transfer"], 0, 1) for r in c["by_depth"]]))
    assert same["all_mean"] == pytest.approx(np.clip(matrix["relative_transfer"], 0, 1).mean())
    assert summary["stages_total_seconds"] == pytest.approx(12.5 + 300.25 + 2400.0)
    assert set(summary["definitions"]) >= {"universal", "hub", "break", "bounded_mean", "interval", "raw_ratio"}


def _hub_excess(M, layers):
    """An independent implementation of the hub excess: per signed distance, the median clipped entry."""
    C = np.clip(M, 0, 1)
    n = len(layers)
    by_offset = {}
    for i in range(n):
        for j in range(n):
            if i != j and np.isfinite(C[i, j]):
                by_offset.setdefault(layers[j] - layers[i], []).append(C[i, j])
    return [np.mean([C[i, j] - np.median(by_offset[layers[j] - layers[i]]) for j in range(n)
                     if j != i and np.isfinite(C[i, j])]) for i in range(n)]


def test_the_findings_are_re_derived_from_summary_json_and_the_matrices_alone(full_run):
    root, plots = full_run
    summary_path, report_path = report_run(root, plots)
    report = report_path.read_text()
    summary = json.loads(summary_path.read_text())
    for line in findings_markdown(summary):  # the sentences come from summary.json alone, read back from disk
        assert line in report
    for name, m in summary["models"].items():  # and summary.json's figures from the matrix files alone
        matrix = TransferMatrix.read(root / "transfer" / name)
        M, layers = matrix["relative_transfer"], [s.layer for s in matrix.sources]
        s = m["transfer"]["relative_transfer"]
        assert [e["value"] for e in s["hub_excess"]] == pytest.approx(_hub_excess(M, layers))
        C = np.clip(M, 0, 1)
        d = np.abs(np.subtract.outer(layers, layers))
        ok = np.isfinite(C) & (d > 0)
        assert s["decay_rate"]["value"] == pytest.approx(-np.polyfit(d[ok], C[ok], 1)[0])
        lows = np.quantile(matrix.replicates["relative_transfer"], 0.025, axis=0)
        strong = sum(lows[a, b] >= 0.7 and lows[b, a] >= 0.7 for a in range(len(M)) for b in range(a + 1, len(M)))
        assert len(s["bidirectional_pairs"]) == strong
        if s["hub_layers"]:
            h = s["hub_layers"][0]
            assert f"layer {h}: {fmt(s['hub_excess'][layers.index(h)]['value'])} [" in report


def test_a_partial_run_without_stages_or_matrices_still_reports(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    write_model(root, "toy-a", LAYERS, N_LAYERS, None, evals=False, train=False)
    write_run_json(root, ["toy-a", "not-captured-yet"], stages=False)
    summary_path, report_path = report_run(root)
    summary = json.loads(summary_path.read_text())
    assert summary["stages"] == {} and summary["cross_model"] == []
    assert summary["models"]["toy-a"]["transfer"] == {}
    assert summary["models"]["toy-a"]["layers"][0]["fvu"] is None
    report = report_path.read_text()
    assert "No layer-to-layer transfer matrix" in report and "| stage |" not in report
    assert "FVU" not in report.split("## Per-layer metrics")[1].split("## How to read")[0]  # empty columns dropped
    assert sorted(p.name for p in root.iterdir()) == ["activations", "report.md", "run.json", "summary.json"]


def test_write_report_and_build_summary_are_usable_on_their_own(tmp_path):
    root = make_run(tmp_path, hub_matrix())
    results = RunResults.load(root)
    summary = build_summary(results)
    json.dumps(summary, allow_nan=False)
    path = write_report(results, summary, {}, tmp_path / "elsewhere.md")
    assert path.read_text().startswith("# layerflow report")
    assert not math.isnan(summary["models"]["toy-a"]["transfer"]["relative_transfer"]["decay_rate"]["value"])


def test_saes_that_explain_nothing_are_flagged(tmp_path):
    root = make_run(tmp_path, hub_matrix())
    evals = json.loads((root / "saes" / "toy-a" / "evals.json").read_text())
    evals["sites"][2]["fvu"] = 1.7
    (root / "saes" / "toy-a" / "evals.json").write_text(json.dumps(evals))
    summary_path, report_path = report_run(root)
    assert json.loads(summary_path.read_text())["models"]["toy-a"]["unreliable_sae_layers"] == [4]
    assert "**Warning**: the SAEs of layer 4 explain none of their layer's variance (FVU >= 1, up to 1.7)" \
        in report_path.read_text()
    assert "**Warning**" not in report_run(make_run(tmp_path / "good", hub_matrix()))[1].read_text()


def test_cross_model_without_relative_transfer_falls_back_to_stitched_ev(full_run):
    root, plots = full_run
    folder = root / "transfer" / "toy-a~toy-b"
    matrix = TransferMatrix.read(folder)
    matrix.metrics["relative_transfer"][:] = np.nan  # every target SAE explains nothing
    matrix.write(folder)
    report = report_run(root, plots)[1].read_text()
    c = json.loads((root / "summary.json").read_text())["cross_model"][0]
    assert c["by_depth_metric"] == "stitched_explained_variance"
    assert "Relative transfer: not computed for any pair." in report
    assert "same-depth stitched EV ranges from" in report


def test_the_report_stage_is_not_listed_as_running_in_its_own_table(tmp_path):
    root = make_run(tmp_path, flat_matrix())
    run = json.loads((root / "run.json").read_text())
    run["stages"]["report"] = {"status": "running"}  # what the pipeline writes while the report is made
    (root / "run.json").write_text(json.dumps(run))
    report = report_run(root)[1].read_text()
    assert "| report | this report | - |" in report and "running" not in report
