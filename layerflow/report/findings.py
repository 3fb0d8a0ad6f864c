"""A run's `summary.json` (every figure the findings rest on) and `report.md` (findings written from it).

`build_summary` derives everything from the loaded run (`results.RunResults`): per model a
per-layer table and the `transfer.summary.summarize` figures of the scale-aware `relative_transfer` and of
the notes' raw `transfer_recon_ratio`, how the conclusions differ between the two, the
cross-model same-depth comparisons, and the stage timings of run.json. Top-level keys (schema_version 1):

    schema, schema_version, conventions (metrics, bands, thresholds),
    models: {name: {facts, layers: [per-layer row], transfer: {metric: summary}, unreliable_sae_layers,
                    raw_vs_scale_aware}},
    cross_model: [{model_a, model_b, depth_comparison: {metric: ...}, by_depth: [same-depth pair]}],
    stages: {stage: {status, seconds}}, stages_total_seconds

`write_report` turns that summary into markdown. No finding is fixed in advance: each sentence is
picked by the numbers (hubs or none, a divergence layer or none, ...). Every number it prints goes
through `fmt` (integers as they are, other numbers to 3 significant digits) and comes from
summary.json or the matrices, so a test can trace each one back. Identifiers (model and hook
names, file paths) are written in code spans or link targets, where no number is meant to be read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from layerflow.files import PLOTS_DIR, REPORT_FILE, SUMMARY_FILE, atomic_write_text, json_safe
from layerflow.results import CrossModelResults, ModelResults, RunResults
from layerflow.transfer.cross_model import compare_same_depth, same_depth_pairs
from layerflow.transfer.matrix import TransferMatrix
from layerflow.transfer.references import References
from layerflow.transfer.summary import BANDS, band, summarize

SCHEMA = "layerflow.run_summary"
SCHEMA_VERSION = 1
SCALE_AWARE, RAW = "relative_transfer", "transfer_recon_ratio"
REFERENCE_METRICS = ("relative_transfer", "decoder_matched_fraction", "activation_matched_fraction")
CROSS_METRICS = ("relative_transfer", "stitched_explained_variance", "cka", "fraction_features_with_partner")
UNIVERSAL_BANDS = ("HIGH", "MODERATE")  # a layer is universal when its universality falls in these bands
UNRELIABLE_FVU = 1.0  # an SAE at or above it explains none of its layer's variance: relative transfer divides by that
LABELS = {SCALE_AWARE: "relative transfer", RAW: "raw ratio", "stitched_explained_variance": "stitched EV",
          "cka": "CKA", "fraction_features_with_partner": "features with a significant partner"}


def fmt(x: Any) -> str:
    """The report's one number format: integers as they are, others to 3 significant digits (from 1000 on,
    rounded to an integer); None and NaN as "n/a"."""
    if x is None or isinstance(x, bool):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1000:
        return str(round(x))
    text = f"{x:.3g}"
    return "0" if text == "-0" else text


# --- summary.json ----------------------------------------------------------------------------------


def build_summary(results: RunResults) -> dict[str, Any]:
    """Everything the report states, JSON-serialisable (NaN as null); see the module docstring."""
    models = {name: _model_summary(m) for name, m in results.models.items()}
    stages = {name: {"status": s.get("status"), "seconds": s.get("seconds")}
              for name, s in (results.run.get("stages") or {}).items()}
    if stages.get("report", {}).get("status") == "running":  # the pipeline is writing this very report
        stages["report"]["status"] = "this report"
    summary = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "conventions": {"scale_aware_metric": SCALE_AWARE, "raw_metric": RAW,
                        "bands": {name: lower for lower, name in BANDS if math.isfinite(lower)},
                        "universal_bands": list(UNIVERSAL_BANDS), "unreliable_fvu": UNRELIABLE_FVU},
        "models": models,
        "cross_model": [_cross_summary(c) for c in results.cross],
        "stages": stages,
        "stages_total_seconds": sum(s["seconds"] or 0 for s in stages.values()) if stages else None,
    }
    for s in (t for m in models.values() for t in m["transfer"].values()):
        summary["conventions"].update(strong_threshold=s["strong_threshold"], hub_fraction=s["hub_fraction"])
    return json_safe(summary)


def _model_summary(m: ModelResults) -> dict[str, Any]:
    matrix: TransferMatrix | None = m.transfer
    transfer: dict[str, dict] = {}
    layers = [s.layer for s in matrix.sources] if matrix is not None else []
    # summarize() indexes by layer: it needs one site per layer, the same sites on both sides
    if matrix is not None and matrix.sources == matrix.targets and len(layers) >= 2 \
            and all(a < b for a, b in zip(layers, layers[1:])):
        transfer = {metric: _metric_summary(matrix[metric], layers, m.n_layers, metric)
                    for metric in (SCALE_AWARE, RAW) if metric in matrix.metrics}
    facts = {"n_layers": m.n_layers, "d_model": m.capture.d_model, "n_sites": len(m.hooks),
             "n_tokens": m.capture.n_tokens, "heldout_tokens": m.capture.split.get("heldout_tokens"),
             "transfer_tokens": matrix.settings.get("n_tokens") if matrix is not None else None}
    if m.train is not None:
        facts.update(train_steps=m.train.steps, train_tokens_per_site=m.train.tokens_per_site,
                     train_seconds=m.train.seconds)
    rows = _layer_rows(m, transfer)
    unreliable = [r["layer"] for r in rows if r["fvu"] is not None and r["fvu"] >= UNRELIABLE_FVU]
    return {"facts": facts, "layers": rows, "transfer": transfer, "unreliable_sae_layers": unreliable,
            "raw_vs_scale_aware": _raw_vs_scale_aware(matrix, transfer, rows) if len(transfer) == 2 else None,
            "references": _references(matrix)}


def _references(matrix: TransferMatrix | None) -> dict[str, Any]:
    """Per metric: the observed figure (within a model: the off-diagonal mean; across models: the
    same-depth mean) beside its floor and ceiling (means over the sites measured, and their layers)."""
    if matrix is None or not matrix.references:
        return {}
    refs, out = References.from_dict(matrix.references), {}
    cross = matrix.kind == "cross_model"
    layer = {s.hook_name: s.layer for s in (matrix.targets if cross else matrix.sources)}
    for metric in CROSS_METRICS if cross else REFERENCE_METRICS:
        if metric not in matrix.metrics:
            continue
        if cross:
            values = np.array([matrix[metric][i, j] for i, j in same_depth_pairs(matrix)])
        else:
            values = matrix[metric][~np.eye(len(matrix.sources), dtype=bool)]
        values = values[np.isfinite(values)]
        entry = {"observed": float(values.mean()) if values.size else None, "observed_pairs": int(values.size)}
        for kind in ("floor", "ceiling"):
            mean, n = refs.summary(kind, metric)
            entry[kind] = mean if n else None
            entry[f"{kind}_layers"] = sorted(layer[h] for h, v in getattr(refs, kind).get(metric, {}).items()
                                             if v is not None and math.isfinite(v) and h in layer)
        known = None not in (entry["observed"], entry["floor"], entry["ceiling"])
        span = entry["ceiling"] - entry["floor"] if known else 0.0
        # where the observed figure lies: 0 at the floor, 1 at the ceiling
        entry["position"] = (entry["observed"] - entry["floor"]) / span if span > 0 else None
        out[metric] = entry
    return out


def _metric_summary(M: np.ndarray, layers: list[int], n_layers: int, metric: str) -> dict[str, Any]:
    s = summarize(M, layers, n_layers, metric)
    out = asdict(s)
    bands = [band(u) for u in s.universality]
    out["universality_band"] = bands
    out["universality_mean"] = float(np.nanmean(s.universality)) if np.isfinite(s.universality).any() else None
    out["universal_layers"] = [layer for layer, b in zip(layers, bands) if b in UNIVERSAL_BANDS]
    out["specialised_layers"] = [layer for layer, b in zip(layers, bands) if b == "SPECIALISED"]
    links = [float(M[k, k + 1]) for k in range(len(layers) - 1)]
    out["adjacent_links"] = [{"from": a, "to": b, "value": v} for a, b, v in zip(layers, layers[1:], links)]
    finite = [v for v in links if math.isfinite(v)]
    out["adjacent_link_mean"] = float(np.mean(finite)) if finite else None
    pairs = sorted(s.bidirectional_pairs, key=lambda p: -min(p.forward, p.backward))
    out["strongest_bidirectional_pairs"] = [asdict(p) for p in pairs[:3]]
    out["bidirectional_max_distance"] = max((p.layer_b - p.layer_a for p in pairs), default=None)
    off = M[np.isfinite(M) & ~np.eye(len(layers), dtype=bool)]
    out["n_pairs"] = int(off.size)
    out["fraction_above_one"] = float(np.mean(off > 1)) if off.size else None
    return out


def _layer_rows(m: ModelResults, transfer: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for site in m.capture.sites:
        hook, layer = site.hook_name, site.layer
        ev = m.evals.get(hook)
        rec = ev.reconstruction if ev is not None else None
        row = {"layer": layer, "hook": hook, "relative_depth": layer / max(m.n_layers - 1, 1),
               "mean_norm": m.capture.mean_norm.get(hook),
               "fvu": getattr(rec, "fvu", None), "l0": getattr(rec, "l0", None),
               "dead_fraction": getattr(rec, "dead_fraction", None), "delta_ce": getattr(ev, "delta_ce", None),
               "kl_div": getattr(ev, "kl_div", None), "ce_loss_score": getattr(ev, "ce_loss_score", None)}
        for prefix, metric in (("", SCALE_AWARE), ("raw_", RAW)):
            s = transfer.get(metric)
            i = s["layers"].index(layer) if s and layer in s["layers"] else None
            row[f"{prefix}universality_out"] = s["universality"][i] if i is not None else None
            row[f"{prefix}universality_in"] = s["universality_incoming"][i] if i is not None else None
            row[f"{prefix}universality_band"] = s["universality_band"][i] if i is not None else None
        rows.append(row)
    return rows


def _raw_vs_scale_aware(matrix: TransferMatrix, transfer: dict[str, dict], rows: list[dict]) -> dict[str, Any]:
    rel, raw = transfer[SCALE_AWARE], transfer[RAW]
    R, W = matrix[SCALE_AWARE], matrix[RAW]
    both = np.isfinite(R) & np.isfinite(W) & ~np.eye(len(R), dtype=bool)
    differs = [band(a) != band(b) for a, b in zip(R[both], W[both])]
    norms = {row["layer"]: row["mean_norm"] for row in rows}
    norm = [norms.get(layer) for layer in rel["layers"]]
    return {
        "universality_rank_correlation": _spearman(rel["universality"], raw["universality"]),
        "incoming_rank_correlation": _spearman(rel["universality_incoming"], raw["universality_incoming"]),
        "norm_rank_correlation": {SCALE_AWARE: _spearman(norm, rel["universality"]),
                                  RAW: _spearman(norm, raw["universality"])},
        "n_pairs": len(differs),
        "band_differs_fraction": float(np.mean(differs)) if differs else None,
        "same_hubs": rel["hub_layers"] == raw["hub_layers"],
        "same_divergence": rel["divergence_layer"] == raw["divergence_layer"],
        "same_universal_layers": rel["universal_layers"] == raw["universal_layers"],
        "same_specialised_layers": rel["specialised_layers"] == raw["specialised_layers"],
    }


def _spearman(a: list, b: list) -> float | None:
    x = np.array([(u, v) for u, v in zip(a, b) if u is not None and v is not None
                  and math.isfinite(u) and math.isfinite(v)], dtype=np.float64).reshape(-1, 2)
    if len(x) < 3 or np.ptp(x[:, 0]) == 0 or np.ptp(x[:, 1]) == 0:
        return None  # undefined for constant profiles
    return float(spearmanr(x[:, 0], x[:, 1]).statistic)


def _cross_summary(c: CrossModelResults) -> dict[str, Any]:
    m = c.matrix
    metrics = [x for x in CROSS_METRICS if x in m.metrics]
    # relative transfer is NaN wherever the target SAE explains nothing; fall back to the next figure
    primary = next((x for x in metrics[:3] if np.isfinite(m[x]).any()), None)
    by_depth = []
    for i, j in same_depth_pairs(m):
        s, t = m.sources[i], m.targets[j]
        row = {"source_layer": s.layer, "source_depth": s.relative_depth, "target_layer": t.layer,
               "target_depth": t.relative_depth, **{x: float(m[x][i, j]) for x in metrics}}
        if primary is not None and np.isfinite(m[primary][i]).any():
            best = int(np.nanargmax(m[primary][i]))
            row.update(best_target_layer=m.targets[best].layer, best_target_depth=m.targets[best].relative_depth,
                       best_value=float(m[primary][i, best]))
        by_depth.append(row)
    return {"model_a": c.model_a, "model_b": c.model_b, "n_sources": len(m.sources), "n_targets": len(m.targets),
            "depth_comparison": {x: asdict(compare_same_depth(m, x)) for x in metrics},
            "references": _references(m),
            "by_depth_metric": primary,
            "n_best_is_same_depth": sum(r.get("best_target_layer") == r["target_layer"] for r in by_depth),
            "by_depth": by_depth}


# --- report.md -------------------------------------------------------------------------------------


def _layers(layers: list[int]) -> str:
    """"layer 3", "layers 3 and 7", "layers 2 to 8, 10 and 12" (runs of three or more joined by "to")."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    parts = [p for r in runs for p in ([f"{r[0]} to {r[-1]}"] if len(r) >= 3 else map(str, r))]
    text = parts[-1] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return ("layers " if len(layers) > 1 else "layer ") + text


def _findings(s: dict, conv: dict) -> list[str]:
    """Sentences for one metric's summary, each chosen by its numbers."""
    label, layers, u = LABELS[s["metric"]], s["layers"], s["universality"]
    hi, lo = conv["bands"]["MODERATE"], conv["bands"]["LOW"]
    uni, spec, n = s["universal_layers"], s["specialised_layers"], len(layers)
    lines = []
    if len(spec) == n:
        lines.append(f"All {n} layers are specialised: each layer's dictionary explains the other layers, on "
                     f"average, below {fmt(lo)} of what their own dictionaries do ({label}).")
    elif len(uni) == n:
        lines.append(f"All {n} layers are universal: each layer's dictionary explains the other layers, on "
                     f"average, at least {fmt(hi)} of what their own dictionaries do ({label}).")
    else:
        lines.append(f"Universal layers (mean outgoing {label} >= {fmt(hi)}): {_layers(uni) if uni else 'none'}."
                     f" Specialised layers (< {fmt(lo)}): {_layers(spec) if spec else 'none'}.")
    finite = [(v, layer) for v, layer in zip(u, layers) if v is not None]
    if finite:
        (vmax, lmax), (vmin, lmin) = max(finite), min(finite)
        lines.append(f"The most universal dictionary is layer {lmax} ({fmt(vmax)}), "
                     f"the least layer {lmin} ({fmt(vmin)}).")
    hubs = s["hub_layers"]
    if not hubs:
        lines.append(f"No layer stands out as a hub: no layer both transfers at >= {fmt(s['strong_threshold'])} to at "
                     f"least {fmt(s['hub_fraction'])} of the other layers and has a universality more than one "
                     "standard deviation above the mean.")
    else:
        values = ", ".join(fmt(u[layers.index(h)]) for h in hubs)
        lines.append(f"{_layers(hubs).capitalize()} {'is a hub' if len(hubs) == 1 else 'are hubs'} (universality "
                     f"{values}, against a mean of {fmt(s['universality_mean'])} over all layers).")
    d = s["divergence_layer"]
    if d is None:
        lines.append("The layer-to-layer chain has no divergence point: no adjacent link (a layer's dictionary on the "
                     f"next sampled layer) stands out below the others (mean link {fmt(s['adjacent_link_mean'])}).")
    else:
        link = next(x for x in s["adjacent_links"] if x["to"] == d)
        lines.append(f"The chain diverges at layer {d} (relative depth {fmt(s['divergence_depth'])}): layer "
                     f"{link['from']}'s dictionary explains it at {fmt(link['value'])}, against a mean adjacent "
                     f"link of {fmt(s['adjacent_link_mean'])}.")
    pairs = s["strongest_bidirectional_pairs"]
    if not pairs:
        lines.append(f"No pair of layers transfers strongly in both directions (both >= {fmt(s['strong_threshold'])}).")
    else:
        best = "; ".join(f"{p['layer_a']} and {p['layer_b']} ({fmt(p['forward'])} forward, {fmt(p['backward'])} "
                         "backward)" for p in pairs)
        lines.append(f"{len(s['bidirectional_pairs'])} strong bidirectional pair(s) (both directions >= "
                     f"{fmt(s['strong_threshold'])}), at most {s['bidirectional_max_distance']} layers apart; "
                     f"the strongest: {best}.")
    rate, decay = s["decay_rate"], s["distance_decay"]
    if rate is None:
        lines.append("Too few distinct layer distances to fit a distance-decay rate.")
    else:
        first, last = decay[0], decay[-1]
        trend = "falls" if rate > 0 else "does not fall"
        lines.append(f"Transfer {trend} with distance: decay rate {fmt(rate)} per layer (least-squares slope); mean "
                     f"{fmt(first['mean'])} at distance {first['distance']}, {fmt(last['mean'])} at distance "
                     f"{last['distance']}.")
    counts = ", ".join(f"{name} {c}" for name, c in s["band_counts"].items())
    lines.append(f"Over the {s['n_pairs']} off-diagonal pairs: mean {fmt(s['mean'])}, min {fmt(s['min'])}, "
                 f"max {fmt(s['max'])}; bands: {counts}.")
    return lines


WITHIN_SCALES = {"relative_transfer": ("relative transfer", "off-diagonal mean"),
                 "decoder_matched_fraction": ("decoder-matched fraction", "mean over adjacent pairs"),
                 "activation_matched_fraction": ("activation-matched fraction", "mean over adjacent pairs")}
CROSS_SCALES = {"relative_transfer": ("relative transfer", "same-depth mean"), "cka": ("CKA", "same-depth mean"),
                "fraction_features_with_partner": ("fraction of features with a partner", "same-depth mean")}


def _scale(refs: dict, names: dict[str, tuple[str, str]] = WITHIN_SCALES, own: str = "layer's own SAE") -> list[str]:
    """Each figure against its floor (no shared features) and ceiling (the same features learned twice)."""
    lines = []
    for metric, (label, what) in names.items():
        r = refs.get(metric)
        if not r or r["observed"] is None or r["floor"] is None:
            continue
        floor = f"floor {fmt(r['floor'])} ({_layers(r['floor_layers'])})"
        if r["ceiling"] is None:
            lines.append(f"Scale of {label}: {what} {fmt(r['observed'])}, {floor}; no ceiling was measured.")
            continue
        ceiling = f"ceiling {fmt(r['ceiling'])} ({_layers(r['ceiling_layers'])})"
        where = "at or below the floor" if r["observed"] <= r["floor"] else (
            "at or above the ceiling" if r["observed"] >= r["ceiling"] else
            f"{fmt(r['position'])} of the way from floor to ceiling" if r["position"] is not None else "")
        lines.append(f"Scale of {label}: {what} {fmt(r['observed'])}, {where}; {floor}, {ceiling}.")
    if lines:
        lines.append(f"Floor: the {own} rotated inside the layer's principal subspace (its sparsity, norms "
                     "and subspace, none of the data's features). Ceiling: a second SAE trained on the same layer with "
                     "another seed, compared with the first. Means over the layers named.")
    return lines


def _comparison(model: dict) -> list[str]:
    rel, raw, c = model["transfer"][SCALE_AWARE], model["transfer"][RAW], model["raw_vs_scale_aware"]
    named = lambda layers, none: _layers(layers) if layers else none  # noqa: E731
    lines = []
    if c["same_hubs"]:
        lines.append(f"Both metrics name the same hubs: {named(rel['hub_layers'], 'none')}.")
    else:
        lines.append(f"The raw ratio names {named(raw['hub_layers'], 'no layer')} as "
                     f"{'hubs' if len(raw['hub_layers']) > 1 else 'a hub'}; relative transfer names "
                     f"{named(rel['hub_layers'], 'none')}.")
    div = lambda s: f"layer {s['divergence_layer']}" if s["divergence_layer"] is not None else "no layer"  # noqa: E731
    lines.append(f"Divergence point: {div(rel)} under relative transfer, {div(raw)} under the raw ratio.")
    lines.append(f"Universal / specialised layers: {len(rel['universal_layers'])} / {len(rel['specialised_layers'])} "
                 f"under relative transfer, {len(raw['universal_layers'])} / {len(raw['specialised_layers'])} "
                 "under the raw ratio.")
    rho = c["universality_rank_correlation"]
    if rho is not None:
        alike = "rank the layers alike" if rho >= 0.7 else "rank the layers differently"
        lines.append(f"The two universality profiles have a Spearman rank correlation of {fmt(rho)}: they {alike}.")
    nr = c["norm_rank_correlation"]
    if nr[RAW] is not None and nr[SCALE_AWARE] is not None:
        closer = "follows" if abs(nr[RAW]) > abs(nr[SCALE_AWARE]) else "does not follow"
        lines.append(f"Rank correlation of universality with the mean activation norm: {fmt(nr[RAW])} for the raw "
                     f"ratio, {fmt(nr[SCALE_AWARE])} for relative transfer; the raw ratio {closer} norm growth "
                     "more closely than the scale-aware metric.")
    if c["band_differs_fraction"] is not None:
        lines.append(f"The band differs between the two metrics for {fmt(c['band_differs_fraction'])} of the "
                     f"{c['n_pairs']} off-diagonal pairs.")
    if raw["fraction_above_one"]:
        lines.append(f"The raw ratio exceeds one for {fmt(raw['fraction_above_one'])} of the pairs (max "
                     f"{fmt(raw['max'])}): no dictionary explains another layer better than its own, so these "
                     "values measure the target's smaller norm, not feature reuse.")
    changed = [what for what, same in (("hubs", c["same_hubs"]), ("divergence point", c["same_divergence"]),
                                       ("universal layers", c["same_universal_layers"]),
                                       ("specialised layers", c["same_specialised_layers"])) if not same]
    changed = ", ".join(changed[:-1]) + " and " + changed[-1] if len(changed) > 1 else "".join(changed)
    lines.append(f"**The conclusion changes with the metric**: the {changed} differ." if changed else
                 "On these data both metrics lead to the same hubs, divergence point and universal/specialised layers.")
    return lines


def _cross(c: dict) -> list[str]:
    lines = []
    for metric, d in c["depth_comparison"].items():
        same, every, label = d["same_depth_mean"], d["all_mean"], LABELS[metric][0].upper() + LABELS[metric][1:]
        if every is None:
            lines.append(f"{label}: not computed for any pair.")
            continue
        higher = "higher" if same is not None and same > every else "not higher"
        lines.append(f"{label}: same-depth pairs average {fmt(same)} (n={d['same_depth_n']}), all pairs "
                     f"{fmt(every)} (n={d['all_n']}); same depth is {higher}.")
    metric = c["by_depth_metric"]
    rows = [r for r in c["by_depth"] if r.get(metric) is not None]
    if rows:
        top, bottom = max(rows, key=lambda r: r[metric]), min(rows, key=lambda r: r[metric])
        lines.append(f"By relative depth, same-depth {LABELS[metric]} is highest at depth {fmt(top['source_depth'])} "
                     f"(layer {top['source_layer']} on layer {top['target_layer']}: {fmt(top[metric])}) and "
                     f"lowest at depth {fmt(bottom['source_depth'])} (layer {bottom['source_layer']} on layer "
                     f"{bottom['target_layer']}: {fmt(bottom[metric])}).")
        lines.append(f"For {c['n_best_is_same_depth']} of the {c['n_sources']} source layers the best target by "
                     f"{LABELS[metric]} is the same-depth one.")
    lines += _scale(c.get("references") or {}, CROSS_SCALES, f"target ({c['model_b']}) layer's own SAE")
    return lines


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    columns = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]  # drop empty columns
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r[k] if isinstance(r.get(k), str) else fmt(r.get(k)) for k, _ in columns) + " |"
            for r in rows]
    return out


LAYER_COLUMNS = [("layer", "layer"), ("relative_depth", "depth"), ("mean_norm", "mean norm"), ("fvu", "FVU"),
                 ("l0", "L0"), ("dead_fraction", "dead"), ("delta_ce", "ΔCE"), ("kl_div", "KL"),
                 ("universality_out", "rel. out"), ("universality_in", "rel. in"), ("universality_band", "band"),
                 ("raw_universality_out", "raw out"), ("raw_universality_in", "raw in")]
CROSS_COLUMNS = [("source_layer", "source layer"), ("source_depth", "depth"), ("target_layer", "target layer"),
                 ("target_depth", "target depth"), (SCALE_AWARE, "rel. transfer"),
                 ("stitched_explained_variance", "stitched EV"), ("cka", "CKA"),
                 ("fraction_features_with_partner", "partner fraction"), ("best_target_layer", "best target")]


def _plot_links(plots: dict[str, list[Path]], ids: list[tuple[str, str]], base: Path) -> list[str]:
    lines = []
    for plot_id, title in ids:
        files = [Path(p) for p in plots.get(plot_id, []) if Path(p).exists()]
        png = [p for p in files if p.suffix == ".png"]
        if not png:
            continue
        rel = lambda p: Path(os.path.relpath(p, base)).as_posix()  # noqa: E731
        pdf = "".join(f" ([PDF]({rel(p)}))" for p in files if p.suffix == ".pdf")
        lines += [f"![{title}]({rel(png[0])}){pdf}", ""]
    return lines


def _how_to_read(conv: dict) -> list[str]:
    b = conv["bands"]
    return [
        "## How to read this", "",
        "- **Relative transfer** (source layer i, target layer j): the variance of layer j explained by layer i's "
        "SAE, divided by what layer j's own SAE explains. Layer i's SAE reads layer j with layer j's mean and "
        "spread replaced by layer i's (both fit on the train split), and its output is mapped back, so neither "
        "norm growth nor the residual stream's large, depth-dependent mean is charged as error. One means layer "
        "i's dictionary is as good on j as j's own; it can be negative when the reconstruction is worse than the mean.",
        "- **FVU**: fraction of variance unexplained by a layer's own SAE on held-out tokens (lower is better); "
        "**L0**: active latents per token; **dead**: fraction of latents that never fire.",
        f"- **Bands** (the notes' heatmap bands): HIGH >= {fmt(b['HIGH'])}, MODERATE >= {fmt(b['MODERATE'])}, "
        f"LOW >= {fmt(b['LOW'])}, SPECIALISED below. A layer is universal when its universality (mean outgoing "
        "transfer to the other layers) is HIGH or MODERATE, specialised when it is SPECIALISED.",
        f"- **Hub**: a layer whose dictionary transfers at >= {fmt(conv.get('strong_threshold'))} to at least "
        f"{fmt(conv.get('hub_fraction'))} of the other layers and whose universality lies more than one standard "
        "deviation above the mean.",
        "- **Divergence point**: the layer where the weakest adjacent link (a layer's SAE on the next sampled layer) "
        "stands out below the other links by more than one standard deviation.",
        "- **Why raw ratios mislead**: the notes' ratio divides raw reconstruction errors. The residual norm grows "
        "with depth, so errors on deep layers are larger simply because the numbers are larger: the ratio "
        "measures norm growth, and exceeds one when the target's norm is smaller. Relative transfer is measured "
        "against the target's own variance and its own dictionary, so it does not see the norm. Matching the norm "
        "alone is not enough either: residual streams carry a large mean that changes with depth, and an SAE "
        "handed the wrong mean is charged for the offset (the scale-only figures, kept in the matrix as "
        "relative_transfer_scale_only, read far layers as unrelated for that reason).", ""]


def write_report(results: RunResults, summary: dict, plots: dict[str, list[Path]], path: str | Path) -> Path:
    """report.md at `path` (atomically), from `build_summary(results)` and `make_plots`' files."""
    path, conv = Path(path), summary["conventions"]
    base, models = path.parent, summary["models"]
    out = ["# layerflow report", "",
           f"Run folder `{results.root}`: {len(models)} model(s), {len(summary['cross_model'])} cross-model pair(s). "
           "Every number below is in `summary.json` or the transfer matrices.", "", "## Findings", ""]
    for name, m in models.items():
        out += [f"### `{name}`", ""]
        if m["unreliable_sae_layers"]:
            worst = max(r["fvu"] for r in m["layers"] if r["fvu"] is not None)
            out += [f"**Warning**: the SAEs of {_layers(m['unreliable_sae_layers'])} explain none of their layer's "
                    f"variance (FVU >= {fmt(conv['unreliable_fvu'])}, up to {fmt(worst)}). Relative transfer divides "
                    "by that explained variance, so the transfer figures of these layers are not meaningful: "
                    "train them longer or with another schedule.", ""]
        if SCALE_AWARE in m["transfer"]:
            out += [f"- {line}" for line in _findings(m["transfer"][SCALE_AWARE], conv)]
            out += [f"- {line}" for line in _scale(m.get("references") or {})] + [""]
        else:
            out += ["No layer-to-layer transfer matrix with relative transfer yet.", ""]
        if m["raw_vs_scale_aware"] is not None:
            out += ["Raw ratio vs scale-aware metric:", ""] + [f"- {line}" for line in _comparison(m)] + [""]
        out += _plot_links(plots, [(f"transfer_heatmap:{name}", "transfer heatmap"),
                                   (f"universality:{name}", "universality"),
                                   (f"raw_vs_scale_aware:{name}", "raw vs scale-aware")], base)
    for c in summary["cross_model"]:
        pair = f"{c['model_a']}~{c['model_b']}"
        out += [f"### Cross-model: `{c['model_a']}` SAEs on `{c['model_b']}`", ""]
        out += [f"- {line}" for line in _cross(c)] + [""] + _table(c["by_depth"], CROSS_COLUMNS) + [""]
        out += _plot_links(plots, [(f"cross_model:{pair}", "cross-model transfer")], base)
    general = _plot_links(plots, [("distance_decay", "distance decay"), ("sae_quality", "SAE quality"),
                                  ("activation_norms", "activation norms")], base)
    if general:
        out += ["## Plots", ""] + general
    out += ["## Per-layer metrics", "",
            "rel./raw out/in: universality (mean outgoing / incoming transfer) of relative transfer and of the raw "
            "ratio; band: the band of the outgoing relative transfer.", ""]
    for name, m in models.items():
        out += [f"### `{name}`", ""] + _table(m["layers"], LAYER_COLUMNS) + [""]
    out += _how_to_read(conv) + ["## Run facts", ""]
    for name, m in models.items():
        f = m["facts"]
        line = (f"- `{name}`: {fmt(f['n_layers'])} layers, d_model {fmt(f['d_model'])}, {fmt(f['n_sites'])} sites, "
                f"{fmt(f['n_tokens'])} tokens captured ({fmt(f['heldout_tokens'])} held out)")
        if "train_steps" in f:
            line += (f"; SAEs trained {fmt(f['train_steps'])} steps on {fmt(f['train_tokens_per_site'])} tokens per "
                     f"site in {fmt(f['train_seconds'])} s")
        if f["transfer_tokens"] is not None:
            line += f"; transfer on {fmt(f['transfer_tokens'])} held-out tokens per site"
        out.append(line + ".")
    out += [f"- Cross-model: `{c['model_a']}` ({c['n_sources']} sites) on `{c['model_b']}` ({c['n_targets']} sites)."
            for c in summary["cross_model"]]
    if summary["stages"]:
        out += ["", "| stage | status | seconds |", "|---|---|---|"]
        out += [f"| {k} | {s['status'] or 'n/a'} | {fmt(s['seconds']) if s['seconds'] is not None else '-'} |"
                for k, s in summary["stages"].items()]
        out.append(f"| total | | {fmt(summary['stages_total_seconds'])} |")
    atomic_write_text(path, "\n".join(out) + "\n")
    return path


def report_run(root: str | Path, plots: dict[str, list[Path]] | None = None) -> tuple[Path, Path]:
    """Write `summary.json`, then `report.md`, into the run folder `root`; plots default to those in root/plots."""
    root = Path(root)
    results = RunResults.load(root)
    summary = build_summary(results)
    summary_path = root / SUMMARY_FILE
    atomic_write_text(summary_path, json.dumps(summary, indent=1, allow_nan=False))
    plots = plots if plots is not None else find_plots(root / PLOTS_DIR)
    return summary_path, write_report(results, summary, plots, root / REPORT_FILE)


def find_plots(folder: Path) -> dict[str, list[Path]]:
    """Plots already in `folder`, by id: `<kind>-<rest>.png` is `<kind>:<rest>` (make_plots' file names)."""
    plots: dict[str, list[Path]] = {}
    for p in sorted(Path(folder).glob("*")):
        if p.suffix in (".png", ".pdf"):
            kind, sep, rest = p.stem.partition("-")
            plots.setdefault(f"{kind}:{rest}" if sep else kind, []).append(p)
    return plots
