"""Typed transfer results: one pair's metrics, and a sources x targets matrix of them, on disk.

A metric is a field of `WithinModelPair` or `CrossModelPair`; its `doc` metadata states what it
measures and which direction is better. `TransferMatrix` holds one [sources, targets] array per
metric plus the identity of every site, and round-trips exactly through JSON (schema below) and
to a long-format CSV (one row per pair).

JSON schema (`schema_version` 3; older versions are refused: 1 matched the norm only, 2 had no
resamples and read the held-out split's first block):

    {"schema": "layerflow.transfer_matrix", "schema_version": 3,
     "kind": "within_model" | "cross_model",
     "sources": [site...], "targets": [site...],         # site: model, hook_name, layer, n_layers, kind
     "metrics": {name: [[value per target] per source]},  # NaN written as null
     "metric_docs": {name: text},
     "settings": {...},                                    # how it was computed (tokens, options)
     "references": {"floor": {metric: {hook: value}}, "ceiling": {...}, "layers": {hook: layer}, "how": {...}},
                                                           # optional: `references.py`
     "intervals": {metric: {"low": [[...]], "high": [[...]]}},  # optional: bootstrap intervals (settings.intervals)
     "replicates": {"file": "<stem>.bootstrap.npz", "metrics": [...], "n": B}}  # optional: see below

The bootstrap resamples themselves, `replicates[metric]` = [B, sources, targets] float64, are in an
.npz file beside the JSON (written before it): every figure derived from the matrix (universality,
decay rate, hubs, divergence) gets its interval by being computed on each resample
(`transfer.summary`). `read` loads them; `from_dict` (the JSON alone) leaves them empty.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from layerflow.errors import LayerflowError, did_you_mean
from layerflow.files import MATRIX_JSON, REPLICATES_SUFFIX, atomic, atomic_write_text, write_json
from layerflow.models.sites import Site

SCHEMA = "layerflow.transfer_matrix"
SCHEMA_VERSION = 3  # 3: bootstrap resamples; 2: explained_variance / relative_transfer match the mean and spread
SITE_KEYS = ("model", "hook_name", "layer", "n_layers", "kind")  # a source or target site in the JSON


def _metric(doc: str) -> Any:
    return field(default=None, metadata={"doc": doc})


@dataclass(frozen=True)
class WithinModelPair:
    """SAE trained at `source`, applied to the held-out activations of `target` (same tokens)."""

    source: Site
    target: Site
    # The notes' metrics, kept for continuity (raw units; confounded by norm growth).
    transfer_recon_ratio: float = _metric(
        "Notes file 001: source loss / target loss = MSE(SAE_i on i) / MSE(SAE_i on j). Higher is better; 1 on the diagonal. Raw MSEs: falls with residual norm growth even when features are shared.")
    transfer_recon_ratio_inverse: float = _metric(
        "Notes file 002: target loss / source loss = MSE(SAE_i on j) / MSE(SAE_i on i). Lower is better; the reciprocal of transfer_recon_ratio.")
    feature_variance_ratio: float = _metric(
        "Notes: mean variance (over tokens) of SAE_i's top-k latents on layer j / the same on layer i; top-k by variance on i. 1 = the features vary as much on j as on i.")
    top_k_spearman: float = _metric(
        "Notes: Spearman rank correlation between the top-k latents' variances on i and on j. Higher = the same features dominate.")
    decoder_similarity: float = _metric(
        "Mean, over SAE_i's top-k latents (by variance on i), of the best cosine between its decoder direction and any of SAE_j's. The notes left this undefined; this is layerflow's definition.")
    # Explained variance at the target, with the target's own mean.
    explained_variance_raw: float = _metric(
        "EV of SAE_i applied to layer j's raw activations: 1 - E||x_j - x_hat||^2 / E||x_j - mean_j||^2. Higher is better.")
    explained_variance_scale_only: float = _metric(
        "EV of SAE_i on layer j, norm matched only: x_j times E||x_i|| / E||x_j|| before encoding, the reconstruction divided by it. The primary figure before schema 2; it hands SAE_i the wrong mean and charges the offset as error, so it reads far pairs as unrelated when their means differ.")
    explained_variance: float = _metric(
        "EV of SAE_i on layer j, mean and spread matched: x_j -> (x_j - mu_j) s_i / s_j + mu_i -> SAE_i -> mapped back by the inverse, with mu and s = sqrt(E||x - mu||^2) fit on the train split. The primary transfer figure.")
    relative_transfer_raw: float = _metric(
        "explained_variance_raw / EV(SAE_j on j): the fraction of the target's own dictionary's performance. 1 on the diagonal.")
    relative_transfer_scale_only: float = _metric(
        "explained_variance_scale_only / EV(SAE_j on j). For continuity with schema 1's relative_transfer.")
    relative_transfer: float = _metric(
        "explained_variance (mean and spread matched) / EV(SAE_j on j). The primary figure: 1 on the diagonal; may exceed 1.")
    delta_fvu: float = _metric(
        "FVU(SAE_i on j, matched) - FVU(SAE_j on j). 0 on the diagonal; lower is better.")
    # Persistence: how much of layer j is layer i carried forward.
    persistence_ev_identity: float = _metric(
        "EV of x_i as a prediction of x_j (identity map): 1 - E||x_j - x_i||^2 / Var_j. Negative when norms differ. No dictionary.")
    persistence_ev_scalar: float = _metric(
        "EV of the best least-squares scalar map mean_j + a (x_i - mean_i), fit on the same held-out tokens (a descriptive r^2; no dictionary).")
    persistence_ev_through_source: float = _metric(
        "The like-for-like baseline: EV on x_j of dictionary i's own output on layer i, carried to j by the scalar map fit on the train split, mu_j + a (D_i(x_i) - mu_i). It goes through the same dictionary and statistics as explained_variance and differs only in the input (layer i itself, not layer j read in i's units). Transcoders: the output sites y_i, y_j and T_i(x_in_i).")
    relative_persistence: float = _metric(
        "persistence_ev_through_source / EV(D_j on j). 1 on the diagonal.")
    transfer_beyond_persistence: float = _metric(
        "relative_transfer - relative_persistence: how much better dictionary i explains layer j when it reads layer j than when layer i's own content is carried forward. 0 on the diagonal and for a layer that is a copy (plus a constant) of another; > 0 = feature reuse beyond persistence.")
    # The source SAE's behaviour on the target (matched).
    l0: float = _metric("Mean active latents per token of SAE_i on layer j (matched).")
    dead_fraction: float = _metric("Fraction of SAE_i's latents that never fire on layer j (matched).")
    l2_ratio: float = _metric("Mean ||x_hat|| / ||x_j|| of SAE_i on layer j (matched). 1 = no shrinkage.")
    # Feature-level agreement between the two dictionaries.
    decoder_top1_cosine_mean: float = _metric(
        "Mean over all of SAE_i's latents of the best decoder cosine with any of SAE_j's latents.")
    decoder_top1_cosine_median: float = _metric("Median of the same distribution.")
    decoder_matched_fraction: float = _metric(
        "Hungarian one-to-one matching of decoder directions: fraction of SAE_i's latents whose match reaches a cosine of 0.7 and beats the 99th percentile of matches to SAE_j rotated inside site j's principal subspace (settings.decoder_null). Computed for pairs within the matching distance, else null.")
    activation_matched_fraction: float = _metric(
        "Hungarian matching on activation correlation over the shared held-out tokens: fraction of SAE_i's live latents whose partner's correlation beats the null (SAE_j's tokens shifted by whole sequences). Within the matching distance, else null.")
    feature_flow_ev: float = _metric(
        "Feature Flow's transition (Laptev et al. 2025): each latent of SAE_i sent to its top-1 decoder-cosine partner in SAE_j; EV on x_j of decode_j(T encode_i(x_i)), latents times s_j / s_i. SAEs within the matching distance, else null.")
    # Optional: the source SAE spliced into the model at the target site.
    spliced_delta_ce: float = _metric("CE (nats) with SAE_i's matched reconstruction spliced in at site j, minus clean CE. Optional.")
    spliced_kl: float = _metric("Mean KL(clean || spliced) with SAE_i spliced in at site j. Optional.")


@dataclass(frozen=True)
class CrossModelPair:
    """SAE of model A's `source` site applied to model B's `target` site through an affine stitch."""

    source: Site
    target: Site
    stitched_explained_variance: float = _metric(
        "EV on x_B (held-out words) of: map x_B into A's space (affine, fit on the train split), encode/decode with SAE_A, map back. Higher is better.")
    stitch_only_explained_variance: float = _metric(
        "EV on x_B of the round trip through the two affine maps alone, no SAE: the ceiling for stitched EV.")
    target_sae_explained_variance: float = _metric("EV of SAE_B on x_B at the same held-out words.")
    relative_transfer: float = _metric("stitched_explained_variance / target_sae_explained_variance.")
    stitched_beyond_stitch: float = _metric(
        "stitched_explained_variance - stitch_only_explained_variance: what the SAE in the middle adds to (or loses from) the stitch alone. The stitch is affine, so it carries the means and spreads as the within-model match does.")
    cka: float = _metric(
        "Debiased linear CKA (unbiased HSIC, Song et al. 2012) between SAE_A's latents on x_A and SAE_B's latents on x_B at the same held-out words. About 0 for unrelated codes however many latents (the plain estimator gives about 0.6 for independent 4096-latent codes on 2048 words).")
    cka_p_value: float = _metric("Permutation p-value of the CKA: whole held-out documents shuffled on one side.")
    matched_feature_correlation_mean: float = _metric(
        "Features matched one-to-one by activation correlation on train words; mean of their held-out correlations.")
    fraction_features_with_partner: float = _metric(
        "Fraction of SAE_A's live features whose matched partner's held-out correlation is significant (whole held-out documents permuted, Benjamini-Hochberg at 0.05) and at least 0.5.")
    paired_svcca: float = _metric(
        "Lan et al.'s (2024) paired SVCCA: the significant matched pairs, less those whose features fire mostly on junk words (punctuation, a chunk's first word); SVCCA between their decoder rows (each side reduced to the singular directions holding 99% of its variance, at most a quarter of the pairs). Matched pairs only.")
    paired_svcca_p_value: float = _metric("p-value of paired_svcca against shuffles of the pairing.")
    paired_svcca_pairs: float = _metric("Feature pairs paired_svcca used.")
    paired_svcca_components: float = _metric("Singular directions SVCCA kept (the smaller side); Lan et al.'s public code keeps one by mistake.")


PAIR_TYPES = {"within_model": WithinModelPair, "cross_model": CrossModelPair}


def metric_names(kind: str) -> list[str]:
    return [f.name for f in fields(PAIR_TYPES[kind]) if f.name not in ("source", "target")]


def metric_docs(kind: str) -> dict[str, str]:
    return {f.name: f.metadata["doc"] for f in fields(PAIR_TYPES[kind]) if f.name not in ("source", "target")}


@dataclass
class TransferMatrix:
    kind: str  # "within_model" or "cross_model"
    sources: list[Site]
    targets: list[Site]
    metrics: dict[str, np.ndarray]  # name -> float64 [len(sources), len(targets)]; NaN = not computed
    settings: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. matched feature pairs; not serialized here
    references: dict[str, Any] = field(default_factory=dict)  # floors and ceilings (`references.References.to_dict`)
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # metric -> (low, high)
    replicates: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [B, sources, targets] resamples

    def __post_init__(self) -> None:
        if self.kind not in PAIR_TYPES:
            raise LayerflowError(f"Unknown transfer kind '{self.kind}'. {did_you_mean(self.kind, list(PAIR_TYPES))}")
        valid = metric_names(self.kind)
        shape = (len(self.sources), len(self.targets))
        for name, values in self.metrics.items():
            if name not in valid:
                raise LayerflowError(f"'{name}' is not a {self.kind} metric. {did_you_mean(name, valid)}")
            if values.shape != shape:
                raise ValueError(f"metric {name} has shape {values.shape}, expected {shape}")
        self.metrics = {n: np.asarray(self.metrics[n], dtype=np.float64) for n in valid if n in self.metrics}

    def __getitem__(self, metric: str) -> np.ndarray:
        if metric not in self.metrics:
            raise LayerflowError(f"No metric '{metric}' in this matrix. {did_you_mean(metric, list(self.metrics))}")
        return self.metrics[metric]

    def pair(self, i: int, j: int) -> WithinModelPair | CrossModelPair:
        values = {n: _to_float(m[i, j]) for n, m in self.metrics.items()}
        return PAIR_TYPES[self.kind](self.sources[i], self.targets[j], **values)

    def index(self, hook_or_layer: str | int, side: str = "source") -> int:
        sites = self.sources if side == "source" else self.targets
        for i, s in enumerate(sites):
            if hook_or_layer in (s.hook_name, s.layer):
                return i
        raise LayerflowError(f"No {side} site '{hook_or_layer}'. Valid: {', '.join(s.hook_name for s in sites)}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": self.kind,
            "sources": [s.to_dict(SITE_KEYS) for s in self.sources], "targets": [s.to_dict(SITE_KEYS) for s in self.targets],
            "metrics": {n: _rows(m) for n, m in self.metrics.items()},
            "metric_docs": {n: d for n, d in metric_docs(self.kind).items() if n in self.metrics},
            "settings": self.settings,
            **({"references": self.references} if self.references else {}),
            **({"intervals": {n: {"low": _rows(lo), "high": _rows(hi)} for n, (lo, hi) in self.intervals.items()}}
               if self.intervals else {}),
            **({"replicates": {"metrics": list(self.replicates), "n": len(next(iter(self.replicates.values())))}}
               if self.replicates else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransferMatrix":
        if data.get("schema") != SCHEMA:
            raise LayerflowError(f"Not a layerflow transfer matrix (schema {data.get('schema')!r}, expected {SCHEMA!r}).")
        if data.get("schema_version") != SCHEMA_VERSION:
            old = {1: " (version 1 matched the norm but not the mean)",
                   2: " (version 2 has no bootstrap resamples, so its summaries have no intervals)"}.get(
                data.get("schema_version"), "")
            raise LayerflowError(f"Transfer matrix schema version {data.get('schema_version')} is not supported{old}: "
                                 f"this layerflow reads version {SCHEMA_VERSION}. Recompute it with `layerflow transfer` "
                                 f"(or rerun `layerflow run`).")
        metrics = {n: _array(m) for n, m in data["metrics"].items()}
        intervals = {n: (_array(b["low"]), _array(b["high"])) for n, b in data.get("intervals", {}).items()}
        return cls(data["kind"], [Site.from_dict(s) for s in data["sources"]], [Site.from_dict(s) for s in data["targets"]],
                   metrics, data.get("settings", {}), references=data.get("references", {}), intervals=intervals)

    def to_csv(self) -> str:
        """One row per pair: the sites, every metric, then each interval as <metric>_low, <metric>_high."""
        text = io.StringIO()
        columns = {**self.metrics, **{f"{n}_{side}": b[k] for n, b in self.intervals.items()
                                      for k, side in enumerate(("low", "high"))}}
        writer = csv.writer(text)
        writer.writerow(["source_model", "source_hook", "source_layer", "target_model", "target_hook",
                         "target_layer", *columns])
        for i, s in enumerate(self.sources):
            for j, t in enumerate(self.targets):
                writer.writerow([s.model, s.hook_name, s.layer, t.model, t.hook_name, t.layer,
                                 *("" if math.isnan(v) else repr(float(v)) for v in (c[i, j] for c in columns.values()))])
        return text.getvalue()

    def write(self, folder: str | Path, stem: str = "transfer_matrix") -> list[Path]:
        """`<stem>.json` and `<stem>.csv` in `folder` (and the resamples' .npz), each written to a
        temporary name and renamed, the JSON last. Returns the paths, the JSON first."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
        if self.replicates:
            with atomic(_replicates_path(json_path)) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **self.replicates)
        atomic_write_text(csv_path, self.to_csv())
        write_json(json_path, self.to_dict(), indent=1)
        return [json_path, csv_path, *([_replicates_path(json_path)] if self.replicates else [])]

    @classmethod
    def read(cls, path: str | Path) -> "TransferMatrix":
        path = Path(path)
        path = path / MATRIX_JSON if path.is_dir() else path
        if not path.exists():
            raise LayerflowError(f"No transfer matrix at '{path}'. Run `layerflow transfer` first.")
        matrix = cls.from_dict(json.loads(path.read_text()))
        if _replicates_path(path).exists():
            with np.load(_replicates_path(path)) as f:
                matrix.replicates = {n: f[n] for n in f.files}
        return matrix

    def equals(self, other: "TransferMatrix") -> bool:
        return (self.kind == other.kind and self.sources == other.sources and self.targets == other.targets
                and self.metrics.keys() == other.metrics.keys() and self.settings == other.settings
                and self.references == other.references and self.intervals.keys() == other.intervals.keys()
                and all(np.array_equal(a, b, equal_nan=True) for n in self.intervals
                        for a, b in zip(self.intervals[n], other.intervals[n]))
                and all(np.array_equal(self.metrics[n], other.metrics[n], equal_nan=True) for n in self.metrics)
                and self.replicates.keys() == other.replicates.keys()
                and all(np.array_equal(self.replicates[n], other.replicates[n], equal_nan=True) for n in self.replicates))


def _replicates_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + REPLICATES_SUFFIX)


def _rows(m: np.ndarray) -> list[list[float | None]]:
    return [[_to_float(v) for v in row] for row in m]


def _array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def is_current_matrix(path: str | Path) -> bool:
    """Whether a finished matrix of this schema version is at `path` (an older one is to be recomputed)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("schema_version") == SCHEMA_VERSION
    except (OSError, ValueError):
        return False


def _to_float(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
