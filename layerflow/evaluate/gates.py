"""Quality gates: whether a run's dictionaries are good enough for the conclusions drawn from them.

Transfer figures compare dictionaries; they say something about the model's layers only when each
dictionary is a faithful, fully used description of its own layer. Each gate compares one of the
SAE's own held-out figures (`evaluate.evals.SiteEval`) with a threshold:

- **FVU <= 0.2.** Relative transfer is measured against the target's own dictionary. If that
  dictionary leaves more than a fifth of its layer's variance unexplained, transfer is judged only
  on the part both dictionaries capture; the rest, where features may well not transfer, is
  invisible to every figure. Published residual-stream SAEs (Gemma Scope, Llama Scope) reach
  0.1-0.3 at L0 of 30-100, so 0.2 is reachable and not lenient.
- **Dead fraction <= 0.1.** A latent that never fires on held-out text makes the dictionary
  narrower than configured. Dead fractions differ between layers (the default run: 15-60%), so
  comparisons across layers would compare dictionaries of different effective width.
- **Out-of-domain FVU <= 0.6.** On text of registers the training corpus does not emphasise (the
  shipped `ood` corpus), a dictionary that leaves more than 60% of its layer's variance
  unexplained describes the training text rather than the layer: deep-layer SAEs trained on
  novels alone reached 1.03 there, worse than predicting the mean.
- **Spliced delta CE <= 0.25 nats.** FVU weighs every direction by its variance; the model does
  not. A dictionary with a good FVU that raises the next-token loss by more than a quarter of a
  nat (about 28% more perplexity) misses directions the model reads downstream, and its features
  are not the model's.

A run passes when every layer passes every gate it was measured on. Otherwise each finding is
tentative, and `advice` says what to change: more tokens, more steps, or a wider dictionary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GATES = {"fvu": 0.2, "dead_fraction": 0.1, "ood_fvu": 0.6, "delta_ce": 0.25}  # figure -> the most that passes
LABELS = {"fvu": "held-out FVU", "dead_fraction": "dead fraction", "ood_fvu": "out-of-domain FVU",
          "delta_ce": "spliced delta CE (nats)"}
ADVICE = {
    "fvu": "more training tokens and steps per site, or a wider dictionary (or a larger k) where the dead fraction "
           "is already low",
    "dead_fraction": "more training tokens per site (latents the data never reaches die), or a narrower dictionary",
    "ood_fvu": "a training corpus that covers more registers, and more training tokens",
    "delta_ce": "more training steps, then a wider dictionary if the loss still rises",
}


@dataclass(frozen=True)
class QualityVerdict:
    verdict: str  # "adequate", "tentative" or "unknown" (no evaluations)
    failing: dict[str, list[int]]  # figure -> the layers above its threshold
    worst: dict[str, float | None]  # figure -> the worst value over the layers
    measured: dict[str, int]  # figure -> how many layers have it
    thresholds: dict[str, float] = field(default_factory=lambda: dict(GATES))
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality_verdict(rows: list[dict[str, Any]]) -> QualityVerdict:
    """The gates on per-layer rows ({"layer", "fvu", "dead_fraction", "ood_fvu", "delta_ce", ...}; None = not
    measured)."""
    failing: dict[str, list[int]] = {}
    worst: dict[str, float | None] = {}
    measured: dict[str, int] = {}
    for figure, threshold in GATES.items():
        values = [(r["layer"], r.get(figure)) for r in rows if r.get(figure) is not None]
        measured[figure] = len(values)
        worst[figure] = max((v for _, v in values), default=None)
        failing[figure] = [layer for layer, v in values if v > threshold]
    if not any(measured.values()):
        return QualityVerdict("unknown", failing, worst, measured)
    bad = [figure for figure, layers in failing.items() if layers]
    return QualityVerdict("tentative" if bad else "adequate", failing, worst, measured,
                          advice=[ADVICE[figure] for figure in bad])
