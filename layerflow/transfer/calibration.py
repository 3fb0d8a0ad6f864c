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
x_j on x_i (`Calibration.slope`), also fit on the train split. With `covariance=True` each site's
covariance is kept too, for `Calibration.rotation`: a random rotation inside the site's principal
subspace, which the floors and the decoder null of feature matching use (real decoders live in
the data's high-variance subspace, so a rotation of the whole space is too easy a null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
        """(x_hat - mu_source) / alpha + mu_target, in one pass."""
        return torch.add(self.target_mean - self.source_mean / self.alpha, x_hat, alpha=1 / self.alpha)

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
    covariances: dict[str, Float[Tensor, "d d"]] | None = None  # float64, with `covariance=True`
    _eigen: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, activations: dict[str, Float[Tensor, "tokens d"]], covariance: bool = False) -> "Calibration":
        """From in-memory activations (row t of every site the same token)."""
        return cls.accumulate(list(activations), [[activations[h] for h in activations]], covariance)

    @classmethod
    def accumulate(cls, hooks: list[str], chunks: Iterable[list[Float[Tensor, "tokens d"]]],
                   covariance: bool = False) -> "Calibration":
        """Streaming: `chunks` yields, per batch of tokens, one tensor per hook (in `hooks` order)."""
        n, total = len(hooks), 0
        sums: list[Tensor] = []
        raw = torch.zeros(n, n, dtype=torch.float64)
        widths: list[int] = []
        centre: list[Tensor] = []  # second moments are summed around the first chunk's mean (float32 matmuls)
        scatter: list[Tensor] = []
        for chunk in chunks:
            flat = [x.double() for x in chunk]
            if not sums:
                sums, widths = [x.sum(0) for x in flat], [x.shape[1] for x in flat]
                if covariance:
                    centre = [x.mean(0) for x in flat]
                    scatter = [torch.zeros(w, w, dtype=torch.float64) for w in widths]
            else:
                sums = [s + x.sum(0) for s, x in zip(sums, flat)]
            for i, c in enumerate(centre):
                xc = (flat[i] - c).float()
                scatter[i] += (xc.T @ xc).double()
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
        covariances = None
        if covariance:
            shifts = [m - c for m, c in zip(means, centre)]
            covariances = {h: scatter[i] / total - torch.outer(shifts[i], shifts[i]) for i, h in enumerate(hooks)}
        return cls(list(hooks), dict(zip(hooks, means)), moments, total, covariances)

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

    def rotation(self, hook: str, seed: int, variance_kept: float = 0.9) -> Float[Tensor, "d d"]:
        """A Haar-random rotation (float32) inside the span of the fewest principal directions of
        `hook` that hold `variance_kept` of its variance (at least 2), the identity outside it."""
        vectors, m = self._principal(hook, variance_kept)
        U = vectors[:, :m]
        R = haar_orthogonal(m, seed)
        return (torch.eye(len(U), dtype=torch.float64) - U @ U.T + U @ R @ U.T).float()

    def principal_dimension(self, hook: str, variance_kept: float = 0.9) -> int:
        """How many principal directions hold `variance_kept` of the site's variance (at least 2)."""
        return self._principal(hook, variance_kept)[1]

    def _principal(self, hook: str, variance_kept: float) -> tuple[Tensor, int]:
        if self.covariances is None:
            raise LayerflowError("This calibration has no covariances: build it with covariance=True.")
        self._index(hook)
        if hook not in self._eigen:  # one eigendecomposition per site, however many rotations are drawn
            values, vectors = torch.linalg.eigh(self.covariances[hook])
            self._eigen[hook] = values.flip(0).clamp(min=0), vectors.flip(1)
        values, vectors = self._eigen[hook]
        m = int((values.cumsum(0) < variance_kept * values.sum()).sum().item()) + 1
        return vectors, max(2, min(m, len(values)))

    def summary(self) -> dict:
        """What a matrix's settings record about its calibration."""
        return {"split": "train", "n_tokens": self.n_tokens,
                "spread": {h: self.spread(h) for h in self.hooks},
                "mean_norm": {h: self.means[h].norm().item() for h in self.hooks}}


def haar_orthogonal(d: int, seed: int) -> Float[Tensor, "d d"]:
    """A Haar-distributed random d x d orthogonal matrix (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # QR's sign convention biases Q; diag(R) > 0 makes it exactly Haar
