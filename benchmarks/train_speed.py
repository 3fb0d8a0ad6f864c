"""Training every layer at once vs SAELens' runners, as ratios measured in one run (issue #3).

    python benchmarks/train_speed.py --layers 30            # all layers of SmolLM2-135M, CPU
    python benchmarks/train_speed.py --layers 6 --sequential
    python benchmarks/train_speed.py --model gpt2-medium-twin --device cuda --updates-only

Two measurements, same SAE config (BatchTopK k=32, 8x = 4608 latents, expected_average_only_in,
batch 4096 tokens), same tokens and same step count for every method:

1. SAE updates. One optimizer step for N layers on the same [N, 4096, d] batch:
   layerflow's stacked sparse step vs N calls of SAELens' `SAETrainer.step`. Reported as
   tokens x layers per second, and as FLOP/s against the machine's matmul FLOP/s measured in the
   same run (one [4096, d] x [d, 4608] sgemm). FLOP counts per token and layer:
     SAELens dense step   12 * d * d_sae  (six matmuls, input gradient included)
     layerflow sparse     2 * d * d_sae (encoder) + 8 * k * d (decoder fwd, 3 sparse gradients)
2. End to end, tokens to trained SAEs for N layers:
   layerflow   `capture` to disk (one pass, all N layers) + `train` from the store
   (a)         SAELens `MultiSAETrainingRunner` (one model pass per batch, a Python loop over SAEs)
   (b)         N sequential SAELens `LanguageModelSAETrainingRunner` runs (--sequential)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sae_configs(args, d_in: int, n: int):
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class(args.architecture)
    cfg = cfg_cls(d_in=d_in, d_sae=args.expansion * d_in, k=args.k, normalize_activations="expected_average_only_in",
                  device=args.device)
    return sae_cls, cfg


def measure_updates(args, d_in: int) -> dict:
    """One step for N layers: stacked sparse vs SAELens' SAETrainer.step per layer."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from layerflow.train.sparse_topk import StackedTopKSAEs

    n, batch, device = args.layers, args.batch_tokens, args.device
    sae_cls, cfg = sae_configs(args, d_in, n)
    d_sae = cfg.d_sae
    saes = [sae_cls(copy.deepcopy(cfg)) for _ in range(n)]
    x = torch.randn(n, batch, d_in, device=device) + 0.5
    stack = StackedTopKSAEs(saes, [3e-4] * n)
    ours = _timed(lambda: stack.step(x), device, args.repeats)
    trainers = [SAETrainer(SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=batch, lr_end=3e-5,
                                            device=device), s, iter(())) for s in copy.deepcopy(saes[: args.saelens_layers])]
    theirs_per_layer = _timed(lambda: [t.step(x[i]) for i, t in enumerate(trainers)], device, args.repeats) / len(trainers)
    a, w = torch.randn(batch, d_in, device=device), torch.randn(d_in, d_sae, device=device)
    matmul = _timed(lambda: a @ w, device, args.repeats * 3)
    peak = 2 * batch * d_in * d_sae / matmul
    sparse_flops = (2 * d_in * d_sae + 8 * args.k * d_in) * batch * n
    dense_flops = 12 * d_in * d_sae * batch
    return {
        "layers": n, "batch_tokens": batch, "d_in": d_in, "d_sae": d_sae, "k": args.k,
        "layerflow_step_s": ours, "saelens_step_s_per_layer": theirs_per_layer,
        "update_speedup": theirs_per_layer * n / ours,
        "layerflow_tokens_x_layers_per_s": batch * n / ours,
        "saelens_tokens_x_layers_per_s": batch / theirs_per_layer,
        "matmul_flops_per_s": peak,
        "layerflow_flops_fraction_of_matmul": sparse_flops / ours / peak,
        "saelens_flops_fraction_of_matmul": dense_flops / theirs_per_layer / peak,
        "layerflow_saelens_equivalent_flops_fraction": dense_flops * n / ours / peak,
    }


def measure_end_to_end(args, loaded) -> dict:
    from saelens_baselines import saelens_multi_runner, saelens_sequential_runs

    from layerflow.capture import CaptureConfig, capture
    from layerflow.data.tokens import TokenPlan, make_sequences, special_token_ids
    from layerflow.train import LayerSchedule, TrainConfig, train

    n_layers = loaded.model.cfg.n_layers
    layers = sorted({round(i * (n_layers - 1) / max(args.layers - 1, 1)) for i in range(args.layers)})
    hooks = [f"blocks.{L}.hook_resid_post" for L in layers]
    ctx = args.context_size
    usable = ctx - 1  # BOS positions are excluded from training by every method
    n_seqs = math.ceil(args.steps * args.batch_tokens / usable) + 2
    source = "random" if loaded.tokenizer is None else "default"
    plan = TokenPlan(source, ctx, True, loaded.bos_token_id, 0)
    tokens = make_sequences(n_seqs, plan, loaded.tokenizer, loaded.model.cfg.d_vocab)
    specials = special_token_ids(loaded.tokenizer, plan)
    sae_cls, cfg = sae_configs(args, loaded.model.cfg.d_model, len(layers))
    schedule = LayerSchedule(args.architecture, {"expansion_factor": args.expansion, "k": args.k,
                                                 "normalize_activations": "expected_average_only_in"})
    result = {"layers": layers, "steps": args.steps, "batch_tokens": args.batch_tokens, "tokens": tokens.numel()}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        start = time.perf_counter()
        capture(CaptureConfig(loaded.name, layers, n_tokens=tokens.numel(), context_size=ctx, source=source,
                              holdout_fraction=0.0, device=args.device), Path(tmp) / "capture", loaded=loaded)
        captured = time.perf_counter()
        train(TrainConfig(str(Path(tmp) / "capture"), schedule=schedule, steps=args.steps,
                          batch_tokens=args.batch_tokens, checkpoint_every=10**9), Path(tmp) / "train", evaluate=False)
        result["layerflow_capture_s"] = captured - start
        result["layerflow_train_s"] = time.perf_counter() - captured
    result["layerflow_s"] = result["layerflow_capture_s"] + result["layerflow_train_s"]
    cfg_for = lambda hook: copy.deepcopy(cfg)
    result["saelens_multi_s"] = saelens_multi_runner(loaded, tokens, hooks, cfg_for, args.steps, args.batch_tokens,
                                                     specials)
    result["speedup_vs_multi"] = result["saelens_multi_s"] / result["layerflow_s"]
    if args.sequential:
        result["saelens_sequential_s"] = saelens_sequential_runs(loaded, tokens, hooks, cfg_for, args.steps,
                                                                 args.batch_tokens, specials)
        result["speedup_vs_sequential"] = result["saelens_sequential_s"] / result["layerflow_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=30, help="N layers, spread evenly over depth")
    parser.add_argument("--architecture", default="batchtopk", choices=["topk", "batchtopk"])
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per SAE, end to end")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saelens-layers", type=int, default=2, help="SAELens steps timed per repeat (per-layer cost)")
    parser.add_argument("--sequential", action="store_true", help="also time N sequential SAELens runs")
    parser.add_argument("--updates-only", action="store_true", help="skip the end-to-end comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tmp", default=None, help="where the capture goes (default: system temp)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from layerflow.models.load import load_model

    loaded = load_model(args.model, device=args.device)
    results = {"device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
               "threads": torch.get_num_threads(), "model": args.model}
    results["updates"] = measure_updates(args, loaded.model.cfg.d_model)
    print(json.dumps(results, indent=2), flush=True)
    if not args.updates_only:
        results["end_to_end"] = measure_end_to_end(args, loaded)
        print(json.dumps(results["end_to_end"], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
