"""Plots: every figure written as PNG + PDF at 300 dpi, band colours, NaN cells, figures skipped for missing inputs."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

from layerflow.evaluate import SiteEval
from layerflow.files import CaptureManifest
from layerflow.metrics import ReconstructionMetrics
from layerflow.models.sites import site_at as SiteId
from layerflow.report.plots import (BAND_EDGES, NOT_COMPUTED, UNDER, band_colormap, draw_band_heatmap, make_plots,
                             transfer_heatmap, universality_bars)
from layerflow.results import CrossModelResults, ModelResults, RunResults
from layerflow.transfer import TransferMatrix, band

pytestmark = [pytest.mark.filterwarnings("error"),  # e.g. no "mean of empty slice" on NaN rows
              pytest.mark.filterwarnings("ignore:The 'utils' module has been deprecated")]  # transformer_lens


def _hook(layer):
    return f"blocks.{layer}.hook_resid_post"


def _sites(model, layers, n_layers):
    return [SiteId(model, _hook(layer), layer, n_layers) for layer in layers]


def _decaying(n, rate=0.15):
    d = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    return 1.0 - rate * d  # 1 on the diagonal, negative far away


def _within(model, layers, n_layers, **metrics):
    sites = _sites(model, layers, n_layers)
    return TransferMatrix("within_model", sites, sites, metrics)


def _model(name, layers, n_layers, transfer=True, evals=True, delta_ce=None):
    sites = [{"layer": layer, "kind": "resid_post", "hook_name": _hook(layer), "d": 8} for layer in layers]
    capture = CaptureManifest(
        schema_version=1, layerflow_version="test", model={"name": name, "n_layers": n_layers}, sites=sites,
        layers=list(layers), d_model=8, dtype="float32", context_size=16, prepend_bos=True, bos_token_id=0,
        special_token_ids=[0], text_source={}, split={}, n_tokens=0, shards=[],
        mean_norm={_hook(layer): 10.0 * 1.2 ** layer for layer in layers}, seconds=0.0)
    result = ModelResults(name, n_layers, capture)
    if transfer:
        n = len(layers)
        result.transfer = _within(name, layers, n_layers, relative_transfer=_decaying(n),
                                  transfer_recon_ratio=np.exp(np.subtract.outer(np.arange(n), np.arange(n))))
    if evals:
        result.evals = {_hook(layer): SiteEval(_hook(layer), ReconstructionMetrics(
            n_tokens=100, fvu=0.1 + 0.01 * layer, explained_variance=0.9 - 0.01 * layer, mse=1.0, variance=10.0,
            l0=32.0, dead_fraction=0.2, dense_fraction=0.0, l2_ratio=0.95, relative_reconstruction_bias=1.0),
            delta_ce=delta_ce) for layer in layers}
    return result


def _cross(a, b):
    sources, targets = _sites(a.name, a.capture.layers, a.n_layers), _sites(b.name, b.capture.layers, b.n_layers)
    rng = np.random.default_rng(0)
    shape = (len(sources), len(targets))
    matrix = TransferMatrix("cross_model", sources, targets,
                            {"relative_transfer": rng.uniform(-0.2, 1.0, shape), "cka": rng.uniform(0, 1, shape)})
    return CrossModelResults(a.name, b.name, matrix, {})


def _run(tmp_path, models, cross=()):
    return RunResults(tmp_path, {"config": {"models": [m.name for m in models]}}, {m.name: m for m in models}, list(cross))


def _check_files(paths, folder):
    png, pdf = paths
    assert (png.suffix, pdf.suffix) == (".png", ".pdf") and png.parent == pdf.parent == folder
    assert pdf.read_bytes()[:5] == b"%PDF-"
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.5)
        assert min(image.size) > 900  # at least ~3 inches at 300 dpi


def test_make_plots_writes_every_figure_as_png_and_pdf_at_300_dpi(tmp_path):
    a, b = _model("alpha", range(8), 8, delta_ce=0.05), _model("beta", [0, 3, 6, 9, 11], 12)
    folder = tmp_path / "plots"
    out = make_plots(_run(tmp_path, [a, b], [_cross(a, b)]), folder)
    assert set(out) == {"transfer_heatmap:alpha", "transfer_heatmap:beta", "universality:alpha", "universality:beta",
                        "distance_decay", "cross_model:alpha~beta", "sae_quality", "activation_norms",
                        "raw_vs_scale_aware:alpha", "raw_vs_scale_aware:beta"}
    for plot_id, paths in out.items():
        _check_files(paths, folder)
        kind, _, name = plot_id.partition(":")
        stem = f"{kind}-{name}" if name else kind
        assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for ps in out.values() for p in ps)  # no temp files


def test_make_plots_skips_figures_whose_inputs_are_missing(tmp_path):
    bare = _model("bare", range(4), 4, transfer=False, evals=False)
    assert set(make_plots(_run(tmp_path, [bare]), tmp_path / "a")) == {"activation_norms"}

    no_raw = _model("noraw", range(4), 4)
    no_raw.transfer = _within("noraw", range(4), 4, relative_transfer=_decaying(4))
    one_site = _model("one", [5], 10)  # a 1 x 1 matrix has no layer summaries
    nothing, ev_only = _cross(no_raw, one_site), _cross(one_site, no_raw)
    for cross in (nothing, ev_only):  # no target SAE with EV > 0: relative transfer all NaN
        cross.matrix.metrics["relative_transfer"][:] = np.nan
        cross.matrix.metrics["cka"][:] = np.nan
    ev_only.matrix.metrics["stitched_explained_variance"] = np.full(ev_only.matrix["cka"].shape, 0.3)
    out = make_plots(_run(tmp_path, [no_raw, one_site], [nothing, ev_only]), tmp_path / "b")
    assert set(out) == {"transfer_heatmap:noraw", "universality:noraw", "distance_decay", "sae_quality",
                        "activation_norms", "cross_model:one~noraw"}  # stitched EV stands in for relative transfer


def test_make_plots_reads_a_run_directory_with_captures_and_a_cross_model_matrix_only(tmp_path):
    a, b = _model("alpha", [0, 2, 4], 5, transfer=False, evals=False), _model("beta", [0, 1, 3], 4)
    for m in (a, b):
        (tmp_path / "activations" / m.name).mkdir(parents=True)
        (tmp_path / "activations" / m.name / "capture.json").write_text(m.capture.to_json())
    cross = _cross(a, b)
    cross.matrix.write(tmp_path / "transfer" / "alpha~beta")
    (tmp_path / "transfer" / "alpha~beta" / "depth_comparison.json").write_text("{}")
    (tmp_path / "run.json").write_text(json.dumps({"config": {"models": [{"name": "alpha"}, {"name": "beta"}]}}))

    out = make_plots(RunResults.load(tmp_path), tmp_path / "plots")
    assert set(out) == {"activation_norms", "cross_model:alpha~beta"}  # no evals, no within-model matrices
    for paths in out.values():
        _check_files(paths, tmp_path / "plots")


def test_band_colours_follow_the_notes_bands():
    cmap, norm = band_colormap()
    colour = lambda v: colors.to_hex(cmap(norm(v)))  # noqa: E731
    assert {band(v) for v in (0.9, 0.95, 1.0, 1.0004)} == {"HIGH"}
    assert len({colour(v) for v in (0.9, 0.95, 1.0, 1.0004)}) == 1  # the diagonal's 1 +- rounding shares HIGH's colour
    assert colour(0.95) != colour(0.89) != colour(0.6) != colour(0.59) != colour(0.4) != colour(0.39)
    for lower in (0.4, 0.6, 0.9):  # every band limit is a bin limit
        assert lower in BAND_EDGES and colour(lower - 1e-6) != colour(lower)
    assert colour(-2.0) == colour(-1e-6) == colors.to_hex(UNDER)
    assert colors.to_hex(cmap(np.ma.masked_invalid([np.nan]))[0]) == colors.to_hex(NOT_COMPUTED)
    # The band goes from red (specialised) to blue (high).
    high, specialised = cmap(norm(0.95)), cmap(norm(0.2))
    assert high[2] > high[0] and specialised[0] > specialised[2]


def test_rendered_cells_take_their_band_colour_and_nan_is_grey():
    values = np.array([[1.0, 0.95, 0.2], [np.nan, 1.0, 0.5], [-3.0, 0.7, 1.0]])
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    mesh = draw_band_heatmap(ax, values)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    cmap, norm = band_colormap()

    def pixel(i, j):  # off the cell centre, clear of the annotation
        x, y = ax.transData.transform((j + 0.35, i + 0.35))
        return pixels[int(round(pixels.shape[0] - y)), int(round(x))]

    for (i, j), expected in {(0, 1): cmap(norm(0.95)), (0, 2): cmap(norm(0.2)), (1, 2): cmap(norm(0.5)),
                             (2, 0): colors.to_rgba(UNDER), (1, 0): colors.to_rgba(NOT_COMPUTED)}.items():
        np.testing.assert_allclose(pixel(i, j), np.array(expected[:3]) * 255, atol=3)
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.95", "0.20", "n/a", "1.00", "0.50", "-3.00", "0.70", "1.00"]
    assert mesh.norm.boundaries.tolist() == list(BAND_EDGES)
    plt.close(fig)

    fig, ax = plt.subplots()
    draw_band_heatmap(ax, _decaying(13))  # too many sites to annotate
    assert not ax.texts
    plt.close(fig)


def test_nan_rows_and_columns_are_drawn(tmp_path):
    values = _decaying(5)
    values[2, :] = np.nan  # a source never computed
    values[:, 4] = np.nan
    matrix = _within("holes", range(5), 5, relative_transfer=values)
    for paths in (transfer_heatmap(matrix, tmp_path / "heat"), universality_bars(matrix, tmp_path / "uni")):
        _check_files(paths, tmp_path)
    assert math.isnan(matrix["relative_transfer"][2, 0])  # the input is left as it was
    assert not plt.get_fignums()  # every figure closed


def test_cells_whose_interval_straddles_a_band_edge_are_unresolved():
    from layerflow.report.plots import unresolved_bands

    low = np.array([[0.35, 0.41, 0.55], [0.62, 0.85, -0.2]])
    high = np.array([[0.45, 0.59, 0.61], [0.89, 0.95, 0.39]])
    # 0.4 inside [0.35, 0.45]; [0.41, 0.59] inside LOW; 0.6 inside [0.55, 0.61]; [0.62, 0.89] inside MODERATE;
    # 0.9 inside [0.85, 0.95]; [-0.2, 0.39] inside SPECIALISED
    assert unresolved_bands(low, high).tolist() == [[True, False, True], [False, True, False]]
