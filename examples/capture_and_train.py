"""Capture a few layers of the embedded model in one forward pass, then train one SAE per layer.

The SAEs are saved as SAELens folders (`SAE.load_from_disk` reads them) with held-out FVU, L0
and spliced delta CE in the run's manifest.

    python examples/capture_and_train.py [--layers 6,12,18] [--tokens 30000] [--out artifacts/examples]
    python examples/capture_and_train.py --quick      # a smoke test: 2 layers, a few thousand tokens
"""

import argparse
import dataclasses
from pathlib import Path

from layerflow.capture import CaptureConfig, capture
from layerflow.models.load import load_model
from layerflow.models.sites import SiteKind
from layerflow.train import TrainConfig, get_preset, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="6,12,18")
    p.add_argument("--tokens", type=int, default=30_000)
    p.add_argument("--out", type=Path, default=Path("artifacts/examples"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    layers = [int(layer) for layer in args.layers.split(",")][: 2 if args.quick else None]
    tokens = 3000 if args.quick else args.tokens

    loaded = load_model(args.model)
    capture_cfg = CaptureConfig(args.model, layers, [SiteKind.resid_post], n_tokens=tokens, dtype="float16")
    manifest = capture(capture_cfg, args.out / "capture", loaded=loaded, overwrite=True)
    print(f"captured {manifest.n_tokens} tokens at {len(manifest.sites)} sites -> {args.out / 'capture'}")

    # The default schedule (BatchTopK, k = 32), at 4x width and a higher learning rate for a short run.
    preset = get_preset("default")
    schedule = dataclasses.replace(preset, base={**preset.base, "expansion_factor": 4, "lr": 1e-3})
    train_cfg = TrainConfig(str(args.out / "capture"), schedule=schedule, epochs=2.0,
                            steps=20 if args.quick else None, batch_tokens=1024 if args.quick else 4096)
    result = train(train_cfg, args.out / "train", loaded=loaded, overwrite=True)
    print(f"{len(result.sites)} SAEs, {result.steps} steps, {result.seconds:.0f} s -> {args.out / 'train' / 'saes'}")
    for site in result.sites:
        e = site.evals
        print(f"  layer {site.layer:2d}  FVU {e['fvu']:.3f}  L0 {e['l0']:.1f}  dead {e['dead_fraction']:.2f}  "
              f"delta CE {e['delta_ce']:.3f} nats")


if __name__ == "__main__":
    main()
