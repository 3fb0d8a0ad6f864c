"""SAE quality against training settings, on a finished run's own capture.

    python benchmarks/sae_quality.py --run RUN --out /tmp/sae-quality \
        --variant dead_feature_window=1000 --variant dead_feature_window=20 --variant lr_decay_steps=31

Trains the run's SAEs again (same sites, schedule, tokens and seed as `layerflow run`: `pipeline`'s
training config) once per setting, one setting at a time, and reports for each the held-out FVU and
dead fraction of every layer (median and worst) and the training time. Spliced CE is left out: it
costs as much as training and does not depend on these settings differently.

Each `--variant` sets `TrainConfig` fields (comma-separated KEY=VALUE, integers or strings), for
example `dead_feature_window` (the steps a latent may go without firing before the auxiliary AuxK
loss works on it), `lr_warm_up_steps`, `lr_decay_steps` (linear decay to a tenth over the last
steps) or `init_b_dec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from layerflow.experiment import ExperimentConfig
from layerflow.pipeline import train_config
from layerflow.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A `layerflow run` folder (its capture is reused).")
    parser.add_argument("--model", default=None, help="Default: the run's first model.")
    parser.add_argument("--variant", action="append", required=True, help="KEY=VALUE[,KEY=VALUE...] of TrainConfig.")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cfg = ExperimentConfig()
    name = args.model or cfg.models[0].name
    base = train_config(cfg, name, Path(args.run))
    fields = {f.name for f in dataclasses.fields(base)}
    rows = []
    for variant in args.variant:
        changes = dict(part.split("=", 1) for part in variant.split(","))
        unknown = set(changes) - fields
        if unknown:
            raise SystemExit(f"unknown TrainConfig field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        changes = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in changes.items()}
        out = Path(args.out) / variant.replace(",", "+")
        start = time.perf_counter()
        manifest = train(dataclasses.replace(base, **changes), out)
        seconds = time.perf_counter() - start
        fvu = np.array([site.evals["fvu"] for site in manifest.sites])
        dead = np.array([site.evals["dead_fraction"] for site in manifest.sites])
        rows.append({"variant": variant, "seconds": seconds, "steps": manifest.steps, "sites": len(fvu),
                     "fvu_median": float(np.median(fvu)), "fvu_max": float(fvu.max()),
                     "dead_median": float(np.median(dead)), "dead_max": float(dead.max()),
                     "fvu": fvu.tolist(), "dead": dead.tolist()})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("fvu", "dead")}), flush=True)
    (Path(args.out) / "sae_quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
