"""Layers side by side: the notes' "layer 8 vs layer 17" comparison of a training run's dictionaries.

`compare_layers(run, layers)` gathers, per site of a `layerflow train` run (SAEs or transcoders),
what the run wrote: the held-out evals (FVU against the target, per-prefix FVU of a Matryoshka
dictionary, L0, dead/dense fractions, spliced delta CE and KL), the held-out firing frequency of
every latent, and the training curves. `plots.layer_comparison` draws it; `layerflow compare`
prints and plots it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from layerflow.dictionaries.io import read_config
from layerflow.dictionaries.kinds import training_architecture
from layerflow.errors import LayerflowError
from layerflow.evaluate.evals import SiteEval, read_eval_results
from layerflow.files import CURVES_FILE, TRAIN_MANIFEST, TrainManifest


@dataclass
class SiteComparison:
    hook_name: str
    layer: int
    architecture: str
    d_sae: int
    evals: SiteEval  # held-out figures; `evals.frequency` is each latent's firing rate
    curves: dict[str, list]  # per training step: "loss", and for transcoders "fvu", "l0", "prefix_fvu"

    @property
    def target(self) -> str:
        return self.evals.hook_name_out or self.hook_name


@dataclass
class LayerComparison:
    run: str
    model: str
    sites: list[SiteComparison]


def compare_layers(run: str | Path, layers: list[int] | None = None) -> LayerComparison:
    """The sites of a finished training run at `layers` (default: all), in layer order."""
    run = Path(run)
    if not (run / TRAIN_MANIFEST).exists():
        raise LayerflowError(f"'{run}' is not a finished `layerflow train` run (no {TRAIN_MANIFEST}).")
    manifest = TrainManifest.read(run)
    evals = read_eval_results(run)
    curves = json.loads((run / CURVES_FILE).read_text()) if (run / CURVES_FILE).exists() else {}
    trained = sorted({s.layer for s in manifest.sites})
    missing = [layer for layer in layers or [] if layer not in trained]
    if missing:
        raise LayerflowError(f"Layer {', '.join(map(str, missing))} has no dictionary in '{run}'. "
                             f"Trained layers: {', '.join(map(str, trained))}.")
    sites = []
    for site in sorted(manifest.sites, key=lambda s: (s.layer, s.hook_name)):
        if layers and site.layer not in layers:
            continue
        if site.hook_name not in evals:
            raise LayerflowError(f"No held-out evals for {site.hook_name} in '{run}'. Run `layerflow eval {run}`.")
        cfg = read_config(run / site.folder)
        sites.append(SiteComparison(site.hook_name, site.layer, training_architecture(cfg), cfg["d_sae"], evals[site.hook_name],
                                    curves.get(site.hook_name, {})))
    return LayerComparison(str(run), manifest.model["name"], sites)


def log_frequency(frequency: torch.Tensor, floor: float = 1e-7) -> torch.Tensor:
    """log10 of firing rates, dead latents (rate 0) at log10(floor) so a histogram can show them."""
    return frequency.double().clamp(min=floor).log10()
