"""`layerflow run`: one experiment config -> capture, train, eval, transfer, cross-model, report.

Each stage hands the next one files with a manifest (files.py has the layout), so a re-run
skips every stage whose manifest is there and redoes the rest; an interrupted stage resumes
from its own checkpoints (capture shards, training checkpoints). `DIR/run.json` holds the
resolved config, provenance (versions, weight sources, seeds, machine) and, per stage, its
status and wall time; it is rewritten after every stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from layerflow.capture.writer import CaptureConfig, capture
from layerflow.errors import LayerflowError, did_you_mean
from layerflow.evaluate.evals import evaluate_run
from layerflow.experiment import ExperimentConfig
from layerflow.files import (ACTIVATIONS_DIR, CAPTURE_MANIFEST, CEILING_DIR, EVAL_JSON, MATRIX_JSON, PLOTS_DIR,
                             REPORT_FILE, RUN, RUN_FILE, SAE_DIR, TRAIN_MANIFEST, TRANSFER_DIR, CaptureManifest,
                             cross_dir_name, prepare_out_dir, write_json)
from layerflow.models.load import load_model
from layerflow.models.sites import parse_kind
from layerflow.report.findings import report_run
from layerflow.report.plots import make_plots
from layerflow.results import RunResults
from layerflow.train.config import TrainConfig
from layerflow.train.trainer import train
from layerflow.transfer.matrix import is_current_matrix
from layerflow.transfer.runs import cross_model_runs, spread_over_depth, transfer_run
from layerflow.transfer.within import TransferOptions

STAGES = ("capture", "train", "eval", "transfer", "cross_model", "report")
SCHEMA_VERSION = 1

# progress(stage, item, done, total): item is the model (or model pair) the stage works on
Progress = Callable[[str, str, int, int | None], None]


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    until: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    load: Callable[[str], Any] | None = None,  # zoo name -> LoadedModel (default models.load_model)
) -> dict[str, Any]:
    """Run (or resume) the experiment in `out_dir`, stopping after stage `until`; returns run.json."""
    if until is not None and until not in STAGES:
        raise LayerflowError(f"Unknown stage '{until}'. {did_you_mean(until, list(STAGES))}")
    root = Path(out_dir)
    record = _open_run(root, cfg, overwrite)
    models = _ModelCache(load, cfg.device)
    report = progress or (lambda stage, item, done, total: None)
    ran_any = False
    for stage in STAGES[:STAGES.index(until) + 1] if until else STAGES:
        work = _stage_work(stage, cfg, root, models, report)
        pending = [(item, step) for item, step, finished in work if not finished]
        if stage == "report":
            pending = [(item, step) for item, step, finished in work if not finished or ran_any]
        if not work:
            record["stages"][stage] = {"status": "not needed", "seconds": 0.0}
        elif pending:
            record["stages"][stage] = {"status": "running"}
            _write_record(root, record)  # the report stage quotes run.json while it runs
            started = time.perf_counter()
            for item, step in pending:
                report(stage, item, 0, None)
                step()
            record["stages"][stage] = {"status": "done", "seconds": round(time.perf_counter() - started, 2),
                                       "finished_at": _now(), "last_invocation": "ran"}
            ran_any = True
        else:
            record["stages"][stage].update(last_invocation="skipped (finished earlier)")
        if stage == "capture":
            record["provenance"]["weights"] = _weight_sources(root, cfg)
        _write_record(root, record)
    models.clear()
    return record


# ------------------------------------------------------------------ run.json


def _open_run(root: Path, cfg: ExperimentConfig, overwrite: bool) -> dict[str, Any]:
    """run.json of the run in `root`: the one there (same config), or a new one."""
    config = cfg.to_dict()
    if prepare_out_dir(root, RUN, config, overwrite) != "fresh":
        return json.loads((root / RUN_FILE).read_text())
    record = {"schema_version": SCHEMA_VERSION, "config": config, "provenance": _provenance(cfg),
              "stages": {stage: {"status": "pending"} for stage in STAGES}}
    _write_record(root, record)
    return record


def _write_record(root: Path, record: dict) -> None:
    write_json(root / RUN_FILE, record, indent=1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _provenance(cfg: ExperimentConfig) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for package in ("layerflow", "torch", "transformer-lens", "sae-lens", "transformers", "numpy", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "python": platform.python_version(), "seed": cfg.seed,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": cfg.device},
            "started_at": _now()}


def _weight_sources(root: Path, cfg: ExperimentConfig) -> dict[str, str]:
    sources = {}
    for m in cfg.models:
        folder = root / ACTIVATIONS_DIR / m.name
        if (folder / CAPTURE_MANIFEST).exists():
            sources[m.name] = CaptureManifest.read(folder).model["weights_source"]
    return sources


# ------------------------------------------------------------------ stages


class _ModelCache:
    """Loads models on demand and keeps at most two (a cross-model pair) in memory."""

    def __init__(self, load: Callable[[str], Any] | None, device: str):
        self.load = load or (lambda name: load_model(name, device=device))
        self.loaded: dict[str, Any] = {}

    def get(self, *names: str) -> Any:
        for name in list(self.loaded):
            if name not in names:
                del self.loaded[name]
        for name in names:
            if name not in self.loaded:
                self.loaded[name] = self.load(name)
        return self.loaded[names[0]] if len(names) == 1 else tuple(self.loaded[n] for n in names)

    def clear(self) -> None:
        self.loaded.clear()


def _stage_work(stage: str, cfg: ExperimentConfig, root: Path, models: _ModelCache,
                report: Progress) -> list[tuple[str, Callable[[], Any], bool]]:
    """[(item, do_it, finished)] for one stage: one item per model (or ordered model pair)."""
    names = [m.name for m in cfg.models]
    if stage == "capture":
        return [(m.name, lambda m=m: _capture(cfg, m, root, models, report),
                 (root / ACTIVATIONS_DIR / m.name / CAPTURE_MANIFEST).exists()) for m in cfg.models]
    if stage == "train":
        twins = [(f"{n} (seed twins)", lambda n=n: _train_twins(cfg, n, root, report),
                  (root / CEILING_DIR / n / TRAIN_MANIFEST).exists()) for n in names if cfg.transfer.reference_sites]
        return [(n, lambda n=n: _train(cfg, n, root, models, report),
                 (root / SAE_DIR / n / TRAIN_MANIFEST).exists()) for n in names] + twins
    if stage == "eval":
        return [(n, lambda n=n: _evaluate(cfg, n, root, models), (root / SAE_DIR / n / EVAL_JSON).exists())
                for n in names]
    if stage == "transfer":
        return [(n, lambda n=n: _transfer(cfg, n, root, models, report),
                 is_current_matrix(root / TRANSFER_DIR / n / MATRIX_JSON)) for n in names]
    if stage == "cross_model":
        pairs = [(a, b) for a in names for b in names if a != b]
        return [(f"{a} -> {b}", lambda a=a, b=b: _cross_model(cfg, a, b, root, models),
                 is_current_matrix(root / TRANSFER_DIR / cross_dir_name(a, b) / MATRIX_JSON)) for a, b in pairs]
    return [("report", lambda: write_outputs(root), (root / REPORT_FILE).exists())]


def _capture(cfg: ExperimentConfig, entry, root: Path, models: _ModelCache, report: Progress) -> None:
    c = cfg.capture
    capture_cfg = CaptureConfig(entry.name, cfg.layers(entry), [parse_kind(k) for k in c.sites], n_tokens=c.tokens,
                                context_size=c.context_size, source=c.source, holdout_fraction=c.holdout,
                                dtype=c.dtype, batch_size=c.batch_size, seed=cfg.seed, device=cfg.device)
    capture(capture_cfg, root / ACTIVATIONS_DIR / entry.name, loaded=models.get(entry.name),
            progress=lambda done, total: report("capture", entry.name, done, total))


def _train(cfg: ExperimentConfig, name: str, root: Path, models: _ModelCache, report: Progress) -> None:
    train(train_config(cfg, name, root), root / SAE_DIR / name, evaluate=False, sae_subdir="",
          progress=lambda done, total: report("train", name, done, total))


def _train_twins(cfg: ExperimentConfig, name: str, root: Path, report: Progress) -> None:
    """Second-seed SAEs at a few sites spread over depth: the ceilings of the transfer figures."""
    hooks = [s.hook_name for s in CaptureManifest.read(root / ACTIVATIONS_DIR / name).sites]
    twin_cfg = dataclasses.replace(train_config(cfg, name, root), hooks=spread_over_depth(hooks, cfg.transfer.reference_sites),
                                   seed=cfg.seed + 1)
    train(twin_cfg, root / CEILING_DIR / name, evaluate=False, sae_subdir="",
          progress=lambda done, total: report("train", f"{name} (seed twins)", done, total))


def train_config(cfg: ExperimentConfig, name: str, root: Path) -> TrainConfig:
    t = cfg.train
    return TrainConfig(str((root / ACTIVATIONS_DIR / name).resolve()), schedule=t.schedule(), steps=t.steps,
                       epochs=t.epochs, batch_tokens=t.batch_tokens, checkpoint_every=t.checkpoint_every, seed=cfg.seed)


def _evaluate(cfg: ExperimentConfig, name: str, root: Path, models: _ModelCache) -> None:
    model_eval = cfg.eval.spliced or cfg.eval.ood_tokens > 0
    evaluate_run(root / SAE_DIR / name, model_eval=model_eval, spliced_max_tokens=cfg.eval.spliced_tokens,
                 spliced=cfg.eval.spliced, ood_tokens=cfg.eval.ood_tokens, loaded=models.get(name) if model_eval else None)


def _transfer(cfg: ExperimentConfig, name: str, root: Path, models: _ModelCache, report: Progress) -> None:
    t = cfg.transfer
    options = TransferOptions(max_tokens=t.max_tokens, top_k=t.top_k, match_distance=t.match_distance, spliced=t.spliced,
                              exclude_special_tokens=t.exclude_special_tokens, seed=cfg.seed, device=cfg.device,
                              reference_sites=t.reference_sites)
    twins = root / CEILING_DIR / name
    transfer_run(root / SAE_DIR / name, out_dir=root / TRANSFER_DIR / name, options=options,
                 twins=twins if (twins / TRAIN_MANIFEST).exists() else None,
                 loaded=models.get(name) if options.spliced else None,
                 progress=lambda done, total: report("transfer", name, done, total))


def _cross_model(cfg: ExperimentConfig, a: str, b: str, root: Path, models: _ModelCache) -> None:
    twins = root / CEILING_DIR / b
    cross_model_runs(root / SAE_DIR / a, root / SAE_DIR / b, out_dir=root / TRANSFER_DIR / cross_dir_name(a, b),
                     twins_b=twins if (twins / TRAIN_MANIFEST).exists() else None,
                     source=cfg.cross_model.source, max_words=cfg.cross_model.words,
                     context_size=cfg.capture.context_size, loaded=models.get(a, b), seed=cfg.seed,
                     match_pairs=cfg.cross_model.match_pairs)


def write_outputs(root: str | Path) -> dict[str, Any]:
    """Plots, summary.json and report.md from the files of a run (what `layerflow report` does)."""
    root = Path(root)
    plots = make_plots(RunResults.load(root), root / PLOTS_DIR)
    summary_path, report_path = report_run(root, plots)
    return {"plots": plots, "summary": summary_path, "report": report_path}


__all__ = ["STAGES", "run_experiment", "write_outputs"]
