"""SAE quality per CPU-minute: training settings, and token budgets against SAELens' own trainer.

Two modes, both on the default study's settings (`pipeline.train_config` of `ExperimentConfig()`):

    python benchmarks/sae_quality.py settings --run RUN --out DIR --layers 0,6,12,17,23,29 \\
        --variant dead_feature_window=1000 --variant dead_feature_window=20 --variant lr=2e-3

retrains a finished run's SAEs on its own capture once per `--variant` (comma-separated KEY=VALUE of
`TrainConfig` fields or schedule keys such as `lr` or `k`). Each row holds the median and worst
over layers of the held-out FVU, the dead fraction, the out-of-domain FVU (`--ood-tokens`) and the
spliced delta CE (`--spliced-tokens`, 0: none), and the training time.

    python benchmarks/sae_quality.py budget --out DIR --layers 3,11,19,27 --budgets 1,2,4

captures the largest budget once (`budgets[-1]` times the default study's training tokens, with a
held-out split the size of the study's), and for each budget trains on the first `budget` parts of
it, evaluated on the same held-out, out-of-domain and spliced tokens:
- `layerflow`: the default study's training settings;
- `saelens`: SAELens' own `SAETrainer` (its dense step) with the settings its runner config
  recommends by default: lr 3e-4, constant, batches of 4,096 tokens, AuxK after 1,000 steps, the
  BatchTopK threshold's EMA at 0.01, decoder bias at zero; the same dictionary (BatchTopK, width,
  k) and activation scaling. `--saelens-settings layerflow` gives it layerflow's settings instead.
Writes budget.json and budget.png (each figure against tokens, both trainers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from layerflow.capture.store import ActivationStore
from layerflow.capture.writer import CaptureConfig, capture
from layerflow.evaluate import evaluate_run
from layerflow.experiment import ExperimentConfig
from layerflow.files import CAPTURE_MANIFEST, SHARD_DIR, CaptureManifest
from layerflow.models.load import load_model
from layerflow.models.sites import parse_kind
from layerflow.pipeline import train_config
from layerflow.train import TrainConfig, train

FIGURES = ("fvu", "dead_fraction", "ood_fvu", "delta_ce")
SAELENS_DEFAULTS = {"lr": 3e-4, "batch_tokens": 4096, "dead_feature_window": 1000, "topk_threshold_lr": 0.01,
                    "init_b_dec": "zeros", "lr_warm_up_steps": 0, "lr_decay_steps": 0, "k_anneal_fraction": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    settings = modes.add_parser("settings", help="Retrain a run's SAEs once per setting.")
    settings.add_argument("--run", required=True, help="A `layerflow run` folder (its capture is reused).")
    settings.add_argument("--variant", action="append", required=True, help="KEY=VALUE[,KEY=VALUE...]")
    budget = modes.add_parser("budget", help="Token budgets, layerflow against SAELens' trainer.")
    budget.add_argument("--budgets", default="1,2,4", help="Multiples of the default study's training tokens.")
    budget.add_argument("--saelens-settings", choices=("defaults", "layerflow"), default="defaults")
    for p in (settings, budget):
        p.add_argument("--out", required=True)
        p.add_argument("--model", default=None, help="Default: the default study's model.")
        p.add_argument("--layers", default=None, help="Comma-separated layers (default: every captured one).")
        p.add_argument("--ood-tokens", type=int, default=4096)
        p.add_argument("--spliced-tokens", type=int, default=0)
    args = parser.parse_args()
    (run_settings if args.mode == "settings" else run_budget)(args)


# ------------------------------------------------------------------ settings


def run_settings(args: argparse.Namespace) -> None:
    cfg = ExperimentConfig()
    name = args.model or cfg.models[0].name
    base = _subset(train_config(cfg, name, Path(args.run)), args.layers)
    loaded = load_model(name) if args.ood_tokens or args.spliced_tokens else None
    rows = []
    for variant in args.variant:
        changes = {k: _value(v) for k, v in (part.split("=", 1) for part in variant.split(","))}
        row = _train_and_evaluate(_with(base, changes), Path(args.out) / variant.replace(",", "+"), loaded, args)
        rows.append({"variant": variant} | row)
        print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, list)}), flush=True)
    (Path(args.out) / "sae_quality.json").write_text(json.dumps(rows, indent=2))


# ------------------------------------------------------------------ budget


def run_budget(args: argparse.Namespace) -> None:
    cfg = ExperimentConfig()
    name = args.model or cfg.models[0].name
    budgets = [float(b) for b in args.budgets.split(",")]
    out = Path(args.out)
    loaded = load_model(name)
    c = cfg.capture
    n_seqs = math.ceil(c.tokens / c.context_size)
    n_heldout = math.ceil(n_seqs * c.holdout)
    unit = n_seqs - n_heldout  # the default study's training sequences
    n_train = round(unit * budgets[-1])
    layers = [int(x) for x in args.layers.split(",")] if args.layers else cfg.layers(cfg.models[0])
    big = out / "capture"
    started = time.perf_counter()
    capture(CaptureConfig(name, layers, [parse_kind(k) for k in c.sites], n_tokens=(n_train + n_heldout) * c.context_size,
                          context_size=c.context_size, source=c.source, holdout_fraction=n_heldout / (n_train + n_heldout),
                          dtype=c.dtype, batch_size=c.batch_size, seed=cfg.seed, shard_seqs=max(1, unit // 4)),
            big, loaded=loaded)
    print(json.dumps({"capture_seconds": round(time.perf_counter() - started, 1)}), flush=True)
    rows = []
    for b in budgets:
        store = _view(big, out / f"capture-{b:g}x", round(unit * b))
        ours = _subset(dataclasses.replace(train_config(cfg, name, out), store=str(store)), None)
        # SAELens' dense step, on the same training tokens for as many epochs
        theirs = dataclasses.replace(ours if args.saelens_settings == "layerflow" else _with(ours, SAELENS_DEFAULTS),
                                     fast_path=False)
        for trainer, tc in (("layerflow", ours), ("saelens", theirs)):
            row = _train_and_evaluate(tc, out / f"{trainer}-{b:g}x", loaded, args)
            rows.append({"trainer": trainer, "budget": b, "train_tokens": row["tokens_per_site"]} | row)
            print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, list)}), flush=True)
            (out / "budget.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, out / "budget.png")


def _view(big: Path, folder: Path, n_train_seqs: int) -> Path:
    """A capture made of `big`'s first training shards holding `n_train_seqs` sequences, and all its
    held-out shards (the files are linked, not copied)."""
    manifest = CaptureManifest.read(big)
    train_shards, kept = [s for s in manifest.shards if s.split == "train"], []
    for shard in train_shards:
        if sum(s.n_seqs for s in kept) >= n_train_seqs:
            break
        kept.append(shard)
    shards = kept + [s for s in manifest.shards if s.split == "heldout"]
    (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for name in [n for s in shards for n in (s.file, Path(s.file).stem + ".json")]:
        if not (folder / SHARD_DIR / name).exists():
            os.symlink((big / SHARD_DIR / name).resolve(), folder / SHARD_DIR / name)
    seqs, tokens = sum(s.n_seqs for s in kept), sum(s.n_tokens for s in kept)
    split = dict(manifest.split, train_seqs=seqs, train_tokens=tokens)
    view = dataclasses.replace(manifest, shards=shards, split=split, n_tokens=tokens + split["heldout_tokens"])
    (folder / CAPTURE_MANIFEST).write_text(view.to_json())
    return folder


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"fvu": "held-out FVU", "dead_fraction": "dead fraction", "ood_fvu": "out-of-domain FVU",
              "delta_ce": "spliced delta CE (nats)"}
    goals = {"fvu": 0.15, "dead_fraction": 0.05, "ood_fvu": 0.6, "delta_ce": 0.3}
    shown = [f for f in FIGURES if any(f"{f}_median" in r for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6))
    for ax, figure in zip(np.atleast_1d(axes), shown):
        for trainer, style in (("layerflow", "o-"), ("saelens", "s--")):
            rs = [r for r in rows if r["trainer"] == trainer and f"{figure}_median" in r]
            if not rs:
                continue
            x = [r["train_tokens"] for r in rs]
            ax.plot(x, [r[f"{figure}_median"] for r in rs], style, label=f"{trainer}: median over layers")
            ax.fill_between(x, [r[f"{figure}_min"] for r in rs], [r[f"{figure}_max"] for r in rs], alpha=0.15)
        ax.axhline(goals[figure], color="grey", ls=":", lw=1, label="goal (issue #18)")
        if figure in ("fvu", "ood_fvu"):
            ax.axhline(1, color="black", ls="-", lw=0.5, label="1 = predicting the mean")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens per SAE")
        ax.set_title(labels[figure], fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("SAE quality against training tokens (shaded: best to worst layer)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------ shared


def _subset(base: TrainConfig, layers: str | None) -> TrainConfig:
    if not layers:
        return base
    wanted = {int(x) for x in layers.split(",")}
    store = ActivationStore(base.store)
    return dataclasses.replace(base, hooks=[s.hook_name for s in store.manifest.sites if s.layer in wanted])


def _with(base: TrainConfig, changes: dict) -> TrainConfig:
    """`base` with TrainConfig fields and schedule keys (e.g. lr, k) changed."""
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = set(changes) - fields - base.schedule.valid_keys()
    if unknown:
        raise SystemExit(f"unknown setting(s) {sorted(unknown)}; valid: TrainConfig fields {sorted(fields)} or "
                         f"schedule keys {sorted(base.schedule.valid_keys())}")
    schedule = {k: v for k, v in changes.items() if k not in fields}
    fields_changed = {k: v for k, v in changes.items() if k in fields}
    if schedule:
        fields_changed["schedule"] = base.schedule.with_overrides(base=schedule)
    return dataclasses.replace(base, **fields_changed)


def _train_and_evaluate(tc: TrainConfig, out: Path, loaded, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    manifest = train(tc, out, evaluate=False)
    seconds = time.perf_counter() - start
    evals, _ = evaluate_run(out, tc.store, model_eval=loaded is not None, loaded=loaded,
                            spliced=args.spliced_tokens > 0, spliced_max_tokens=args.spliced_tokens,
                            ood_tokens=args.ood_tokens)
    row = {"seconds": round(seconds, 1), "steps": manifest.steps, "tokens_per_site": manifest.tokens_per_site,
           "sites": len(evals)}
    for figure in FIGURES:
        values = [e.to_row().get(figure) for e in evals.values()]
        if values and all(v is not None for v in values):
            row |= {f"{figure}_median": float(np.median(values)), f"{figure}_min": float(np.min(values)),
                    f"{figure}_max": float(np.max(values)), figure: values}
    return row


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
