"""What the transfer intervals cost: the pair loop with and without its bootstrap, and the summaries on the resamples.

    python benchmarks/bootstrap_cost.py --run RUN --model MODEL --sites 6

Measured in one process, interleaved, `--repeats` times, best against best (this machine drifts):
- `within_model_matrix` on the run's held-out sequences with `bootstrap=0` and with the default
  number of resamples, its feature matching on for sites `--match-distance` apart (as in the
  run: Feature Flow's EV and the activation-matched fraction are resampled there); the difference
  is what the per-sequence sums and the resampling add;
- `summarize_matrix` (universality, hub excess, breaks, decay on every resample) and writing the
  resamples' .npz.
The added fraction of the pair loop is then applied to the run's own transfer stage, the
summaries are timed on that matrix itself, and their sum is given as a fraction of the run's
transfer stage (its wall time in run.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--match-distance", type=int, default=defaults.MATCH_DISTANCE)
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
    times: dict[int, list[float]] = {0: [], defaults.BOOTSTRAP_REPLICATES: []}
    summary_s, write_s = [], []
    for _ in range(args.repeats):
        for b in times:
            start = time.perf_counter()
            matrix = within_model_matrix(saes, acts, sites, calibration,
                                         TransferOptions(max_tokens=None, match_distance=args.match_distance,
                                                         bootstrap=b),
                                         sequences=sequences)
            times[b].append(time.perf_counter() - start)
        start = time.perf_counter()
        summarize_matrix(matrix)
        summary_s.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            matrix.write(Path(folder))
            write_s.append(time.perf_counter() - start)
    off, on = min(times[0]), min(times[defaults.BOOTSTRAP_REPLICATES])
    n = len(sites)
    figures = {"sites": n, "pairs": n * n, "tokens": int(len(sequences)), "sequences": int(sequences.unique().numel()),
               "resamples": defaults.BOOTSTRAP_REPLICATES, "match_distance": args.match_distance,
               "pair_loop_s_without": off, "pair_loop_s_with": on,
               "pair_loop_s_each": {str(k): v for k, v in times.items()}, "pair_loop_ratio": on / off,
               "summary_s": min(summary_s), "write_s": min(write_s)}
    stage = TransferMatrix.read(run / TRANSFER_DIR / args.model)
    start = time.perf_counter()
    summarize_matrix(stage)
    stage_summary = time.perf_counter() - start
    seconds = json.loads((run / RUN_FILE).read_text())["stages"]["transfer"]["seconds"]
    pairs = len(stage.sources) * len(stage.targets)
    added = (1 - off / on) * seconds + stage_summary  # the stage ran with the resampling: its share of it
    figures.update(stage_seconds=seconds, stage_pairs=pairs, stage_summary_s=stage_summary, stage_added_s=added,
                   fraction_of_stage=added / seconds)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
