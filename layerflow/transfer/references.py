"""Floors and ceilings: what a transfer or matching figure gives when no features are shared, and
what it gives when the same features are learned twice. A relative transfer of 0.4 or a match rate
of 30% means nothing without them.

- **Floor** (every site for relative transfer, the reference sites for matching): dictionary D_i
  with its encoder and decoder rotated at random inside site i's principal subspace (the fewest
  principal directions holding 90% of the train-split variance; `Calibration.rotation`), scored
  on site i as any transfer is. It keeps D_i's sparsity, its decoder norms and mutual angles and
  the subspace the data lives in, and shares none of the data's features. Scoring the rotated
  dictionary on x equals scoring D_i on the rotated data mu + (x - mu) Q, which is how it is
  computed. Why this floor: a rotation of the whole space would point the decoder where the data
  has no variance and make the floor too low; shuffling tokens changes nothing token by token;
  a model with random weights needs a capture of its own.
- **Ceiling** (the reference sites): a second dictionary trained on the same data with another
  seed. Its relative transfer and its matching to the first are what "the same features" look
  like in practice: published seed-to-seed overlap is only 30-53% (Paulo & Belrose 2025).

Matching floors and ceilings cost a Hungarian matching each, so they are measured at a few
reference sites, and `References.at` interpolates between them in depth (`interpolated` says
where).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sae_lens import SAE

from layerflow.metrics import ReconstructionStats
from layerflow.transfer.calibration import Calibration
from layerflow.transfer.coder import Coder, LinearCoder, dense_latents, make_coder, predict_batch
from layerflow.transfer.matching import decoder_top1_cosine, match_activations, match_decoders

METRICS = ("relative_transfer", "decoder_matched_fraction", "activation_matched_fraction", "decoder_top1_cosine_mean")
HOW = {
    "floor": "the site's own dictionary rotated at random inside the site's principal subspace (90% of its "
             "train-split variance), scored on the site: same sparsity, norms and subspace, no shared features",
    "ceiling": "a second dictionary trained on the same data with another seed, compared with the first at its site",
}


@dataclass
class References:
    """Per metric, per site (hook name): the floor and the ceiling measured there."""

    floor: dict[str, dict[str, float]] = field(default_factory=dict)
    ceiling: dict[str, dict[str, float]] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)  # hook -> layer, for interpolating in depth

    def at(self, kind: str, metric: str, hook: str) -> tuple[float, bool]:
        """(value, interpolated) of the floor or ceiling of `metric` at `hook`: measured there, or
        interpolated linearly in layer between the sites where it was measured (NaN if none)."""
        measured = getattr(self, kind).get(metric, {})
        if hook in measured:
            return measured[hook], False
        points = sorted((self.layers[h], v) for h, v in measured.items() if not math.isnan(v))
        if not points or hook not in self.layers:
            return math.nan, False
        xs, ys = zip(*points)
        return float(np.interp(self.layers[hook], xs, ys)), True

    def summary(self, kind: str, metric: str) -> tuple[float, int]:
        """(mean over the sites where it was measured, how many sites)."""
        values = [v for v in getattr(self, kind).get(metric, {}).values() if not math.isnan(v)]
        return (float(np.mean(values)) if values else math.nan), len(values)

    def to_dict(self) -> dict[str, Any]:
        clean = lambda d: {m: {h: (None if math.isnan(v) else v) for h, v in by.items()} for m, by in d.items()}  # noqa: E731
        return {"floor": clean(self.floor), "ceiling": clean(self.ceiling), "layers": self.layers, "how": HOW}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "References":
        back = lambda d: {m: {h: (math.nan if v is None else v) for h, v in by.items()} for m, by in d.items()}  # noqa: E731
        return cls(back(data.get("floor", {})), back(data.get("ceiling", {})), dict(data.get("layers", {})))


@torch.no_grad()
def measure_references(saes: dict[str, SAE], activations: dict[str, torch.Tensor], layers: dict[str, int],
                       calibration: Calibration, twins: dict[str, SAE] | None = None,
                       reference_hooks: list[str] | None = None, sequences: torch.Tensor | None = None,
                       batch_tokens: int = 2048, null_quantile: float = 0.99, seed: int = 0,
                       device: str = "cpu") -> References:
    """Floors at every site of `saes` (relative transfer) and at `reference_hooks` (matching; default:
    the hooks of `twins`); ceilings at every hook of `twins` (seed twins of the same sites).
    `calibration` needs covariances (`covariance=True`)."""
    twins = twins or {}
    reference_hooks = list(reference_hooks if reference_hooks is not None else twins)
    refs = References(layers=dict(layers))
    for name in METRICS:
        refs.floor[name], refs.ceiling[name] = {}, {}
    for i, (hook, sae) in enumerate(saes.items()):
        x = activations[hook].to(device, torch.float32)
        coder = make_coder(sae, device)
        own = _ev(coder, x, batch_tokens)
        rotation = calibration.rotation(hook, seed + 7919 * (i + 1)).to(device)
        mean = calibration.means[hook].float().to(device)
        rotated = (x - mean) @ rotation + mean
        refs.floor["relative_transfer"][hook] = _ev(coder, rotated, batch_tokens) / own
        if hook in reference_hooks:
            latents = dense_latents(coder, x, batch_tokens)
            dec = sae.W_dec.detach().float()
            null = calibration.rotation(hook, seed + 1).to(dec.device)
            rotated_dec = dec @ calibration.rotation(hook, seed + 2).to(dec.device).T
            floor_dec = match_decoders(dec, rotated_dec, null_quantile, seed, null)
            floor_act = match_activations(latents, dense_latents(coder, rotated, batch_tokens), null_quantile, seed,
                                          sequences=sequences)
            refs.floor["decoder_matched_fraction"][hook] = floor_dec.fraction_significant
            refs.floor["activation_matched_fraction"][hook] = floor_act.fraction_significant
            refs.floor["decoder_top1_cosine_mean"][hook] = decoder_top1_cosine(dec, rotated_dec).mean().item()
        if hook in twins:
            twin = make_coder(twins[hook], device)
            twin_dec = twins[hook].W_dec.detach().float()
            null = calibration.rotation(hook, seed + 1).to(twin_dec.device)
            refs.ceiling["relative_transfer"][hook] = _ev(twin, x, batch_tokens) / own
            refs.ceiling["decoder_matched_fraction"][hook] = match_decoders(
                sae.W_dec.detach().float(), twin_dec, null_quantile, seed, null).fraction_significant
            refs.ceiling["activation_matched_fraction"][hook] = match_activations(
                dense_latents(coder, x, batch_tokens), dense_latents(twin, x, batch_tokens), null_quantile, seed,
                sequences=sequences).fraction_significant
            refs.ceiling["decoder_top1_cosine_mean"][hook] = decoder_top1_cosine(
                sae.W_dec.detach().float(), twin_dec).mean().item()
    return refs


def _ev(coder: Coder, x: torch.Tensor, batch_tokens: int) -> float:
    """EV on `x` of the coder's reconstruction of x."""
    stats = ReconstructionStats()
    d_sae = coder.W_enc.shape[1] if isinstance(coder, LinearCoder) else coder.sae.cfg.d_sae
    buffers = tuple(torch.empty(2, min(batch_tokens, len(x)), d_sae, device=x.device))
    for chunk in x.split(batch_tokens):
        stats.add(chunk, predict_batch(coder, chunk, buffers))
    return stats.compute().explained_variance
