"""What the latents fire on while they train: every `samples_every` steps, each latent's top-activating
held-out tokens, written to samples/step-N/<hook>.safetensors (`layerflow samples` shows them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerflow.capture.batches import heldout_batches
from layerflow.capture.store import ActivationStore
from layerflow.dictionaries.kinds import encode
from layerflow.dictionaries.top_activations import TopActivations
from layerflow.errors import LayerflowError
from layerflow.files import SAMPLES_DIR
from layerflow.models.sites import parse_hook_name

SAMPLES_PER_LATENT = 8  # top-activating tokens kept per latent


class SampleRecorder:
    """The held-out tokens are read once; each recording encodes them with the current weights."""

    def __init__(self, store: ActivationStore, hooks: list[str], specials: list[int], max_tokens: int,
                 scales: list[float]):
        self.batches = list(heldout_batches(store, hooks, specials, max_tokens))
        self.scales = dict(zip(hooks, scales))  # the dictionaries read activations in training units

    @torch.no_grad()
    def record(self, out_dir: Path, step: int, groups: list[tuple[list[str], Any]], saes: dict[str, Any]) -> None:
        folder = out_dir / SAMPLES_DIR / f"step-{step:09d}"
        for _, group in groups:
            group.sync()
        for h, sae in saes.items():
            top = TopActivations.empty(sae.cfg.d_sae, SAMPLES_PER_LATENT)
            for acts, positions in self.batches:
                top.update(encode(sae, acts[h] * self.scales[h]), positions)
            top.save(folder / f"{h}.safetensors")


def read_samples(run: str | Path, step: int | None = None,
                 hooks: list[str] | None = None) -> tuple[int, dict[str, TopActivations]]:
    """(step, {hook: TopActivations}) recorded during training at `step` (default: the last one)."""
    root = Path(run) / SAMPLES_DIR
    recorded = {int(p.name.removeprefix("step-")): p for p in root.glob("step-*[0-9]")} if root.exists() else {}
    if not recorded:
        raise LayerflowError(f"No training samples under '{run}': train with --samples-every N.")
    step = max(recorded) if step is None else step
    if step not in recorded:
        raise LayerflowError(f"No samples at step {step} in '{run}'. Recorded steps: {', '.join(map(str, sorted(recorded)))}.")
    files = {p.name.removesuffix(".safetensors"): p for p in recorded[step].glob("*.safetensors")}
    unknown = [h for h in hooks or [] if h not in files]
    if unknown:
        raise LayerflowError(f"No samples for {', '.join(unknown)} at step {step}. Sites: {', '.join(sorted(files))}.")
    order = hooks or sorted(files, key=lambda h: (parse_hook_name(h)[0], h))
    return step, {h: TopActivations.load(files[h]) for h in order}
