"""What the transfer intervals cost: the pair loop and the feature matching with and without their
bootstrap, and the summaries on the resamples.

    python benchmarks/bootstrap_cost.py --run RUN --model MODEL --sites 6

Measured in one process, interleaved, `--repeats` times, best against best (this machine drifts):
- `within_model_matrix` on the run's held-out sequences with `bootstrap=0` and with the default
  number of resamples, once with feature matching off (the pair loop: every pair) and once with
  it on for adjacent sites (the added time is the matching, done only for adjacent pairs: Feature
  Flow's EV and the activation-matched fraction are resampled there);
- `summarize_matrix` (universality, hub excess, breaks, decay on every resample) and writing the
  resamples' .npz.
Each added time is then scaled to the run's own transfer stage: the pair loop's per pair to all
its pairs, the matching's per matched pair to its matched pairs, plus the summaries timed on its
own matrix; their sum is given as a fraction of the stage's wall time (run.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from layerflow import defaults
from layerflow.capture import ActivationStore
from layerflow.dictionaries.io import load_saes
from layerflow.files import ACTIVATIONS_DIR, RUN_FILE, SAE_DIR, TRANSFER_DIR
from layerflow.transfer import (Calibration, TransferMatrix, TransferOptions, sites_of_store, summarize_matrix,
                                within_model_matrix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A `layerflow run` folder with a finished transfer stage.")
    parser.add_argument("--model", default=defaults.MODEL)
    parser.add_argument("--sites", type=int, default=6, help="Sites, evenly spaced (all ordered pairs are computed).")
    parser.add_argument("--tokens", type=int, default=defaults.TRANSFER_TOKENS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="Write the figures here.")
    args = parser.parse_args()

    run = Path(args.run)
    saes, store = load_saes(run / SAE_DIR / args.model), ActivationStore(run / ACTIVATIONS_DIR / args.model)
    sites = sites_of_store(store, list(saes))
    sites = sites[::max(1, len(sites) // args.sites)][:args.sites]
    hooks = [s.hook_name for s in sites]
    acts, sequences = store.heldout(hooks, args.tokens), store.heldout_sequences(args.tokens)
    calibration = Calibration.of(acts)
    saes = {h: saes[h] for h in hooks}
    B = defaults.BOOTSTRAP_REPLICATES
    times: dict[tuple[int, int], list[float]] = {(m, b): [] for m in (0, 1) for b in (0, B)}
    summary_s, write_s = [], []
    for _ in range(args.repeats):
        for match, b in times:
            start = time.perf_counter()
            matrix = within_model_matrix(saes, acts, sites, calibration,
                                         TransferOptions(max_tokens=None, match_distance=match, bootstrap=b),
                                         sequences=sequences)
            times[match, b].append(time.perf_counter() - start)
        start = time.perf_counter()
        summarize_matrix(matrix)
        summary_s.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            matrix.write(Path(folder))
            write_s.append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    n = len(sites)
    loop_added = best[0, B] - best[0, 0]
    matching_added = (best[1, B] - best[0, B]) - (best[1, 0] - best[0, 0])
    figures = {"sites": n, "pairs": n * n, "matched_pairs": n - 1, "tokens": int(len(sequences)),
               "sequences": int(sequences.unique().numel()), "resamples": B,
               "seconds": {f"match={m},bootstrap={b}": v for (m, b), v in times.items()},
               "pair_loop_ratio": best[0, B] / best[0, 0], "pair_loop_added_s_per_pair": loop_added / (n * n),
               "matching_ratio": (best[1, B] - best[0, B]) / (best[1, 0] - best[0, 0]),
               "matching_added_s_per_pair": matching_added / (n - 1),
               "summary_s": min(summary_s), "write_s": min(write_s)}
    stage = TransferMatrix.read(run / TRANSFER_DIR / args.model)
    start = time.perf_counter()
    summarize_matrix(stage)
    stage_summary = time.perf_counter() - start
    seconds = json.loads((run / RUN_FILE).read_text())["stages"]["transfer"]["seconds"]
    pairs = len(stage.sources) * len(stage.targets)
    matched = int(np.isfinite(stage["activation_matched_fraction"]).sum()) // 2 if "activation_matched_fraction" \
        in stage.metrics else 0
    added = figures["pair_loop_added_s_per_pair"] * pairs + figures["matching_added_s_per_pair"] * matched + stage_summary
    figures.update(stage_seconds=seconds, stage_pairs=pairs, stage_matched_pairs=matched, stage_summary_s=stage_summary,
                   stage_added_s=added, fraction_of_stage=added / seconds)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
