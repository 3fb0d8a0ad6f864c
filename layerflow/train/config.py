"""What a training run is asked to do: `TrainConfig`, whose `plan()` is what a rerun compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerflow import defaults
from layerflow.capture.writer import CaptureConfig
from layerflow.train.schedule import LayerSchedule, get_preset


def dead_feature_window(steps: int) -> int:
    """The default window: a fifth of the run, between 10 and 1000 steps. SAELens' 1000 suits runs of
    tens of thousands of steps; in the default study's 104 it never acts, and a window of 20 cut the
    dead fraction by a third there (docs/training.md)."""
    low, high = defaults.DEAD_WINDOW_RANGE
    return int(min(high, max(low, round(defaults.DEAD_WINDOW_FRACTION * steps))))


@dataclass
class TrainConfig:
    store: str  # a capture directory; with `online`, where its held-out split is captured
    hooks: list[str] | None = None  # None: every captured site
    schedule: LayerSchedule = field(default_factory=lambda: get_preset(defaults.PRESET))
    steps: int | None = None  # None: `epochs` passes over the training tokens
    epochs: float = defaults.EPOCHS
    batch_tokens: int = defaults.BATCH_TOKENS
    lr_scheduler: str = "constant"  # SAELens' names: constant, cosineannealing, ...
    lr_warm_up_steps: int = 0  # linear warm-up, as in SAELens
    lr_decay_steps: int = 0  # linear decay to 0 over the last steps, as in SAELens
    exclude_special_tokens: bool = True
    dead_feature_window: int | None = defaults.DEAD_FEATURE_WINDOW  # None: `dead_feature_window(steps)`
    # TopK-family SAEs: over this fraction of the steps k falls linearly from K_ANNEAL_START * k to k
    k_anneal_fraction: float = defaults.K_ANNEAL_FRACTION
    checkpoint_every: int = defaults.CHECKPOINT_EVERY
    seed: int = defaults.SEED
    fast_path: bool = True  # stack TopK-family SAEs in sparse_topk; False: SAELens' step for all
    # "mean": the decoder bias starts at the mean training activation (as in EleutherAI's sparsify),
    # so a short run starts at FVU 1 rather than far above it where the mean is large (Gemma's
    # massive activations); "zeros": SAELens' own init.
    init_b_dec: str = "mean"
    transcoder_target: str = defaults.TRANSCODER_TARGET  # with a transcoder architecture: the site kind each input predicts
    samples_every: int = defaults.SAMPLES_EVERY  # every N steps, record each latent's top-activating held-out tokens (0: never)
    samples_tokens: int = 4096  # held-out tokens those samples are drawn from
    # Online: train from model forwards on this capture's training sequences (nothing of them is
    # stored); only its held-out split is captured, to `store`, for the evals.
    online: CaptureConfig | None = None

    def window(self, steps: int) -> int:
        """Steps without firing before a latent counts as dead, in a run of `steps` steps."""
        return self.dead_feature_window if self.dead_feature_window is not None else dead_feature_window(steps)

    def plan(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        if self.online is not None:
            d["online"]["kinds"] = [k.value for k in self.online.kinds]
        d["store"] = str(Path(self.store).resolve())
        return d
