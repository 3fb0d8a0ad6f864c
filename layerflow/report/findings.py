"""A run's `summary.json` (every figure the findings rest on) and `report.md` (findings written from it).

`build_summary` derives everything from the loaded run (`results.RunResults`). Per model: the
facts, the quality gates' verdict on the dictionaries (`evaluate.gates`), a per-layer table, the
`transfer.summary.summarize` figures of relative transfer with their bootstrap intervals,
persistence next to transfer, the facts that show why the notes' raw ratio misleads (no bands or
verdicts for it), and each figure's floor and ceiling; per cross-model pair the same-depth
comparisons with their intervals; the stage timings of run.json; and `definitions`, the meaning of
every figure and word the report uses. Top-level keys (schema_version 2):

    schema, schema_version, conventions (bands, thresholds, interval level, gates), definitions,
    models: {name: {facts, quality, layers: [per-layer row], transfer: {relative_transfer: summary},
                    unreliable_sae_layers, persistence, raw_ratio, references}},
    cross_model: [{model_a, model_b, depth_comparison, same_minus_all, by_depth: [same-depth pair], ...}],
    stages: {stage: {status, seconds}}, stages_total_seconds

`findings_markdown(summary)` writes the Findings from summary.json alone, so they can be
re-derived from the file; `write_report` adds the plots, tables and run facts. No finding is fixed
in advance: each sentence is picked by the numbers and their intervals, and a claim the interval
does not support is reported as not resolved. Every number goes through `fmt` (integers as they
are, others to 3 significant digits) and comes from summary.json or the matrices, so a test can
trace each one back. Identifiers (model and hook names, paths) are in code spans or link targets.
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

from layerflow import defaults
from layerflow.evaluate.gates import GATES, quality_verdict
from layerflow.evaluate.gates import LABELS as GATE_LABELS
from layerflow.files import PLOTS_DIR, REPORT_FILE, SUMMARY_FILE, atomic_write_text, json_safe
from layerflow.formatting import fmt, iv
from layerflow.results import CrossModelResults, ModelResults, RunResults
from layerflow.transfer.cross_model import compare_same_depth, same_depth_pairs
from layerflow.transfer.matrix import TransferMatrix
from layerflow.transfer.references import References
from layerflow.transfer.summary import (BANDS, BOUNDS, SPECIALISED_BELOW, STRONG, UNIVERSAL_AT, Estimate, pairs_mean,
                                        summarize_matrix)

SCHEMA = "layerflow.run_summary"
SCHEMA_VERSION = 2  # 2: every figure with its interval, quality gates, no bands or verdicts for the raw ratio
SCALE_AWARE, RAW = "relative_transfer", "transfer_recon_ratio"
REFERENCE_METRICS = ("relative_transfer", "decoder_matched_fraction", "activation_matched_fraction")
CROSS_METRICS = ("relative_transfer", "stitched_explained_variance", "cka", "fraction_features_with_partner")
UNRELIABLE_FVU = 1.0  # an SAE at or above it explains none of its layer's variance: relative transfer divides by that
LABELS = {SCALE_AWARE: "relative transfer", RAW: "raw ratio", "stitched_explained_variance": "stitched EV",
          "cka": "CKA", "fraction_features_with_partner": "features with a significant partner"}
DEFINITIONS = {
    "relative_transfer": "EV of layer i's SAE on layer j (mean and spread matched, train-split statistics) divided "
                         "by the EV of layer j's own SAE; 1 = as good as the target's own dictionary.",
    "bounded_mean": f"Averages clip each entry to [{BOUNDS[0]:g}, {BOUNDS[1]:g}] first: below 0 the source explains "
                    "nothing (worse than the target's mean), and a single entry far below zero would outweigh "
                    "several perfect ones; above 1 counts as 'as good as its own'. The median is given unclipped.",
    "interval": "Percentile interval over bootstrap resamples of whole held-out sequences; every derived figure is "
                "recomputed on each resample. It covers the sampling of held-out text, not the randomness of "
                "training the dictionaries: the ceiling (a second seed) shows how far two trainings differ.",
    "universality": "A layer's mean (clipped) relative transfer to every other layer (outgoing).",
    "universal": f"A layer whose whole universality interval lies at or above {UNIVERSAL_AT:g} (the MODERATE band "
                 "edge).",
    "specialised": f"A layer whose whole universality interval lies below {SPECIALISED_BELOW:g} (the LOW band edge).",
    "intermediate": f"A layer whose whole universality interval lies in [{SPECIALISED_BELOW:g}, {UNIVERSAL_AT:g}).",
    "not_resolved": "A figure whose interval straddles the line a claim needs: no claim is made at this sample size.",
    "hub_excess": "A layer's mean (clipped) transfer minus the fitted decay, the median transfer at the same signed "
                  "layer distance: how much better it transfers than its distances predict. Intervals are "
                  "simultaneous over the layers (max-|t| bootstrap).",
    "hub": "A layer whose hub excess is at least min_effect with its simultaneous interval above 0.",
    "break": "An adjacent link (a layer's SAE on the next sampled layer) that drops below its neighbouring links by at "
             "least min_effect after removing the chain's steady trend (the median step), with its simultaneous "
             "interval above 0. The divergence point is the largest break.",
    "decay_rate": "Minus the least-squares slope of the clipped entries against layer distance, per layer.",
    "strong_pair": f"Two layers whose transfer intervals both lie at or above {STRONG:g} in both directions.",
    "persistence": "Relative transfer of the source dictionary's own output on its own layer, carried to the target by "
                   "the train-split least-squares slope: what a layer that merely copies its predecessor scores.",
    "transfer_beyond_persistence": "relative transfer - relative persistence: feature reuse beyond the residual "
                                   "stream carrying the previous layer forward.",
    "floor": "The layer's own SAE rotated inside the layer's principal subspace (no shared features).",
    "ceiling": "A second SAE trained on the same layer with another seed, compared with the first.",
    "quality_gates": "Each SAE's own held-out FVU, dead fraction, out-of-domain FVU and spliced delta CE against the thresholds; "
                     "see layerflow/evaluate/gates.py for the reasoning.",
    "raw_ratio": "The notes' MSE(SAE_i on i) / MSE(SAE_i on j). It follows the residual norm, so it gets no bands, "
                 "hubs or verdicts here; it is shown only to explain why it misleads.",
}


# --- summary.json ----------------------------------------------------------------------------------


def build_summary(results: RunResults) -> dict[str, Any]:
    """Everything the report states, JSON-serialisable (NaN as null); see the module docstring."""
    models = {name: _model_summary(m) for name, m in results.models.items()}
    stages = {name: {"status": s.get("status"), "seconds": s.get("seconds")}
              for name, s in (results.run.get("stages") or {}).items()}
    if stages.get("report", {}).get("status") == "running":  # the pipeline is writing this very report
        stages["report"]["status"] = "this report"
    level = next((t["level"] for m in models.values() for t in m["transfer"].values()), None)
    summary = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "conventions": {"scale_aware_metric": SCALE_AWARE, "raw_metric": RAW,
                        "bands": {name: lower for lower, name in BANDS if math.isfinite(lower)},
                        "universal_at": UNIVERSAL_AT, "specialised_below": SPECIALISED_BELOW,
                        "strong_threshold": STRONG, "bounds": list(BOUNDS), "interval_level": level,
                        "interval_percent": 100 * level if level is not None else None,
                        "min_effect": next((t["min_effect"] for m in models.values() for t in m["transfer"].values()),
                                           None),
                        "quality_gates": dict(GATES), "unreliable_fvu": UNRELIABLE_FVU},
        "definitions": DEFINITIONS,
        "models": models,
        "cross_model": [_cross_summary(c) for c in results.cross],
        "stages": stages,
        "stages_total_seconds": sum(s["seconds"] or 0 for s in stages.values()) if stages else None,
    }
    return json_safe(summary)


def _model_summary(m: ModelResults) -> dict[str, Any]:
    matrix: TransferMatrix | None = m.transfer
    transfer: dict[str, dict] = {}
    layers = [s.layer for s in matrix.sources] if matrix is not None else []
    # summarize() indexes by layer: it needs one site per layer, the same sites on both sides
    square = matrix is not None and matrix.sources == matrix.targets and len(layers) >= 2 \
        and all(a < b for a, b in zip(layers, layers[1:]))
    if square and SCALE_AWARE in matrix.metrics:
        transfer[SCALE_AWARE] = _metric_summary(matrix)
    facts = {"n_layers": m.n_layers, "d_model": m.capture.d_model, "n_sites": len(m.hooks),
             "n_tokens": m.capture.n_tokens, "heldout_tokens": m.capture.split.get("heldout_tokens"),
             "transfer_tokens": matrix.settings.get("n_tokens") if matrix is not None else None,
             "n_replicates": len(next(iter(matrix.replicates.values()))) if matrix is not None and matrix.replicates
             else 0, "intervals": matrix.settings.get("intervals") if matrix is not None else None}
    if m.train is not None:
        facts.update(train_steps=m.train.steps, train_tokens_per_site=m.train.tokens_per_site,
                     train_seconds=m.train.seconds)
    rows = _layer_rows(m, transfer)
    unreliable = [r["layer"] for r in rows if r["fvu"] is not None and r["fvu"] >= UNRELIABLE_FVU]
    return {"facts": facts, "quality": quality_verdict(rows).to_dict(), "layers": rows, "transfer": transfer,
            "unreliable_sae_layers": unreliable,
            "persistence": _persistence(matrix) if square else None,
            "raw_ratio": _raw_ratio(matrix, transfer, rows) if transfer and RAW in matrix.metrics else None,
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
        M = matrix[metric]
        mask = np.zeros(M.shape, dtype=bool)
        if cross:
            for i, j in same_depth_pairs(matrix):
                mask[i, j] = True
        else:
            mask = ~np.eye(len(matrix.sources), dtype=bool)
        observed = pairs_mean(M, matrix.replicates.get(metric), mask)
        entry = {"observed": observed.value, "observed_low": observed.low, "observed_high": observed.high,
                 "observed_pairs": int((mask & np.isfinite(M)).sum()),
                 "no_interval": (matrix.settings.get("no_interval") or {}).get(metric)}  # why, where there is none
        for kind in ("floor", "ceiling"):
            mean, n = refs.summary(kind, metric)
            entry[kind] = mean if n else None
            entry[f"{kind}_layers"] = sorted(layer[h] for h, v in getattr(refs, kind).get(metric, {}).items()
                                             if v is not None and math.isfinite(v) and h in layer)
        known = math.isfinite(observed.value) and None not in (entry["floor"], entry["ceiling"])
        span = entry["ceiling"] - entry["floor"] if known else 0.0
        # where the observed figure lies: 0 at the floor, 1 at the ceiling
        for key in ("", "_low", "_high"):
            entry[f"position{key}"] = (entry[f"observed{key}"] - entry["floor"]) / span if span > 0 else None
        out[metric] = json_safe(entry)
    return out


def _metric_summary(matrix: TransferMatrix) -> dict[str, Any]:
    s = summarize_matrix(matrix, SCALE_AWARE)
    out = s.to_dict()
    pairs = sorted(s.bidirectional_pairs, key=lambda p: -min(p.forward.low, p.backward.low))
    out["strongest_bidirectional_pairs"] = [json_safe(asdict(p)) for p in pairs[:3]]
    out["bidirectional_max_distance"] = max((p.layer_b - p.layer_a for p in pairs), default=None)
    out["layers_by_verdict"] = {v: [layer for layer, x in zip(s.layers, s.verdicts) if x == v]
                                for v in ("universal", "intermediate", "specialised", "not resolved")}
    out["largest_hub_excess"] = max(({"layer": layer, **json_safe(asdict(e))} for layer, e in zip(s.layers, s.hub_excess)
                                     if math.isfinite(e.value)), key=lambda x: x["value"], default=None)
    out["largest_break"] = max(({"layer": x.target, "from": x.source, "link": json_safe(asdict(x.value)),
                                 **json_safe(asdict(x.break_size))} for x in s.links if math.isfinite(x.break_size.value)),
                               key=lambda x: x["value"], default=None)
    out["universality_range"] = {"lowest": _extreme(s.layers, s.universality, min),
                                 "highest": _extreme(s.layers, s.universality, max)}
    return out


def _extreme(layers: list[int], estimates: list[Estimate], pick) -> dict | None:
    finite = [(e.value, layer, e) for layer, e in zip(layers, estimates) if math.isfinite(e.value)]
    if not finite:
        return None
    _, layer, e = pick(finite, key=lambda x: x[0])
    return {"layer": layer, **json_safe(asdict(e))}


def _persistence(matrix: TransferMatrix) -> dict[str, Any] | None:
    """Adjacent pairs (consecutive sampled layers, both directions): transfer, persistence, and beyond."""
    if not {"relative_transfer", "relative_persistence", "transfer_beyond_persistence"} <= set(matrix.metrics):
        return None
    n = len(matrix.sources)
    adjacent = np.zeros((n, n), dtype=bool)
    adjacent[np.arange(n - 1), np.arange(1, n)] = adjacent[np.arange(1, n), np.arange(n - 1)] = True
    reps = matrix.replicates
    out = {"n_pairs": int((adjacent & np.isfinite(matrix["relative_transfer"])).sum())}
    for name in ("relative_transfer", "transfer_beyond_persistence", "relative_persistence"):
        out[name] = asdict(pairs_mean(matrix[name], reps.get(name), adjacent))
    return json_safe(out)


def _layer_rows(m: ModelResults, transfer: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    s = transfer.get(SCALE_AWARE)
    for site in m.capture.sites:
        hook, layer = site.hook_name, site.layer
        ev = m.evals.get(hook)
        rec = ev.reconstruction if ev is not None else None
        row = {"layer": layer, "hook": hook, "relative_depth": layer / max(m.n_layers - 1, 1),
               "mean_norm": m.capture.mean_norm.get(hook),
               "fvu": getattr(rec, "fvu", None), "l0": getattr(rec, "l0", None),
               "dead_fraction": getattr(rec, "dead_fraction", None), "delta_ce": getattr(ev, "delta_ce", None),
               "variance_top1": getattr(ev, "variance_top1", None), "ood_fvu": getattr(ev, "ood_fvu", None), "ood_fvu_low": getattr(ev, "ood_fvu_low", None),
               "ood_fvu_high": getattr(ev, "ood_fvu_high", None),
               "kl_div": getattr(ev, "kl_div", None), "ce_loss_score": getattr(ev, "ce_loss_score", None)}
        i = s["layers"].index(layer) if s and layer in s["layers"] else None
        for key, figure in (("universality", "universality"), ("incoming", "universality_incoming"),
                            ("hub_excess", "hub_excess")):
            e = s[figure][i] if i is not None else {}
            row.update({key: e.get("value"), f"{key}_low": e.get("low"), f"{key}_high": e.get("high")})
        row["verdict"] = s["verdicts"][i] if i is not None else None
        rows.append(row)
    return rows


def _raw_ratio(matrix: TransferMatrix, transfer: dict[str, dict], rows: list[dict]) -> dict[str, Any]:
    """What the notes' raw ratio follows: the facts that show why it misleads (no bands, hubs or verdicts)."""
    W = matrix[RAW]
    off = np.isfinite(W) & ~np.eye(len(W), dtype=bool)
    universality = [float(W[i, off[i]].mean()) if off[i].any() else None for i in range(len(W))]
    norms = {row["layer"]: row["mean_norm"] for row in rows}
    layers = transfer[SCALE_AWARE]["layers"]
    norm = [norms.get(layer) for layer in layers]
    relative = [u["value"] for u in transfer[SCALE_AWARE]["universality"]]
    return {"universality": universality,
            "norm_rank_correlation": {RAW: _spearman(norm, universality), SCALE_AWARE: _spearman(norm, relative)},
            "n_pairs": int(off.sum()), "fraction_above_one": float(np.mean(W[off] > 1)) if off.any() else None,
            "max": float(W[off].max()) if off.any() else None}


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
    resampled = m.replicates.get(primary) if primary is not None else None
    for i, j in same_depth_pairs(m):
        s, t = m.sources[i], m.targets[j]
        row = {"source_layer": s.layer, "source_depth": s.relative_depth, "target_layer": t.layer,
               "target_depth": t.relative_depth, **{x: float(m[x][i, j]) for x in metrics}}
        for x in metrics:
            if x in m.intervals:
                row.update({f"{x}_low": float(m.intervals[x][0][i, j]), f"{x}_high": float(m.intervals[x][1][i, j])})
        if primary is not None and np.isfinite(m[primary][i]).any():
            best = int(np.nanargmax(m[primary][i]))
            row.update(best_target_layer=m.targets[best].layer, best_target_depth=m.targets[best].relative_depth,
                       best_value=float(m[primary][i, best]))
            if resampled is not None and np.isfinite(resampled[:, i]).all():
                # how often the same-depth target is the best one when the held-out documents are redrawn
                row["same_depth_best_fraction"] = float(np.mean(resampled[:, i].argmax(1) == j))
        by_depth.append(row)
    level = defaults.INTERVAL_LEVEL
    comparisons = {x: compare_same_depth(m, x, level) for x in metrics}
    fractions = [r["same_depth_best_fraction"] for r in by_depth if "same_depth_best_fraction" in r]
    return {"model_a": c.model_a, "model_b": c.model_b, "n_sources": len(m.sources), "n_targets": len(m.targets),
            "depth_comparison": {x: json_safe(asdict(comparisons[x])) for x in metrics},
            "same_minus_all": {x: json_safe({"value": comparisons[x].difference, "low": comparisons[x].difference_low,
                                             "high": comparisons[x].difference_high}) for x in metrics},
            "references": _references(m),
            "by_depth_metric": primary,
            "n_best_is_same_depth": sum(r.get("best_target_layer") == r["target_layer"] for r in by_depth),
            "n_best_is_same_depth_resolved": sum(f >= level for f in fractions) if fractions else None,
            "interval_percent": 100 * level,
            "by_depth": by_depth}


# --- report.md -------------------------------------------------------------------------------------


def _layers(layers: list[int]) -> str:
    """"layer 3", "layers 3 and 7", "layers 2 to 8, 10 and 12" (runs of three or more joined by "to")."""
    runs = _runs(layers, list(range(max(layers, default=0) + 1)))
    parts = [p for r in runs for p in ([f"{r[0]} to {r[-1]}"] if len(r) >= 3 else map(str, r))]
    text = parts[-1] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return ("layers " if len(layers) > 1 else "layer ") + text


def _runs(chosen: list[int], layers: list[int]) -> list[list[int]]:
    """`chosen` split into runs of consecutive entries of `layers` (the sampled layers)."""
    runs: list[list[int]] = []
    for layer in chosen:
        if runs and layers.index(layer) == layers.index(runs[-1][-1]) + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def _findings(s: dict, conv: dict, intervals: str | None = None) -> list[str]:
    """Sentences for the relative-transfer summary: each cites its figure with its interval, and a claim
    whose interval does not support it is reported as not resolved. `intervals`: how the matrix's
    intervals were drawn (its settings), quoted when there are none."""
    level, effect, t = f"{fmt(100 * s['level'])}%", fmt(s["min_effect"]), fmt(s["strong_threshold"])
    lines = [f"Off-diagonal relative transfer, entries clipped to [0, 1] before averaging: mean {iv(s['mean'])} "
             f"over {s['n_pairs']} pairs, median {fmt(s['median'])} (unclipped range {fmt(s['min'])} to "
             f"{fmt(s['max'])}); intervals are {level} bootstrap intervals over {s['n_replicates']} resamples of "
             "whole held-out sequences." if s["n_replicates"] else
             f"Off-diagonal relative transfer, entries clipped to [0, 1] before averaging: mean {iv(s['mean'])} over "
             f"{s['n_pairs']} pairs, median {fmt(s['median'])}. This matrix has no bootstrap resamples"
             + (f" (intervals: {intervals})" if intervals else "") + ", so no claim below is resolved."]
    by = s["layers_by_verdict"]
    named = lambda layers: _layers(layers) if layers else "none"  # noqa: E731
    lines.append(f"Universal layers (definition: the whole universality interval at or above "
                 f"{fmt(conv['universal_at'])}, where universality is a layer's mean clipped transfer to every other "
                 f"layer): {named(by['universal'])}. Specialised (whole interval below {fmt(conv['specialised_below'])}):"
                 f" {named(by['specialised'])}. Intermediate (whole interval between): {named(by['intermediate'])}. "
                 f"Not resolved at this sample size: {named(by['not resolved'])}.")
    lo, hi = s["universality_range"]["lowest"], s["universality_range"]["highest"]
    if lo and hi:
        lines.append(f"Universality ranges from {iv(lo)} (layer {lo['layer']}) to {iv(hi)} (layer {hi['layer']}).")
    hubs, top = s["hub_layers"], s["largest_hub_excess"]
    if hubs:
        excess = "; ".join(f"layer {h}: {iv(s['hub_excess'][s['layers'].index(h)])}" for h in hubs)
        runs = [r for r in _runs(hubs, s["layers"]) if len(r) >= 3]
        blocks = (f" Consecutive layers among them ({'; '.join(_layers(r) for r in runs)}) are regions of depth whose "
                  "dictionaries transfer better than distance predicts, rather than isolated hub layers." if runs else "")
        lines.append(f"{_layers(hubs).capitalize()} {'is a hub' if len(hubs) == 1 else 'are hubs'}: "
                     f"{'it transfers' if len(hubs) == 1 else 'they transfer'} better than "
                     f"{'its' if len(hubs) == 1 else 'their'} distances predict "
                     f"(excess over the fitted decay, simultaneous {level} interval: {excess}).{blocks}")
    elif top and top["value"] >= s["min_effect"]:
        lines.append(f"Hubs are not resolved at this sample size: the largest excess over the fitted decay, layer "
                     f"{top['layer']} at {iv(top)}, reaches {effect} but its simultaneous interval does not clear 0.")
    elif top:
        lines.append(f"No layer is a hub: none transfers better than its distances predict by {effect} or more "
                     f"(largest excess over the fitted decay: layer {top['layer']}, {iv(top)}).")
    d, big = s["divergence_layer"], s["largest_break"]
    if d is not None:
        link = next(x for x in s["links"] if x["target"] == d)
        lines.append(f"The adjacent-link chain breaks at layer {d} (relative depth {fmt(s['divergence_depth'])}): "
                     f"layer {link['source']}'s dictionary explains it at {iv(link['value'])}, "
                     f"{iv(link['break_size'])} below its neighbouring links after the chain's trend of "
                     f"{fmt(s['link_trend'])} per link (simultaneous {level} interval)."
                     + (f" Other breaks: {_layers([b for b in s['breaks'] if b != d])}." if len(s["breaks"]) > 1 else ""))
    elif big and big["value"] >= s["min_effect"]:
        lines.append(f"A break in the adjacent-link chain is not resolved at this sample size: the largest drop, at "
                     f"layer {big['layer']} ({iv(big)} below its neighbours), reaches {effect} but its simultaneous "
                     "interval does not clear 0.")
    elif big:
        lines.append(f"The adjacent-link chain has no break: no link drops {effect} or more below its neighbours beyond "
                     f"the chain's trend of {fmt(s['link_trend'])} per link (largest drop: layer {big['layer']}, "
                     f"{iv(big)}).")
    r, first, last = s["decay_rate"], s["distance_decay"][0] if s["distance_decay"] else None, \
        s["distance_decay"][-1] if s["distance_decay"] else None
    if first is not None and r["value"] is not None:
        where = (f"mean {iv(first['mean'])} at distance {first['distance']}, {iv(last['mean'])} at distance "
                 f"{last['distance']}")
        if r["low"] is not None and r["low"] > 0:
            lines.append(f"Transfer falls with distance: {iv(r)} per layer (least-squares slope); {where}.")
        elif r["high"] is not None and r["high"] < 0:
            lines.append(f"Transfer rises with distance: {iv(r)} per layer of decay (least-squares slope); {where}.")
        else:
            lines.append(f"Whether transfer falls with distance is not resolved at this sample size: decay rate "
                         f"{iv(r)} per layer; {where}.")
    pairs, unresolved = s["strongest_bidirectional_pairs"], s["strong_pairs_unresolved"]
    more = f"; {unresolved} more reach {t} in both directions but their intervals do not" if unresolved else ""
    if pairs:
        best = "; ".join(f"{p['layer_a']} and {p['layer_b']} ({iv(p['forward'])} forward, {iv(p['backward'])} backward)"
                         for p in pairs)
        lines.append(f"{len(s['bidirectional_pairs'])} pairs of layers transfer strongly in both directions (both "
                     f"intervals at or above {t}), at most {s['bidirectional_max_distance']} layers apart{more}. The "
                     f"strongest: {best}.")
    else:
        lines.append(f"No pair of layers is resolved as transferring strongly in both directions (both intervals at "
                     f"or above {t}){more}.")
    counts = ", ".join(f"{name} {c}" for name, c in s["band_counts"].items())
    lines.append(f"Bands of the {s['n_pairs']} entries (the notes' heatmap bands): {counts}; "
                 f"{s['band_unresolved']} of them have an interval that straddles a band edge.")
    return lines


def _persistence_lines(p: dict | None, min_effect: float) -> list[str]:
    if not p:
        return []
    rt, beyond, persist = p["relative_transfer"], p["transfer_beyond_persistence"], p["relative_persistence"]
    low, high = beyond["low"], beyond["high"]
    claim = ("so adjacent layers share features beyond the residual stream carrying the earlier layer forward"
             if low is not None and low > 0 and beyond["value"] >= min_effect else
             f"above zero but below {fmt(min_effect)}: nearly all of adjacent transfer is the residual stream carrying "
             "the earlier layer forward" if low is not None and low > 0 else
             "so adjacent transfer is below what persistence alone gives" if high is not None and high < 0 else
             "so whether adjacent layers share more than persistence carries is not resolved at this sample size")
    return [f"Persistence next to transfer: over the {p['n_pairs']} adjacent pairs (both directions) relative transfer "
            f"averages {iv(rt)}; the source dictionary's own output on its own layer, carried forward (persistence), "
            f"scores {iv(persist)} on the same scale. Transfer beyond persistence: {iv(beyond)}, {claim}."]


def _quality_lines(q: dict, facts: dict) -> list[str]:
    if q["verdict"] == "unknown":
        return ["**Dictionary quality: unknown.** No SAE was evaluated on held-out text, so nothing below can be "
                "checked against the dictionaries' own quality; treat every finding as tentative."]
    checks = []
    for figure, threshold in q["thresholds"].items():
        if not q["measured"][figure]:
            checks.append(f"{GATE_LABELS[figure]} not measured")
            continue
        bad = q["failing"][figure]
        checks.append(f"{GATE_LABELS[figure]} at most {fmt(threshold)}: "
                      + (f"{_layers(bad)} fail (worst {fmt(q['worst'][figure])})" if bad else
                         f"all {q['measured'][figure]} layers pass (worst {fmt(q['worst'][figure])})"))
    if q["verdict"] == "adequate":
        return [f"**Dictionary quality: adequate for the findings below.** Each SAE passes every gate on held-out "
                f"text ({'; '.join(checks)})."]
    trained = (f" They were trained {fmt(facts['train_steps'])} steps on {fmt(facts['train_tokens_per_site'])} tokens "
               "per site." if "train_steps" in facts else "")
    return [f"**Dictionary quality: not good enough; every finding below is tentative.** Gates on held-out text: "
            f"{'; '.join(checks)}.{trained} To change: {'; '.join(q['advice'])}. The thresholds and their reasons "
            "are in `layerflow/evaluate/gates.py`."]


CONCENTRATED = 0.25  # the 1% of held-out tokens farthest from the mean carrying more than this share of the variance


def _concentration_lines(rows: list[dict]) -> list[str]:
    """A warning where held-out FVU mostly measures a few tokens (evals' variance_top1)."""
    bad = [r for r in rows if (r.get("variance_top1") or 0) > CONCENTRATED]
    if not bad:
        return []
    worst = max(bad, key=lambda r: r["variance_top1"])
    ood = [r["ood_fvu"] for r in bad if r.get("ood_fvu") is not None]
    guide = (f" There the out-of-domain FVU ({fmt(min(ood))} to {fmt(max(ood))}) is the better guide to how well the "
             "dictionaries describe ordinary tokens." if ood else "")
    return [f"**Held-out FVU is carried by a few tokens at {_layers([r['layer'] for r in bad])}.** The 1% of held-out "
            f"tokens farthest from the mean carry up to {fmt(worst['variance_top1'])} of the variance (layer "
            f"{worst['layer']}; about 0.01 when it is spread evenly): tokens with activations far larger than the rest, "
            "such as attention sinks near the start of a sequence. FVU, a ratio of sums of squares, mostly measures "
            f"them there, and so do the transfer figures of those layers.{guide}", ""]


def _raw_lines(r: dict) -> list[str]:
    lines = []
    nr = r["norm_rank_correlation"]
    if nr[RAW] is not None and nr[SCALE_AWARE] is not None:
        lines.append(f"The notes' raw ratio follows the residual norm: the rank correlation of its per-layer mean with "
                     f"the mean activation norm is {fmt(nr[RAW])}, against {fmt(nr[SCALE_AWARE])} for relative "
                     "transfer.")
    if r["fraction_above_one"]:
        lines.append(f"It exceeds one for {fmt(r['fraction_above_one'])} of the {r['n_pairs']} pairs (max "
                     f"{fmt(r['max'])}), which would mean a dictionary explains another layer better than its own: "
                     "these values measure the target's smaller norm, not feature reuse.")
    lines.append("It therefore gets no bands, hubs or universal verdicts in this report.")
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
        observed = iv({"value": r["observed"], "low": r["observed_low"], "high": r["observed_high"]})
        if r.get("no_interval") and r["observed_low"] is None:
            observed = observed.replace("(no interval)", f"(no interval: {r['no_interval']})")
        if r["ceiling"] is None:
            lines.append(f"Scale of {label}: {what} {observed}, {floor}; no ceiling was measured.")
            continue
        ceiling = f"ceiling {fmt(r['ceiling'])} ({_layers(r['ceiling_layers'])})"
        low, high = r["observed_low"], r["observed_high"]
        position = iv({"value": r["position"], "low": r["position_low"], "high": r["position_high"]}) \
            if low is not None else fmt(r["position"])
        where = ("below the floor" if high is not None and high < r["floor"] else
                 "above the ceiling" if low is not None and low > r["ceiling"] else
                 f"{position} of the way from floor to ceiling" if r["position"] is not None else "")
        lines.append(f"Scale of {label}: {what} {observed}, {where}; {floor}, {ceiling}.")
    if lines:
        lines.append(f"Floor: the {own} rotated inside the layer's principal subspace (its sparsity, norms "
                     "and subspace, none of the data's features). Ceiling: a second SAE trained on the same layer with "
                     "another seed, compared with the first. Means over the layers named.")
    return lines


def _cross(c: dict) -> list[str]:
    lines = []
    for metric, d in c["depth_comparison"].items():
        same, every, label = d["same_depth_mean"], d["all_mean"], LABELS[metric][0].upper() + LABELS[metric][1:]
        if every is None:
            lines.append(f"{label}: not computed for any pair.")
            continue
        gap = c["same_minus_all"][metric]
        verdict = ("same depth is higher" if gap["low"] is not None and gap["low"] > 0 else
                   "same depth is lower" if gap["high"] is not None and gap["high"] < 0 else
                   "whether same depth is higher is not resolved at this sample size")
        lines.append(f"{label} (entries clipped to [0, 1]): same-depth pairs average {fmt(same)} "
                     f"(n={d['same_depth_n']}), all pairs "
                     f"{fmt(every)} (n={d['all_n']}); the difference is {iv(gap)}: {verdict}.")
    metric = c["by_depth_metric"]
    rows = [r for r in c["by_depth"] if r.get(metric) is not None]
    if rows:
        top, bottom = max(rows, key=lambda r: r[metric]), min(rows, key=lambda r: r[metric])
        cell = lambda r: iv({"value": r[metric], "low": r.get(f"{metric}_low"), "high": r.get(f"{metric}_high")})  # noqa: E731
        lines.append(f"By relative depth, same-depth {LABELS[metric]} ranges from {cell(bottom)} at depth "
                     f"{fmt(bottom['source_depth'])} (layer {bottom['source_layer']} on layer {bottom['target_layer']}) "
                     f"to {cell(top)} at depth {fmt(top['source_depth'])} (layer {top['source_layer']} on layer "
                     f"{top['target_layer']}).")
        resolved = c["n_best_is_same_depth_resolved"]
        lines.append(f"For {c['n_best_is_same_depth']} of the {c['n_sources']} source layers the best target by "
                     f"{LABELS[metric]} is the same-depth one"
                     + (f"; for {resolved} of them it stays the best in at least {fmt(c['interval_percent'])}% "
                        "of the resamples of the held-out documents." if resolved is not None else
                        " (no resamples: not resolved)."))
    lines += _scale(c.get("references") or {}, CROSS_SCALES, f"target ({c['model_b']}) layer's own SAE")
    return lines


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    columns = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]  # drop empty columns
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r[k] if isinstance(r.get(k), str) else fmt(r.get(k)) for k, _ in columns) + " |"
            for r in rows]
    return out


LAYER_COLUMNS = [("layer", "layer"), ("relative_depth", "depth"), ("mean_norm", "mean norm"), ("fvu", "FVU"),
                 ("l0", "L0"), ("dead_fraction", "dead"), ("ood_fvu", "FVU out of domain"), ("ood_fvu_low", "low"),
                 ("ood_fvu_high", "high"), ("delta_ce", "ΔCE"), ("kl_div", "KL"),
                 ("universality", "universality"), ("universality_low", "low"), ("universality_high", "high"),
                 ("verdict", "verdict"), ("hub_excess", "excess over decay"), ("incoming", "incoming")]
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
    b, d = conv["bands"], DEFINITIONS
    level = f"{fmt(conv['interval_percent'])}% " if conv.get("interval_percent") is not None else ""
    return [
        "## How to read this", "",
        "- **Relative transfer** (source layer i, target layer j): the variance of layer j explained by layer i's "
        "SAE, divided by what layer j's own SAE explains. Layer i's SAE reads layer j with layer j's mean and "
        "spread replaced by layer i's (both fit on the train split), and its output is mapped back, so neither "
        "norm growth nor the residual stream's large, depth-dependent mean is charged as error. One means layer "
        "i's dictionary is as good on j as j's own; it can be negative when the reconstruction is worse than the mean.",
        f"- **Intervals** ([low, high] after a figure): {level}{d['interval'][0].lower()}{d['interval'][1:]} A claim is "
        "made only when its interval supports it; otherwise the figure is reported as not resolved at this sample size.",
        f"- **Averages**: {d['bounded_mean']}",
        f"- **Universal** / **specialised** / **intermediate**: {d['universal']} / {d['specialised']} / "
        f"{d['intermediate']} Universality: {d['universality'][0].lower()}{d['universality'][1:]}",
        f"- **Hub**: {d['hub']} Hub excess: {d['hub_excess']} min_effect = {fmt(conv.get('min_effect'))}.",
        f"- **Break** (divergence point): {d['break']}",
        f"- **Strong pair**: {d['strong_pair']}",
        f"- **Persistence**: {d['persistence']} **Beyond persistence**: {d['transfer_beyond_persistence']}",
        f"- **Bands** (the notes' heatmap bands, for relative transfer only): HIGH >= {fmt(b['HIGH'])}, MODERATE >= "
        f"{fmt(b['MODERATE'])}, LOW >= {fmt(b['LOW'])}, SPECIALISED below.",
        "- **FVU**: fraction of variance unexplained by a layer's own SAE on held-out tokens (lower is better); "
        "**L0**: active latents per token; **dead**: fraction of latents that never fire; **FVU out of domain**: the "
        "same FVU on text of registers training did not emphasise (the shipped `ood` corpus: verse, another project's "
        "documentation and code, reference entries; low/high its interval); **ΔCE**: next-token loss "
        f"with the SAE spliced in, minus clean (nats). {d['quality_gates']}",
        "- **Why raw ratios mislead**: the notes' ratio divides raw reconstruction errors. The residual norm grows "
        "with depth, so errors on deep layers are larger simply because the numbers are larger: the ratio "
        "measures norm growth, and exceeds one when the target's norm is smaller. Relative transfer is measured "
        "against the target's own variance and its own dictionary, so it does not see the norm. Matching the norm "
        "alone is not enough either: residual streams carry a large mean that changes with depth, and an SAE "
        "handed the wrong mean is charged for the offset (the scale-only figures, kept in the matrix as "
        "relative_transfer_scale_only, read far layers as unrelated for that reason).", ""]


def findings_markdown(summary: dict) -> list[str]:
    """The Findings section, from summary.json alone (a test re-derives it from the file)."""
    conv, out = summary["conventions"], ["## Findings", ""]
    for name, m in summary["models"].items():
        out += [f"### `{name}`", ""] + _quality_lines(m["quality"], m["facts"]) + [""] + _concentration_lines(m["layers"])
        tentative = "(tentative) " if m["quality"]["verdict"] != "adequate" else ""
        if m["unreliable_sae_layers"]:
            worst = max(r["fvu"] for r in m["layers"] if r["fvu"] is not None)
            out += [f"**Warning**: the SAEs of {_layers(m['unreliable_sae_layers'])} explain none of their layer's "
                    f"variance (FVU >= {fmt(conv['unreliable_fvu'])}, up to {fmt(worst)}). Relative transfer divides "
                    "by that explained variance, so the transfer figures of these layers are not meaningful: "
                    "train them longer or with another schedule.", ""]
        if SCALE_AWARE in m["transfer"]:
            lines = _findings(m["transfer"][SCALE_AWARE], conv, m["facts"].get("intervals"))
            lines += _persistence_lines(m["persistence"], m["transfer"][SCALE_AWARE]["min_effect"])
            lines += _scale(m.get("references") or {})
            out += [f"- {tentative}{line}" for line in lines] + [""]
        else:
            out += ["No layer-to-layer transfer matrix with relative transfer yet.", ""]
        if m["raw_ratio"] is not None:
            out += ["Why the notes' raw ratio is not used:", ""] + [f"- {line}" for line in _raw_lines(m["raw_ratio"])]
            out += [""]
    for c in summary["cross_model"]:
        out += [f"### Cross-model: `{c['model_a']}` SAEs on `{c['model_b']}`", ""]
        out += [f"- {line}" for line in _cross(c)] + [""]
    return out


def write_report(results: RunResults, summary: dict, plots: dict[str, list[Path]], path: str | Path) -> Path:
    """report.md at `path` (atomically), from `build_summary(results)` and `make_plots`' files."""
    path, conv = Path(path), summary["conventions"]
    base, models = path.parent, summary["models"]
    out = ["# layerflow report", "",
           f"Run folder `{results.root}`: {len(models)} model(s), {len(summary['cross_model'])} cross-model pair(s). "
           "Every number below is in `summary.json` (with its definition) or the transfer matrices.", ""]
    findings = findings_markdown(summary)
    for name in models:  # the plots go under their model's findings
        plots_md = _plot_links(plots, [(f"transfer_heatmap:{name}", "transfer heatmap"),
                                       (f"universality:{name}", "universality"),
                                       (f"raw_vs_scale_aware:{name}", "raw vs scale-aware")], base)
        end = next((k for k, line in enumerate(findings) if line.startswith("### ") and k > findings.index(f"### `{name}`")),
                   len(findings))
        findings[end:end] = plots_md
    for c in summary["cross_model"]:
        pair = f"{c['model_a']}~{c['model_b']}"
        head = findings.index(f"### Cross-model: `{c['model_a']}` SAEs on `{c['model_b']}`")
        end = next((k for k, line in enumerate(findings) if line.startswith("### ") and k > head), len(findings))
        findings[end:end] = _table(c["by_depth"], CROSS_COLUMNS) + [""] + _plot_links(
            plots, [(f"cross_model:{pair}", "cross-model transfer")], base)
    out += findings
    general = _plot_links(plots, [("distance_decay", "distance decay"), ("sae_quality", "SAE quality"),
                                  ("activation_norms", "activation norms")], base)
    if general:
        out += ["## Plots", ""] + general
    out += ["## Per-layer metrics", "",
            "universality: mean (clipped) outgoing relative transfer, with its interval (low, high) and verdict; "
            "excess over decay: how much better the layer transfers than its distances predict (hub excess); "
            "incoming: the other layers' dictionaries on this layer.", ""]
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
            line += (f"; transfer on {fmt(f['transfer_tokens'])} held-out tokens per site, {fmt(f['n_replicates'])} "
                     "bootstrap resamples")
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
