"""Everything a finished (or partly finished) `layerflow run` directory holds, read back as objects.

The layout (files.py has every name; docs/run.md):

    DIR/run.json                         resolved config, provenance, per-stage status and timings
    DIR/activations/<model>/             capture store (capture.json last)
    DIR/saes/<model>/                    training run: plan.json, train.json, evals.json
    DIR/saes/<model>/<hook_name>/        one SAELens SAE folder per site
    DIR/transfer/<model>/                within-model matrix, its summary.json, matched_features.json
    DIR/transfer/<model_a>~<model_b>/    cross-model matrix, depth_comparison.json
    DIR/plots/, DIR/report.md, DIR/summary.json

Plots and the report read only this (`RunResults.load`), so `layerflow report DIR` can rebuild
them from the files alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerflow.errors import LayerflowError
from layerflow.evaluate.evals import SiteEval, read_eval_results
from layerflow.files import (ACTIVATIONS_DIR, CAPTURE_MANIFEST, CROSS_SEPARATOR, DEPTH_FILE, EVAL_JSON, MATRIX_JSON,
                             RUN_FILE, SAE_DIR, SUMMARY_FILE, TRAIN_MANIFEST, TRANSFER_DIR, CaptureManifest,
                             TrainManifest)
from layerflow.transfer.matrix import TransferMatrix

@dataclass
class ModelResults:
    """One model's results. Anything its stages have not written yet is None / empty."""

    name: str
    n_layers: int
    capture: CaptureManifest  # per-site mean activation norms in .mean_norm
    train: TrainManifest | None = None
    evals: dict[str, SiteEval] = field(default_factory=dict)  # hook_name -> held-out figures
    transfer: TransferMatrix | None = None  # "within_model"
    transfer_summaries: dict[str, dict] = field(default_factory=dict)  # metric -> transfer.summary.TransferSummary.to_dict()

    @property
    def hooks(self) -> list[str]:
        """Captured hooks in site order (by layer)."""
        return [s.hook_name for s in self.capture.sites]

    def layer_of(self, hook: str) -> int:
        return next(s.layer for s in self.capture.sites if s.hook_name == hook)


@dataclass
class CrossModelResults:
    model_a: str
    model_b: str
    matrix: TransferMatrix  # "cross_model": sources from model_a, targets from model_b
    depth_comparison: dict[str, dict]  # metric -> transfer.cross_model.DepthComparison as a dict


@dataclass
class RunResults:
    root: Path
    run: dict[str, Any]  # run.json
    models: dict[str, ModelResults]
    cross: list[CrossModelResults]

    @classmethod
    def load(cls, root: str | Path) -> "RunResults":
        root = Path(root)
        if not (root / RUN_FILE).exists():
            raise LayerflowError(f"'{root}' is not a layerflow run directory (no {RUN_FILE}). "
                                 "Create one with `layerflow run --out DIR`.")
        run = json.loads((root / RUN_FILE).read_text())
        models = {}
        for name in run["config"]["models"]:
            name = name["name"] if isinstance(name, dict) else name
            capture_file = root / ACTIVATIONS_DIR / name / CAPTURE_MANIFEST
            if not capture_file.exists():
                continue
            capture = CaptureManifest.read(capture_file.parent)
            result = ModelResults(name, int(capture.model["n_layers"]), capture)
            saes = root / SAE_DIR / name
            if (saes / TRAIN_MANIFEST).exists():
                result.train = TrainManifest.read(saes)
            if (saes / EVAL_JSON).exists():
                result.evals = read_eval_results(saes)
            within = root / TRANSFER_DIR / name
            if (within / MATRIX_JSON).exists():
                result.transfer = TransferMatrix.read(within)
                if (within / SUMMARY_FILE).exists():
                    result.transfer_summaries = json.loads((within / SUMMARY_FILE).read_text())["summaries"]
            models[name] = result
        cross = []
        for folder in sorted((root / TRANSFER_DIR).glob(f"*{CROSS_SEPARATOR}*")):
            if (folder / MATRIX_JSON).exists():
                a, b = folder.name.split(CROSS_SEPARATOR)
                depth = json.loads((folder / DEPTH_FILE).read_text())
                cross.append(CrossModelResults(a, b, TransferMatrix.read(folder), depth))
        return cls(root, run, models, cross)
