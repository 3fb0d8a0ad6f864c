"""Residual-stream norm growth with depth: why raw MSE ratios between layers mislead.

The research notes compared layers by raw reconstruction-loss ratios. The residual norm grows
with depth, so such ratios mostly measure norm growth. This example captures every layer of the
embedded model and plots the mean norm per layer from the capture manifest.

    python examples/norm_growth.py [--tokens 4096] [--out artifacts/examples/norm_growth.png]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from layerflow.capture import CaptureConfig, capture
from layerflow.models.sites import Site, SiteKind


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("artifacts/examples/norm_growth.png"))
    args = p.parse_args()

    from layerflow.models.load import load_model

    loaded = load_model(args.model)
    n_layers = loaded.model.cfg.n_layers
    kinds = [SiteKind.resid_post, SiteKind.mlp_out, SiteKind.attn_out]
    cfg = CaptureConfig(args.model, list(range(n_layers)), kinds, n_tokens=args.tokens)
    manifest = capture(cfg, Path("artifacts") / args.model / "capture-norms", loaded=loaded, overwrite=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in kinds:
        norms = [manifest.mean_norm[Site(L, kind).hook_name] for L in range(n_layers)]
        ax.plot(range(n_layers), norms, marker="o", ms=3, label=kind.value)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean L2 norm (special tokens excluded)")
    ax.set_title(f"{args.model}: activation norm by depth ({manifest.n_tokens} tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    first, last = manifest.mean_norm["blocks.0.hook_resid_post"], manifest.mean_norm[f"blocks.{n_layers - 1}.hook_resid_post"]
    print(f"resid_post norm grows {last / first:.1f}x from layer 0 to layer {n_layers - 1}; plot: {args.out}")


if __name__ == "__main__":
    main()
