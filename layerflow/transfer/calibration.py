"""How a dictionary meets another site's activations: the mean-and-spread match, fit on the train split.

Residual streams have a large mean as well as a growing norm (in SmolLM2 ||mean|| / E||x|| is
about 0.75 at every depth), and the mean changes from layer to layer. Multiplying x_j by
E||x_i|| / E||x_j|| (the scale-only match) matches the norm but hands SAE_i the wrong mean, and
the whole offset is then charged as unexplained variance. So dictionary i reads site j as

    x_j -> (x_j - mu_j) s_i / s_j + mu_i          (into site i's units)

and its output goes back by the inverse, x_hat -> (x_hat - mu_i) s_j / s_i + mu_j, where mu is a
site's mean and s = sqrt(E||x - mu||^2) its spread. EV is measured around the target's own mean,
so handing SAE_i the target's mean gives it nothing it could get credit for: the mean only stops
being charged as error. mu and s come from the train split (`Calibration.of`,
`ActivationStore.calibration`), never from the tokens a figure is scored on.

The same statistics give the persistence baseline its one parameter: the least-squares slope of
x_j on x_i (`Calibration.slope`), also fit on the train split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from layerflow.errors import LayerflowError


@dataclass(frozen=True)
class SiteMatch:
    """x_target -> alpha x_target + shift (source units), and back by the inverse; float32 vectors."""

    alpha: float  # s_source / s_target
    shift: Float[Tensor, " d"]  # mu_source - alpha mu_target
    source_mean: Float[Tensor, " d"]
    target_mean: Float[Tensor, " d"]

    def to_source(self, x: Float[Tensor, "tokens d"]) -> Float[Tensor, "tokens d"]:
        return torch.add(self.shift, x, alpha=self.alpha)

    def to_target(self, x_hat: Float[Tensor, "tokens d"]) -> Float[Tensor, "tokens d"]:
        return (x_hat - self.source_mean) / self.alpha + self.target_mean

    def to(self, device: str) -> "SiteMatch":
        return SiteMatch(self.alpha, self.shift.to(device), self.source_mean.to(device), self.target_mean.to(device))


@dataclass(frozen=True)
class Calibration:
    """Train-split statistics of some sites on the same tokens: each site's mean, and the centered
    second moments E<x_i - mu_i, x_j - mu_j> between sites of the same width (s_i^2 on the diagonal)."""

    hooks: list[str]
    means: dict[str, Float[Tensor, " d"]]  # float64
    moments: Float[Tensor, "sites sites"]  # float64; NaN between sites of different widths
    n_tokens: int

    @classmethod
    def of(cls, activations: dict[str, Float[Tensor, "tokens d"]]) -> "Calibration":
        """From in-memory activations (row t of every site the same token)."""
        return cls.accumulate(list(activations), [[activations[h] for h in activations]])

    @classmethod
    def accumulate(cls, hooks: list[str], chunks: Iterable[list[Float[Tensor, "tokens d"]]]) -> "Calibration":
        """Streaming: `chunks` yields, per batch of tokens, one tensor per hook (in `hooks` order)."""
        n, total = len(hooks), 0
        sums: list[Tensor] = []
        raw = torch.zeros(n, n, dtype=torch.float64)
        widths: list[int] = []
        for chunk in chunks:
            flat = [x.double() for x in chunk]
            if not sums:
                sums, widths = [x.sum(0) for x in flat], [x.shape[1] for x in flat]
            else:
                sums = [s + x.sum(0) for s, x in zip(sums, flat)]
            for width in set(widths):
                group = [i for i in range(n) if widths[i] == width]
                stacked = torch.stack([flat[i].reshape(-1) for i in group])
                raw[torch.tensor(group)[:, None], torch.tensor(group)] += stacked @ stacked.T
            total += flat[0].shape[0]
        if total < 2:
            raise LayerflowError(f"Need at least 2 tokens to fit the sites' means and spreads, got {total}.")
        means = [s / total for s in sums]
        moments = torch.full((n, n), math.nan, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                if widths[i] == widths[j]:
                    moments[i, j] = raw[i, j] / total - means[i] @ means[j]
        return cls(list(hooks), dict(zip(hooks, means)), moments, total)

    def _index(self, hook: str) -> int:
        if hook not in self.means:
            raise LayerflowError(f"No train-split statistics for '{hook}'. Calibrated: {', '.join(self.hooks)}.")
        return self.hooks.index(hook)

    def spread(self, hook: str) -> float:
        """sqrt(E||x - mu||^2) on the train split."""
        i = self._index(hook)
        return math.sqrt(max(self.moments[i, i].item(), 0.0))

    def match(self, source: str, target: str) -> SiteMatch:
        """How the dictionary of `source` reads `target` (and how its output is mapped back)."""
        s_source, s_target = self.spread(source), self.spread(target)
        if s_source == 0 or s_target == 0:
            flat = source if s_source == 0 else target
            raise LayerflowError(f"Site '{flat}' has no variance on the train split: it cannot be matched.")
        alpha = s_source / s_target
        mu_s, mu_t = self.means[source], self.means[target]
        return SiteMatch(alpha, (mu_s - alpha * mu_t).float(), mu_s.float(), mu_t.float())

    def slope(self, source: str, target: str) -> float:
        """a of the least-squares map x_target ~ mu_target + a (x_source - mu_source) (0 for a flat source)."""
        i, j = self._index(source), self._index(target)
        var = self.moments[i, i].item()
        return self.moments[i, j].item() / var if var > 0 else 0.0

    def summary(self) -> dict:
        """What a matrix's settings record about its calibration."""
        return {"split": "train", "n_tokens": self.n_tokens,
                "spread": {h: self.spread(h) for h in self.hooks},
                "mean_norm": {h: self.means[h].norm().item() for h in self.hooks}}
