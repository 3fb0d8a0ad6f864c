"""Capture throughput against the baselines of issue #2, as ratios measured in one run.

    python benchmarks/capture_speed.py                       # all 30 layers of SmolLM2-135M, CPU
    python benchmarks/capture_speed.py --model gemma-2-2b-twin --device cuda --tokens 65536

Methods, all on the same token sequences and batch size:
  capture      layerflow.capture.capture(): one pass per batch, all layers, shards written to disk
  (a) plain    model(tokens, stop_at_layer=deepest + 1): the floor, nothing captured
  (b) per-layer  one forward per layer, each stopped after it (how the research notes captured)
  (c) cache    run_with_cache over all layers without stop_at_layer (unembedding included)
Rounds are interleaved and the median of each method is used, because these machines are noisy.
Peak RAM during capture is measured in fresh processes at two token counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args) -> dict:
    from layerflow.capture import CaptureConfig, capture
    from layerflow.data.tokens import TokenPlan, make_sequences
    from layerflow.models.load import load_model

    loaded = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    model, n_layers = loaded.model, loaded.model.cfg.n_layers
    layers = list(range(n_layers))
    hooks = [f"blocks.{L}.hook_resid_post" for L in layers]
    source = "random" if loaded.tokenizer is None else "default"
    cfg = CaptureConfig(args.model, layers, n_tokens=args.tokens, context_size=args.context_size, source=source,
                        holdout_fraction=0.0, batch_size=args.batch_size, device=args.device, dtype=args.store_dtype)
    n_seqs = args.tokens // args.context_size
    plan = TokenPlan(source, args.context_size, True, loaded.bos_token_id, 0)
    tokens = make_sequences(n_seqs, plan, loaded.tokenizer, model.cfg.d_vocab).to(args.device)
    batches = tokens.split(args.batch_size)
    few = batches[: max(1, len(batches) // args.per_layer_fraction)]  # (b) is slow: time it on fewer batches

    def run_capture():
        with tempfile.TemporaryDirectory(dir=args.tmp) as out:
            capture(cfg, out, loaded=loaded)
        return tokens.numel()

    @torch.inference_mode()
    def run_plain():
        for b in batches:
            model(b, stop_at_layer=n_layers)
        return tokens.numel()

    @torch.inference_mode()
    def run_per_layer():
        for b in few:
            for L, name in zip(layers, hooks):
                kept = []
                model.run_with_hooks(b, stop_at_layer=L + 1, fwd_hooks=[(name, lambda a, hook: kept.append(a.cpu()))])
        return sum(b.numel() for b in few)

    @torch.inference_mode()
    def run_cache():
        for b in batches:
            _, cache = model.run_with_cache(b, names_filter=hooks)
            {k: v.cpu() for k, v in cache.items()}
        return tokens.numel()

    methods = {"capture": run_capture, "plain": run_plain, "per_layer": run_per_layer, "cache": run_cache}
    run_plain()  # warm-up
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            _sync(args.device)
            t = time.perf_counter()
            n = fn()
            _sync(args.device)
            rates[name].append(n / (time.perf_counter() - t))
    median = {m: statistics.median(r) for m, r in rates.items()}
    return {"model": args.model, "device": args.device, "n_layers": n_layers, "tokens": tokens.numel(),
            "batch_size": args.batch_size, "context_size": args.context_size, "rounds": args.rounds,
            "tokens_per_s": median, "all_rates": rates}


def peak_rss_mb(args, n_tokens: int) -> float:
    """Peak RSS while capturing `n_tokens` tokens, in a fresh process, after the model is loaded.

    Loading peaks higher than capturing, so the peak counter (VmHWM) is reset after loading by
    writing 5 to /proc/self/clear_refs (Linux).
    """
    code = (
        "import re, tempfile, torch\n"
        "from layerflow.capture import CaptureConfig, capture\n"
        "from layerflow.models.load import load_model\n"
        f"loaded = load_model({args.model!r}, device={args.device!r})\n"
        "src = 'random' if loaded.tokenizer is None else 'default'\n"
        f"cfg = CaptureConfig({args.model!r}, list(range(loaded.model.cfg.n_layers)), n_tokens={n_tokens}, "
        f"context_size={args.context_size}, source=src, batch_size={args.batch_size}, device={args.device!r})\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        f"with tempfile.TemporaryDirectory(dir={args.tmp!r}) as out:\n"
        "    capture(cfg, out, loaded=loaded)\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model dtype")
    p.add_argument("--store-dtype", default="float32")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-layer-fraction", type=int, default=4, help="time (b) on 1/N of the batches")
    p.add_argument("--rss-tokens", type=int, nargs=2, default=[4096, 16384], help="two token counts for peak RAM")
    p.add_argument("--tmp", default=None, help="where temporary captures are written")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only-rss", action="store_true", help="skip the speed measurements")
    args = p.parse_args()

    if args.only_rss:
        rss = {t: peak_rss_mb(args, t) for t in args.rss_tokens}
        print("peak RSS during capture: " + ", ".join(f"{m:.0f} MB at {t} tokens" for t, m in rss.items()))
        return
    result = measure(args)
    r, n = result["tokens_per_s"], result["n_layers"]
    rss = {t: peak_rss_mb(args, t) for t in args.rss_tokens} if args.rss_tokens[0] > 0 else {}
    result["peak_rss_mb"] = rss
    goal_b = 0.8 * (n + 1) / 2
    lines = [
        f"{result['model']} on {result['device']}: {n} layers (resid_post), {result['tokens']} tokens, "
        f"batch {args.batch_size} x {args.context_size}, median of {args.rounds} rounds",
        *(f"  {m:<10} {v:10.0f} tokens/s" for m, v in r.items()),
        f"  capture / plain forward     = {r['capture'] / r['plain']:.2f}x   (goal >= 0.9)",
        f"  capture / per-layer passes  = {r['capture'] / r['per_layer']:.1f}x   (goal >= 0.8*(n+1)/2 = {goal_b:.1f})",
        f"  capture / run_with_cache    = {r['capture'] / r['cache']:.2f}x",
    ]
    if rss:
        (t1, m1), (t2, m2) = rss.items()
        lines.append(f"  peak RSS during capture: {m1:.0f} MB at {t1} tokens, {m2:.0f} MB at {t2} tokens "
                     f"(ratio {m2 / m1:.2f}, goal ~1)")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
