"""Figures of a layerflow run, drawn from `RunResults` alone (matplotlib, Agg; PNG and PDF at 300 dpi).

- transfer_heatmap-<model>: the within-model `relative_transfer` matrix (EV of SAE_i on layer j /
  EV of SAE_j on j; source layer i down, target layer j across). Colours are binned on the notes'
  bands (HIGH >= 0.9, MODERATE 0.6-0.9, LOW 0.4-0.6, SPECIALISED < 0.4, `transfer.summary.BANDS`), outlined
  on the colour bar; values below 0 or above 1.1 get the two end colours, grey = not computed.
- universality-<model>: per layer, mean relative transfer (clipped to [0, 1]) to the other layers
  (outgoing, the notes' universality score) and from them (incoming), each with its 95% bootstrap
  interval as an error bar; hub layers (`transfer.summary.summarize`: better than their distances
  predict, interval clear of the fitted decay) starred.
- distance_decay: mean relative transfer (clipped to [0, 1]) against layer distance |i - j| with
  its 95% bootstrap interval as a band, one curve per model; in relative distance (layers /
  (n_layers - 1)) when the models' depths differ.
- cross_model-<a>~<b>: a cross-model matrix (model A's SAEs stitched onto model B's sites), both
  axes in relative depth, relative transfer (stitched EV where no target SAE has EV > 0) and linear
  CKA; the dashed line is equal depth and the outlined cells are each source's same-depth target
  (`transfer.cross_model.same_depth_pairs`).
- sae_quality: each SAE on its own layer's held-out activations (FVU, L0, dead fraction, delta CE)
  against relative depth, one line per model.
- activation_norms: mean ||x|| per site against relative depth (log scale). The residual norm grows
  many-fold with depth, which is why raw-MSE ratios mislead.
- layer_comparison (`layerflow compare`, not part of a run's plots): a training run's SAEs or
  transcoders at chosen layers: held-out FVU by Matryoshka prefix, training curves, firing-frequency
  histograms, and FVU / dead / dense / delta CE / KL side by side.
- raw_vs_scale_aware-<model>: the notes' raw `transfer_recon_ratio` next to `relative_transfer`, and
  both universality profiles beside the mean activation norm, so the reader sees that the raw
  ratio follows norm growth. The raw ratio gets no bands and no hubs: it is shown only to explain
  why it misleads.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors  # noqa: E402

from layerflow.models.sites import Site
from layerflow.report.compare import LayerComparison, log_frequency
from layerflow.results import CrossModelResults, ModelResults, RunResults
from layerflow.transfer.cross_model import compare_same_depth, same_depth_pairs
from layerflow.transfer.matrix import TransferMatrix, metric_docs
from layerflow.transfer.references import References
from layerflow.transfer.summary import BANDS, Estimate, summarize_matrix

DPI = 300
ANNOTATE_MAX = 12  # annotate cells with their values up to this many sites per side
BAND_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1)  # the top bin takes the diagonal's 1 +- rounding
UNDER, OVER, NOT_COMPUTED = "#3f0012", "#0b0b3b", "#b0b0b0"
RELATIVE_TRANSFER = "relative transfer (higher = better; 1 = the target's own SAE)"
# PNG zlib level 3 (PIL's default is 6): about 20% less plotting time, files about 30% larger.
SAVE_OPTIONS = {".png": {"pil_kwargs": {"compress_level": 3}}, ".pdf": {}}
MODEL_STYLES = [dict(color=c, marker=m, ms=3.5) for c, m in zip(plt.get_cmap("tab10").colors, "osD^v<>phX")]


def band_colormap() -> tuple[colors.Colormap, colors.Normalize]:
    """Colour map and norm of relative transfer: RdYlBu binned on BAND_EDGES (band limits are bin limits)."""
    n = len(BAND_EDGES) - 1
    cmap = colors.ListedColormap(plt.get_cmap("RdYlBu")(np.linspace(0.02, 0.98, n)), name="layerflow_bands")
    return cmap.with_extremes(under=UNDER, over=OVER, bad=NOT_COMPUTED), colors.BoundaryNorm(BAND_EDGES, n)


def _save(fig: plt.Figure, stem: Path) -> list[Path]:
    """`<stem>.png` and `<stem>.pdf`, each written to a hidden temporary name and renamed; closes the figure."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in ("png", "pdf")]
    try:
        for path in paths:
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                fig.savefig(tmp, format=path.suffix[1:], dpi=DPI, bbox_inches="tight", **SAVE_OPTIONS[path.suffix])
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)
    return paths


def _labels(sites: Sequence[Site]) -> list[str]:
    """Layer numbers, with the site kind when one layer has several sites."""
    layers = [s.layer for s in sites]
    return [f"{s.layer} {s.kind}" if layers.count(s.layer) > 1 else str(s.layer) for s in sites]


def _edges(centres: Sequence[float]) -> np.ndarray:
    """Cell edges halfway between sorted centres, half a gap beyond each end."""
    c = np.asarray(centres, dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _annotate(ax: plt.Axes, values: np.ndarray, xs: Sequence[float], ys: Sequence[float], mesh: Any) -> None:
    rgba = mesh.to_rgba(np.ma.masked_invalid(values))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            v = values[i, j]
            dark = np.dot(rgba[i, j, :3], (0.299, 0.587, 0.114)) < 0.5
            ax.text(x, y, "n/a" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=6.5 if len(xs) > 8 else 8, color="white" if dark else "black")


def _band_colorbar(fig: plt.Figure, mesh: Any, ax: Any, label: str) -> Any:
    cbar = fig.colorbar(mesh, ax=ax, extend="both", ticks=BAND_EDGES, fraction=0.05, pad=0.06)
    cbar.set_label(label)
    cbar.ax.tick_params(labelsize=7)
    bounds = [lower for lower, _ in BANDS if math.isfinite(lower)]
    for v in bounds:
        cbar.ax.axhline(v, color="black", lw=1.6)
    for (lower, name), upper in zip(BANDS, [BAND_EDGES[-1], *bounds]):
        cbar.ax.text(-0.45, (max(lower, BAND_EDGES[0]) + upper) / 2, name, rotation=90, ha="center", va="center",
                     fontsize=7.5, fontweight="bold", transform=cbar.ax.get_yaxis_transform())
    return cbar


def draw_band_heatmap(ax: plt.Axes, values: np.ndarray, xs: Sequence[float] | None = None,
                      ys: Sequence[float] | None = None, annotate: bool | None = None) -> Any:
    """Draw values [n_y, n_x] in the band colours at cell centres xs, ys (default 0..n-1); y grows downward."""
    xs = np.arange(values.shape[1]) if xs is None else np.asarray(xs, dtype=float)
    ys = np.arange(values.shape[0]) if ys is None else np.asarray(ys, dtype=float)
    cmap, norm = band_colormap()
    mesh = ax.pcolormesh(_edges(xs), _edges(ys), np.ma.masked_invalid(values), cmap=cmap, norm=norm)
    ax.set_xlim(_edges(xs)[[0, -1]])
    ax.set_ylim(_edges(ys)[[-1, 0]])
    if annotate or (annotate is None and max(values.shape) <= ANNOTATE_MAX):
        _annotate(ax, values, xs, ys, mesh)
    return mesh


def _layer_axes(ax: plt.Axes, matrix: TransferMatrix) -> None:
    n = max(len(matrix.sources), len(matrix.targets))
    size = 7 if n <= 20 else 5.5
    ax.set_xticks(range(len(matrix.targets)), _labels(matrix.targets), fontsize=size, rotation=90 if n > 20 else 0)
    ax.set_yticks(range(len(matrix.sources)), _labels(matrix.sources), fontsize=size)
    ax.set_xlabel("target layer j (SAE applied here)")
    ax.set_ylabel("source layer i (SAE trained here)")


def _footnote(ax: plt.Axes, text: str, below: float = 52) -> None:
    """Small print `below` points under the axes, wrapped to about its width (7 pt: ~18 characters per inch)."""
    width = int(18 * ax.get_position().width * ax.figure.get_figwidth())
    ax.annotate(textwrap.fill(text, max(60, width)), (0, 0), xycoords="axes fraction", xytext=(0, -below),
                textcoords="offset points", fontsize=7, va="top")


def _clip_note(values: np.ndarray, relative: bool = True) -> str:
    v = values[np.isfinite(values)]
    meaning = " (worse than predicting the target's mean)" if relative else ""
    note = f"Colours clipped: values < {BAND_EDGES[0]:g}{meaning} and > {BAND_EDGES[-1]:g} take the end colours"
    if v.size:
        note += f" (values span {v.min():.2f} to {v.max():.2f})"
    return note + "; grey = not computed."


def _unreliable(matrix: TransferMatrix) -> tuple[list[int], str]:
    """Targets whose own SAE explains no variance (EV <= 0): relative transfer divides by that EV, so means nothing."""
    if "explained_variance" not in matrix.metrics or matrix.sources != matrix.targets:
        return [], ""
    bad = [j for j, ev in enumerate(np.diag(matrix["explained_variance"])) if ev <= 0]
    if not bad:
        return [], ""
    layers = ", ".join(_labels([matrix.targets[j] for j in bad]))
    return bad, (f" Caution: the own SAE of target layers {layers} has EV <= 0 (FVU >= 1), so relative transfer "
                 "onto them is meaningless.")


def _hatch_unreliable(ax: plt.Axes, matrix: TransferMatrix) -> str:
    bad, note = _unreliable(matrix)
    for j in bad:
        ax.add_patch(plt.Rectangle((j - 0.5, -0.5), 1, len(matrix.sources), fill=False, hatch="//", lw=0,
                                   ec=(0, 0, 0, 0.55)))
    return note.replace("Caution:", "Hatched columns:")


def transfer_heatmap(matrix: TransferMatrix, stem: Path, metric: str = "relative_transfer") -> list[Path]:
    """One model's transfer matrix in the band colours (figure 1)."""
    values, n = matrix[metric], max(len(matrix.sources), len(matrix.targets))
    side = max(5.0, min(10.0, 0.28 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.6, side))
    mesh = draw_band_heatmap(ax, values)
    _layer_axes(ax, matrix)
    rel = metric == "relative_transfer"
    cbar = _band_colorbar(fig, mesh, ax, RELATIVE_TRANSFER if rel else f"{metric} (coloured on the notes' bands)")
    scale = _mark_references(cbar, matrix, metric)
    doc = "EV of SAE_i on layer j (mean and spread matched) / EV of SAE_j on layer j" if rel else metric_docs(matrix.kind)[metric]
    ax.set_title(f"{matrix.sources[0].model}: {metric.replace('_', ' ')}\n" + textwrap.fill(doc, 90), fontsize=10)
    unresolved = _hatch_unresolved(ax, matrix, metric) if rel else ""
    _footnote(ax, _clip_note(values, rel) + (_hatch_unreliable(ax, matrix) if rel else "") + unresolved + scale)
    return _save(fig, stem)


def unresolved_bands(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """True where an interval [low, high] holds a band edge of the notes' bands: its band is not resolved."""
    edges = [lower for lower, _ in BANDS if math.isfinite(lower)]
    return np.logical_or.reduce([(low < e) & (e <= high) for e in edges])


def _hatch_unresolved(ax: plt.Axes, matrix: TransferMatrix, metric: str) -> str:
    """Dots over the cells whose interval straddles a band edge; the footnote's words for them."""
    if metric not in matrix.intervals:
        return ""
    off_diagonal = ~np.eye(len(matrix.sources), len(matrix.targets), dtype=bool)
    mask = unresolved_bands(*matrix.intervals[metric]) & off_diagonal
    for i, j in zip(*np.nonzero(mask)):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="...", lw=0, ec=(0, 0, 0, 0.5)))
    level = matrix.settings.get("intervals", "the interval").split(",")[0]
    return (f" Dotted cells ({int(mask.sum())} of {int(off_diagonal.sum())}): the {level} interval straddles a band "
            "edge, so the band is not resolved.")


def _mark_references(cbar: Any, matrix: TransferMatrix, metric: str) -> str:
    """Floor and ceiling (means over the sites measured) drawn on the colour bar; the footnote's words for them."""
    if not matrix.references:
        return ""
    refs, words = References.from_dict(matrix.references), []
    for kind, style in (("floor", "--"), ("ceiling", "-.")):
        value, n = refs.summary(kind, metric)
        if math.isfinite(value):
            cbar.ax.axhline(min(max(value, BAND_EDGES[0]), BAND_EDGES[-1]), color="magenta", lw=2, ls=style)
            words.append(f"{kind} {value:.2f} ({n} site{'s' if n > 1 else ''})")
    if not words:
        return ""
    return (" Magenta on the colour bar: " + ", ".join(words) + ". Floor: each dictionary rotated inside its "
            "layer's principal subspace (no shared features); ceiling: a second SAE trained with another seed.")


def _error_bars(estimates: Sequence[Estimate]) -> np.ndarray | None:
    """matplotlib's yerr ([2, n]: below, above) of estimates' intervals; None when none has one."""
    values = np.array([(e.value, e.low, e.high) for e in estimates], dtype=np.float64)
    if not np.isfinite(values[:, 1:]).any():
        return None
    return np.nan_to_num(np.stack([values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]]).clip(min=0))


def universality_bars(matrix: TransferMatrix, stem: Path, metric: str = "relative_transfer") -> list[Path]:
    """Outgoing and incoming universality per layer with their intervals, hubs starred (figure 2)."""
    s, n = summarize_matrix(matrix, metric), len(matrix.sources)
    x = np.arange(n)
    out, into = [e.value for e in s.universality], [e.value for e in s.universality_incoming]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n + 2.5), 4.2))
    bars = dict(capsize=1.5, error_kw={"lw": 0.7, "ecolor": "black"})
    ax.bar(x - 0.2, out, 0.4, yerr=_error_bars(s.universality), label="outgoing: SAE of this layer on the other layers",
           color="#2166ac", **bars)
    ax.bar(x + 0.2, into, 0.4, yerr=_error_bars(s.universality_incoming),
           label="incoming: other layers' SAEs on this layer", color="#f4a582", **bars)
    ax.axhline(0, color="black", lw=0.8)
    for lower, name in BANDS[:-1]:
        ax.axhline(lower, color="grey", lw=0.7, ls=":")
        ax.text(1.005, lower, f"{name} ≥ {lower:g}", transform=ax.get_yaxis_transform(), fontsize=7, va="center",
                color="dimgrey")
    top = np.nanmax([*out, *into, 0.0])
    if matrix.references:
        refs = References.from_dict(matrix.references)
        for kind, style in (("floor", "--"), ("ceiling", "-.")):
            values = [refs.at(kind, metric, site.hook_name) for site in matrix.sources]
            ys = np.array([v for v, _ in values])
            if np.isfinite(ys).any():
                measured = [v for v, interpolated in values if not interpolated]
                how = "" if len(measured) == len(values) else f", measured at {len(measured)} layers, interpolated between (flat beyond)"
                ax.plot(x, ys, style, color="magenta", lw=1.4, label=f"{kind}{how}")
                top = max(top, float(np.nanmax(ys)))
    for hub in s.hub_layers:
        ax.plot(s.layers.index(hub) - 0.2, top * 1.08 + 0.02, "*", color="gold", mec="black", ms=12)
    ax.set_xticks(x, _labels(matrix.sources), fontsize=7 if n <= 20 else 6)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean {metric.replace('_', ' ')} (clipped to [0, 1])\nover the other layers (higher = better)")
    hubs = f"hub layers (starred): {', '.join(map(str, s.hub_layers))}" if s.hub_layers else "no hub layer"
    bars = f"error bars: {s.level:.0%} bootstrap intervals" if s.n_replicates else "no intervals (no resamples)"
    ax.set_title(f"{matrix.sources[0].model}: layer universality of {metric.replace('_', ' ')}; {bars}\n{hubs} "
                 "(a hub transfers better than its distances predict, interval clear of the fitted decay)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if matrix.references:
        _footnote(ax, "Floor: the layer's own SAE rotated inside the layer's principal subspace, scored on the layer "
                      "(no shared features). Ceiling: a second SAE trained on the same layer with another seed.",
                  below=76)
    if metric == "relative_transfer" and _unreliable(matrix)[0]:
        _footnote(ax, _unreliable(matrix)[1].strip(), below=64)
    return _save(fig, stem)


def distance_decay(models: Sequence[ModelResults], stem: Path, metric: str = "relative_transfer") -> list[Path]:
    """Mean +- std of the metric against layer distance, one curve per model's within-model matrix (figure 3)."""
    matrices = [m.transfer for m in models]
    relative = len({t.sources[0].n_layers for t in matrices}) > 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, t in enumerate(matrices):
        s, scale = summarize_matrix(t, metric), (t.sources[0].n_layers - 1 if relative else 1)
        d = np.array([p.distance for p in s.distance_decay]) / scale
        mean, low, high = (np.array([getattr(p.mean, f) for p in s.distance_decay]) for f in ("value", "low", "high"))
        style = MODEL_STYLES[k % 10]
        caution = "; own-SAE EV <= 0 at some targets" if _unreliable(t)[0] else ""
        ax.plot(d, mean, "-", **style, label=f"{t.sources[0].model} ({t.sources[0].n_layers} layers{caution})")
        ax.fill_between(d, low, high, color=style["color"], alpha=0.25, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    for lower, _ in BANDS[:-1]:
        ax.axhline(lower, color="grey", lw=0.7, ls=":")
    ax.set_xlabel("relative layer distance |i - j| / (n_layers - 1)" if relative else "layer distance |i - j|")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (clipped to [0, 1]; higher = better)")
    ax.set_title(f"Distance decay of {metric.replace('_', ' ')}: mean over pairs, shaded = 95% bootstrap interval\n"
                 "(dotted: band limits 0.4 / 0.6 / 0.9)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return _save(fig, stem)


def _depth_ticks(ax: plt.Axes, sites: Sequence[Site], axis: str) -> None:
    stride = max(1, math.ceil(len(sites) / 12))
    shown = sites[::stride]
    ticks, labels = [s.relative_depth for s in shown], [f"{s.relative_depth:.2f}\nL{s.layer}" for s in shown]
    if axis == "x":
        ax.set_xticks(ticks, labels, fontsize=6.5)
    else:
        ax.set_yticks(ticks, [lab.replace("\n", " ") for lab in labels], fontsize=6.5)


CROSS_LABELS = {"stitched_explained_variance": "stitched EV of SAE_A on x_B (higher = better; < 0 clipped)",
                "cka": "linear CKA of the two SAEs' latents (higher = more similar)"}


def _cross_panels(m: TransferMatrix) -> list[str]:
    """Relative transfer, or stitched EV where relative transfer is all NaN (every target SAE's EV <= 0); CKA."""
    computed = [p for p in ("relative_transfer", "stitched_explained_variance", "cka")
                if p in m.metrics and np.isfinite(m[p]).any()]
    return [p for p in computed if not (p == "stitched_explained_variance" and "relative_transfer" in computed)]


def cross_model_heatmap(cross: CrossModelResults, stem: Path) -> list[Path]:
    """A cross-model matrix in relative depth: relative transfer (or stitched EV) and linear CKA (figure 4)."""
    m, panels = cross.matrix, _cross_panels(cross.matrix)
    xs, ys = [t.relative_depth for t in m.targets], [s.relative_depth for s in m.sources]
    ex, ey = _edges(xs), _edges(ys)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 5.6), squeeze=False,
                             gridspec_kw={"wspace": 0.5})
    for ax, metric in zip(axes[0], panels):
        if metric == "relative_transfer":
            mesh = draw_band_heatmap(ax, m[metric], xs, ys)
            _band_colorbar(fig, mesh, ax, RELATIVE_TRANSFER)
        else:
            cmap = plt.get_cmap("viridis").with_extremes(under=UNDER, bad=NOT_COMPUTED)
            mesh = ax.pcolormesh(ex, ey, np.ma.masked_invalid(m[metric]), cmap=cmap, vmin=0, vmax=1)
            ax.set_ylim(ey[-1], ey[0])
            if max(m[metric].shape) <= ANNOTATE_MAX:
                _annotate(ax, m[metric], xs, ys, mesh)
            extend = "neither" if metric == "cka" else "min"  # linear CKA lies in [0, 1]
            fig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.03, extend=extend).set_label(CROSS_LABELS[metric])
        for i, j in same_depth_pairs(m):
            ax.add_patch(plt.Rectangle((ex[j], ey[i]), ex[j + 1] - ex[j], ey[i + 1] - ey[i], fill=False, lw=1.6))
        ax.plot([0, 1], [0, 1], "--", color="black", lw=1, label="equal relative depth")
        _depth_ticks(ax, m.targets, "x")
        _depth_ticks(ax, m.sources, "y")
        ax.set_xlabel(f"{cross.model_b} (target) relative depth, layer / (n_layers - 1)")
        ax.set_ylabel(f"{cross.model_a} (source SAE) relative depth")
        c = compare_same_depth(m, metric)
        ax.set_title(f"{metric.replace('_', ' ')}: same-depth mean {c.same_depth_mean:.2f} "
                     f"(outlined), all pairs {c.all_mean:.2f}", fontsize=9)
    fig.suptitle(f"{cross.model_a} SAEs on {cross.model_b} sites through an affine stitch (held-out words); "
                 "dashed: equal relative depth", fontsize=11)
    if panels[0] == "relative_transfer":
        _footnote(axes[0, 0], "Relative transfer: " + _clip_note(m["relative_transfer"]))
    elif panels[0] == "stitched_explained_variance":
        _footnote(axes[0, 0], "Relative transfer (stitched EV / the target SAE's EV) was not computed for any pair: "
                  "every target SAE has EV <= 0, so stitched EV is shown instead. Values < 0 take the darkest colour.")
    return _save(fig, stem)


def _depth(model: ModelResults, hook: str) -> float:
    return model.layer_of(hook) / max(model.n_layers - 1, 1)


QUALITY = (("FVU (lower = better; 1 = no better than the mean): held-out, and out-of-domain (dashed)",
             lambda e: e.reconstruction.fvu),
           ("L0: active latents per token", lambda e: e.reconstruction.l0),
           ("dead fraction of latents (lower = better)", lambda e: e.reconstruction.dead_fraction),
           ("delta CE, nats (spliced - clean; lower = better)", lambda e: e.delta_ce))


def sae_quality(models: Sequence[ModelResults], stem: Path) -> list[Path]:
    """Held-out FVU, L0, dead fraction and delta CE of each SAE against relative depth (figure 5)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (label, get) in zip(axes.flat, QUALITY):
        drawn = []
        for k, m in enumerate(models):
            points = sorted((_depth(m, h), get(e)) for h, e in m.evals.items() if get(e) is not None)
            if points:
                ax.plot(*zip(*points), "-", **MODEL_STYLES[k % 10], label=m.name)
                drawn += [v for _, v in points]
        if not drawn:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif label.startswith("FVU"):
            for k, m in enumerate(models):  # out of domain, dashed, with its interval
                points = sorted((_depth(m, h), e.ood_fvu, e.ood_fvu_low, e.ood_fvu_high) for h, e in m.evals.items()
                                if e.ood_fvu is not None)
                if points:
                    x, y, lo, hi = map(np.array, zip(*points))
                    ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="--", color=MODEL_STYLES[k % 10].get("color"),
                                lw=1, capsize=2, alpha=0.8, label=f"{m.name}: out-of-domain text (95% interval)")
                    drawn += list(hi)
            low, high = min(drawn), max(drawn)
            if high > 0.8:  # FVU 1 = no better than predicting the mean; drawn when the data come near it
                ax.axhline(1, color="grey", ls=":", lw=1)
            if low > 0 and high / low > 30:
                ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("relative depth, layer / (n_layers - 1)")
    fig.suptitle("SAE quality by depth: each SAE on its own layer's held-out activations", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    return _save(fig, stem)


def layer_comparison(comparison: LayerComparison, stem: Path) -> list[Path]:
    """A training run's dictionaries at a few layers side by side (`compare.compare_layers`): FVU by
    Matryoshka prefix, training FVU, held-out firing-frequency histograms, and the headline figures."""
    sites = comparison.sites
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    label = {s.hook_name: f"layer {s.layer} ({s.hook_name.split('.', 2)[-1]} -> {s.target.split('.', 2)[-1]})"
             if s.evals.hook_name_out else f"layer {s.layer} ({s.hook_name.split('.', 2)[-1]})" for s in sites}
    style = {s.hook_name: MODEL_STYLES[k % 10] for k, s in enumerate(sites)}

    ax = axes[0, 0]
    for s in sites:
        widths = s.evals.prefix_widths or [s.d_sae]
        fvus = s.evals.prefix_fvu or [s.evals.reconstruction.fvu]
        ax.plot(widths, fvus, "-", **style[s.hook_name], label=label[s.hook_name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latents used (nested prefix of the dictionary)")
    ax.set_title("held-out FVU by prefix, coarse to fine (lower = better)", fontsize=9)

    ax = axes[0, 1]
    for s in sites:
        key = "fvu" if "fvu" in s.curves else "loss"
        values = np.asarray(s.curves.get(key, []), dtype=float)
        if len(values):
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window, smooth, "-", color=style[s.hook_name]["color"], lw=1.2)
    if ax.lines and max(max(l.get_ydata()) for l in ax.lines) > 10 * min(min(l.get_ydata()) for l in ax.lines):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title("training FVU per batch (transcoders) or loss (SAEs), running mean", fontsize=9)

    ax = axes[1, 0]
    floor = 1e-7
    for s in sites:
        if s.evals.frequency is not None:
            values = log_frequency(s.evals.frequency, floor).numpy()
            ax.hist(values, bins=np.linspace(math.log10(floor), 0, 36), histtype="step", lw=1.4,
                    color=style[s.hook_name]["color"])
    ax.axvline(math.log10(0.10), color="grey", ls=":", lw=1)  # metrics.DENSE_THRESHOLD
    ax.set_xlabel(f"log10 held-out firing rate (dead latents at {math.log10(floor):.0f}; dotted: dense above 10%)")
    ax.set_ylabel("latents")
    ax.set_title("feature frequency histogram", fontsize=9)

    ax = axes[1, 1]
    metrics = [("FVU", lambda e: e.reconstruction.fvu), ("dead", lambda e: e.reconstruction.dead_fraction),
               ("dense", lambda e: e.reconstruction.dense_fraction), ("dCE nats", lambda e: e.delta_ce),
               ("KL", lambda e: e.kl_div)]
    width = 0.8 / max(len(sites), 1)
    for k, s in enumerate(sites):
        values = [get(s.evals) for _, get in metrics]
        xs = np.arange(len(metrics)) + (k - (len(sites) - 1) / 2) * width
        bars = ax.bar(xs, [np.nan if v is None else v for v in values], width, color=style[s.hook_name]["color"])
        ax.bar_label(bars, labels=["-" if v is None else f"{v:.2g}" for v in values], fontsize=6, padding=1,
                     rotation=90 if len(sites) > 1 else 0)
    ax.set_xticks(np.arange(len(metrics)), [name for name, _ in metrics])
    ax.margins(y=0.15)
    l0s = ", ".join(f"layer {s.layer}: {s.evals.reconstruction.l0:.1f}" for s in sites if s.evals.reconstruction.l0 is not None)
    ax.set_title(f"held-out figures (lower = better)\nL0 (active latents per token) {l0s}", fontsize=9)
    for a in axes.flat:
        a.grid(alpha=0.3)
    what = "transcoders" if any(s.evals.hook_name_out for s in sites) else "SAEs"
    fig.suptitle(f"{comparison.model}: {what} compared across layers ({sites[0].architecture if sites else ''})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.955),
               ncol=min(len(sites), 6), fontsize=8, frameon=False)
    return _save(fig, stem)


def activation_norms(models: Sequence[ModelResults], stem: Path) -> list[Path]:
    """Mean activation norm per captured site against relative depth, log scale (figure 6)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, m in enumerate(models):
        points = sorted((_depth(m, h), m.capture.mean_norm[h]) for h in m.hooks if h in m.capture.mean_norm)
        if points:
            growth = f"; last / first site x{points[-1][1] / points[0][1]:.0f}" if points[0][1] > 0 else ""
            ax.plot(*zip(*points), "-", **MODEL_STYLES[k % 10], label=f"{m.name} ({m.n_layers} layers{growth})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("relative depth, layer / (n_layers - 1)")
    ax.set_ylabel("mean ||x|| over tokens (log scale)")
    ax.set_title("Activation norm by depth: raw MSE ratios across layers mostly measure this growth", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def raw_vs_scale_aware(matrix: TransferMatrix, stem: Path) -> list[Path]:
    """The notes' raw loss ratio next to relative transfer, with both universality profiles (figure 7)."""
    raw, rel, n = matrix["transfer_recon_ratio"], matrix["relative_transfer"], len(matrix.sources)
    fig = plt.figure(figsize=(15, 11) if n > 12 else (12, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(2.2, 1), hspace=0.35, wspace=0.3)
    ax_raw, ax_rel, ax_u = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    finite = raw[np.isfinite(raw) & (raw > 0)]
    # A log scale symmetric about 1 (the diagonal), wide enough for 95% of the values, 10^-1 to 10^-3 at most.
    e = float(np.clip(np.ceil(np.percentile(np.abs(np.log10(finite)), 95)), 1, 3)) if finite.size else 1.0
    edges = _edges(range(n))
    norm = colors.LogNorm(10 ** -e, 10 ** e)
    mesh = ax_raw.pcolormesh(edges, edges, np.ma.masked_invalid(raw), cmap="RdBu", norm=norm)
    ax_raw.set_ylim(edges[-1], edges[0])
    fig.colorbar(mesh, ax=ax_raw, extend="both", fraction=0.05, pad=0.03).set_label(
        "MSE(SAE_i on i) / MSE(SAE_i on j), log; > 1 'better than home'")
    ax_raw.set_title(f"notes' raw ratio transfer_recon_ratio (higher = better per the notes)\n"
                     f"colours clipped to [{10 ** -e:g}, {10 ** e:g}]; span {finite.min():.2g} to {finite.max():.2g}",
                     fontsize=9)
    _band_colorbar(fig, draw_band_heatmap(ax_rel, rel), ax_rel, RELATIVE_TRANSFER)
    title = "relative_transfer, mean and spread matched (higher = better). " + _clip_note(rel) + _hatch_unreliable(ax_rel, matrix)
    ax_rel.set_title(textwrap.fill(title, 85), fontsize=8.5)
    for ax in (ax_raw, ax_rel):
        _layer_axes(ax, matrix)
    s_rel = summarize_matrix(matrix, "relative_transfer")
    off = np.where(np.eye(n, dtype=bool), np.nan, raw)
    raw_universality = np.nanmean(off, 1)  # the notes' plain mean: no bounds, no intervals, no verdicts
    x = np.arange(n)
    ax_u.errorbar(x, [e.value for e in s_rel.universality], yerr=_error_bars(s_rel.universality), fmt="o-",
                  color="#2166ac", ms=4, lw=1, capsize=1.5, label="relative transfer, 95% interval (left axis, linear)")
    ax_u.set_ylabel("relative transfer universality", color="#2166ac")
    ax_r = ax_u.twinx()
    ax_r.plot(x, raw_universality, "s--", color="#b2182b", ms=4, label="raw ratio (right axis, log)")
    norms = matrix.settings.get("mean_activation_norm", {})
    if norms:
        ax_r.plot(x, [norms.get(site.hook_name, np.nan) / max(norms.values()) for site in matrix.sources], ":",
                  color="grey", lw=1.2, label="mean activation norm / its maximum (right axis)")
    ax_r.set_yscale("log")
    ax_r.set_ylabel("raw ratio universality (log)", color="#b2182b")
    for hub in s_rel.hub_layers:
        i = s_rel.layers.index(hub)
        ax_u.plot(i, s_rel.universality[i].value, "*", ms=14, color="gold", mec="#2166ac", zorder=5)
    ax_u.set_xticks(x, _labels(matrix.sources), fontsize=7 if n <= 20 else 6)
    ax_u.set_xlabel("source layer")
    hubs = ", ".join(map(str, s_rel.hub_layers)) or "none"
    ax_u.set_title(f"Universality per layer (mean over the other targets). Relative transfer's hub layers (stars): "
                   f"{hubs}. The raw ratio gets no bands or hubs: it follows the norm", fontsize=9)
    lines = ax_u.get_legend_handles_labels()[0] + ax_r.get_legend_handles_labels()[0]
    ax_u.legend(lines, [h.get_label() for h in lines], fontsize=7, loc="upper center",
                bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle(f"{matrix.sources[0].model}: raw loss ratio vs scale-aware transfer", fontsize=12)
    return _save(fig, stem)


def _square(matrix: TransferMatrix | None, *metrics: str) -> bool:
    """A matrix the layer summaries accept: sources == targets, >= 2 sites, increasing layers, the metrics present."""
    layers = [s.layer for s in matrix.sources] if matrix is not None else []
    return (matrix is not None and matrix.sources == matrix.targets and len(layers) >= 2
            and all(b > a for a, b in zip(layers, layers[1:])) and all(m in matrix.metrics for m in metrics))


def make_plots(results: RunResults, folder: Path) -> dict[str, list[Path]]:
    """Every figure the results allow, into `folder`: {plot_id: [png, pdf]}. Missing inputs skip their figure."""
    folder, out = Path(folder), {}
    models = list(results.models.values())
    within = [m for m in models if _square(m.transfer, "relative_transfer")]
    for m in within:
        out[f"transfer_heatmap:{m.name}"] = transfer_heatmap(m.transfer, folder / f"transfer_heatmap-{m.name}")
        out[f"universality:{m.name}"] = universality_bars(m.transfer, folder / f"universality-{m.name}")
    if within:
        out["distance_decay"] = distance_decay(within, folder / "distance_decay")
    for c in results.cross:
        if _cross_panels(c.matrix):
            name = f"{c.model_a}~{c.model_b}"
            out[f"cross_model:{name}"] = cross_model_heatmap(c, folder / f"cross_model-{name}")
    if any(m.evals for m in models):
        out["sae_quality"] = sae_quality([m for m in models if m.evals], folder / "sae_quality")
    if any(m.capture.mean_norm for m in models):
        out["activation_norms"] = activation_norms(models, folder / "activation_norms")
    for m in within:
        if _square(m.transfer, "relative_transfer", "transfer_recon_ratio"):
            out[f"raw_vs_scale_aware:{m.name}"] = raw_vs_scale_aware(m.transfer,
                                                                     folder / f"raw_vs_scale_aware-{m.name}")
    return out



FLOW_CHAINS = 6  # trajectories drawn in colour (the longest); the others' links among top features in grey


def trace_flow(trace: Any, stem: Path, position: int = -1, chains: int = FLOW_CHAINS) -> list[Path]:
    """The reasoning tracker's figure (`trace.Trace`): per model a panel with SAE sites down (layer
    order) and each site's top-k features across (strongest left; colour = activation relative to
    the site's strongest), labelled with the feature id and its top promoted token. The `chains`
    longest persisting trajectories are drawn in colour, their steps outside a site's top-k as
    hollow circles in extra columns on the right; links of the other trajectories between top-k
    features are thin grey lines. `position` picks the traced token when the trace holds several."""
    panels = list(trace.models.values())
    k = trace.top_k
    prompt = textwrap.shorten(trace.prompt, 80, placeholder="...")
    layouts = [_flow_layout(m.positions[position], k, chains) for m in panels]
    columns = max(k + extra for _, _, extra in layouts)
    n_sites = max(len(m.positions[position].layers) for m in panels)
    height = 0.3 * n_sites + 2.4
    fig, axes = plt.subplots(1, len(panels), figsize=(1.55 * columns * len(panels) + 1.5, height), squeeze=False)
    cmap = plt.get_cmap("viridis")
    chain_colors = plt.get_cmap("tab10").colors
    for ax, m, (place, highlighted, _) in zip(axes[0], panels, layouts):
        token = m.positions[position]
        for t in token.trajectories:
            if t in highlighted:
                continue
            points = [place.get((s.hook, s.feature)) for s in t.steps]
            for a, b in zip(points, points[1:]):
                if a is not None and b is not None:
                    ax.plot(*zip(a, b), "-", color="0.75", lw=0.6, zorder=1)
        for layer in token.layers:
            strongest = layer.top[0].activation if layer.top else 1.0
            for hit in layer.top:
                ax.scatter(*place[layer.hook, hit.feature], s=70, color=cmap(hit.activation / strongest),
                           edgecolor="black", lw=0.4, zorder=3)
        for c, t in enumerate(highlighted):
            color = chain_colors[c % len(chain_colors)]
            points = [place[s.hook, s.feature] for s in t.steps]
            if t.joins and t.joins in place:
                points.append(place[t.joins])
            ax.plot(*zip(*points), "-", color=color, lw=1.6, alpha=0.85, zorder=2,
                    label=f"{t.steps[0].layer}:{t.steps[0].feature} -> {t.steps[-1].layer}:{t.steps[-1].feature} "
                          f"({len(t.steps)} sites)")
            for step in t.steps:
                if step.rank >= k:
                    ax.scatter(*place[step.hook, step.feature], s=45, facecolor="white", edgecolor=color, lw=1.1, zorder=3)
        for (hook, feature), (x, y) in place.items():
            d = m.description(hook, feature)
            word = repr(d.promoted_tokens[0]) if d and d.promoted_tokens else ""
            ax.text(x + 0.12, y, f"{feature} {word}", fontsize=5, va="center", ha="left", zorder=4, clip_on=False)
        ax.set_yticks(range(len(token.layers)), [f"L{layer.layer}" for layer in token.layers],
                      fontsize=6.5 if len(token.layers) > 16 else 8)
        ax.set_ylim(len(token.layers) - 0.5, -0.5)
        ax.set_xlim(-0.4, columns - 0.15)
        ax.set_xticks(range(columns), [f"#{i + 1}" if i < k else "chain" for i in range(columns)], fontsize=7)
        ax.set_xlabel("top features at each layer, strongest first (label: feature id, top promoted token)", fontsize=7.5)
        ax.grid(axis="y", alpha=0.2)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        persisting = sum(t.persists for t in token.trajectories)
        ax.set_title(f"{m.model}: {prompt!r} at token {token.token!r} (position {token.position})\n"
                     f"{persisting} trajectories persist over 2+ sites; the {len(highlighted)} longest in colour",
                     fontsize=8.5)
        if highlighted:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55 / (0.77 * height)), ncol=3,
                      fontsize=6.5, frameon=False, title="trajectories (layer:feature, first -> last)",
                      title_fontsize=7)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=colors.Normalize(0, 1))
    cbar = fig.colorbar(sm, ax=axes[0].tolist(), fraction=0.02, pad=0.02)
    cbar.set_label("activation / the layer's strongest", fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    return _save(fig, stem)


def _flow_layout(token: Any, k: int, chains: int) -> tuple[dict[tuple[str, int], tuple[float, float]], list, int]:
    """Node positions {(hook, feature): (x, y)}, the highlighted trajectories and the extra columns they need."""
    row = {layer.hook: i for i, layer in enumerate(token.layers)}
    place = {(layer.hook, hit.feature): (hit.rank, row[layer.hook]) for layer in token.layers for hit in layer.top}
    highlighted = [t for t in token.trajectories if t.persists][:chains]
    used: dict[str, int] = {}
    for t in highlighted:
        for step in t.steps:
            if (step.hook, step.feature) not in place:
                slot = used.get(step.hook, 0)
                used[step.hook] = slot + 1
                place[step.hook, step.feature] = (k + slot, row[step.hook])
    return place, highlighted, max(used.values(), default=0)
