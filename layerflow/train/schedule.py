"""Layer-aware SAE hyperparameters: relative depth -> SAELens training config.

A `LayerSchedule` holds hyperparameters shared by every layer (`base`) and piecewise-constant
overrides by relative depth (`by_depth`: a list of `(upper_depth, overrides)`, upper bounds
increasing, the last one 1.0). Relative depth is layer / (n_layers - 1), so 0 is the first layer
and 1 the last, whatever the model.

Keys are either fields of the architecture's SAELens `TrainingSAEConfig` (e.g. `k`,
`l1_coefficient`, `normalize_activations`), `expansion_factor` (d_sae = expansion_factor * d_in), `matryoshka_fractions` (Matryoshka prefix
widths as fractions of d_sae),
or trainer settings in `TRAINER_KEYS` (e.g. `lr`), which the trainer reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sae_lens.registry import get_sae_training_class

# kinds imports dictionaries.transcoders, which registers the transcoder training classes with SAELens
from layerflow.dictionaries.kinds import ARCHITECTURES, is_transcoder
from layerflow.errors import LayerflowError, did_you_mean

DEFAULT_MATRYOSHKA_FRACTIONS = (1 / 16, 1 / 4, 1.0)  # nested prefixes, as fractions of d_sae
TRAINER_KEYS = {"lr"}  # the trainer setting that may vary with depth; the rest are in train.TrainConfig


@dataclass(frozen=True)
class LayerSchedule:
    architecture: str = "batchtopk"
    base: dict[str, Any] = field(default_factory=dict)
    by_depth: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise LayerflowError(f"Unknown SAE architecture '{self.architecture}'. {did_you_mean(self.architecture, ARCHITECTURES)}")
        uppers = [upper for upper, _ in self.by_depth]
        if uppers and (uppers != sorted(uppers) or uppers[-1] != 1.0 or uppers[0] <= 0):
            raise LayerflowError(f"by_depth upper bounds must increase within (0, 1] and end at 1.0; got {uppers}.")
        for key in {*self.base, *(k for _, o in self.by_depth for k in o)}:
            if key not in self.valid_keys():
                raise LayerflowError(f"Unknown hyperparameter '{key}' for {self.architecture}. {did_you_mean(key, sorted(self.valid_keys()))}")

    def valid_keys(self) -> set[str]:
        config_fields = {f.name for f in dataclasses.fields(_config_class(self.architecture))}
        derived = {"expansion_factor"} | ({"matryoshka_fractions"} if "matryoshka_widths" in config_fields else set())
        return (config_fields - {"d_in", "d_sae", "d_out", "metadata"}) | derived | TRAINER_KEYS

    def with_overrides(self, architecture: str | None = None, base: dict[str, Any] | None = None) -> "LayerSchedule":
        """This schedule for another architecture and/or with `base` values on top. Keys of this
        schedule that the new architecture lacks (a preset's `k` for a ReLU SAE) are dropped;
        keys in `base` must all be valid."""
        architecture = architecture or self.architecture
        valid = dataclasses.replace(self, architecture=architecture, base={}, by_depth=[]).valid_keys()
        kept = {k: v for k, v in self.base.items() if k in valid}
        by_depth = [(upper, {k: v for k, v in o.items() if k in valid}) for upper, o in self.by_depth]
        changed = architecture != self.architecture or bool(base)
        return LayerSchedule(architecture, {**kept, **(base or {})}, by_depth, "" if changed else self.description)

    def values(self, layer: int, n_layers: int) -> dict[str, Any]:
        """Every hyperparameter for `layer`: base, then the first depth band that contains it."""
        depth = relative_depth(layer, n_layers)
        merged = dict(self.base)
        for upper, overrides in self.by_depth:
            if depth <= upper + 1e-9:
                merged.update(overrides)
                break
        return merged

    def sae_config(self, layer: int, n_layers: int, d_in: int, **extra: Any):
        """The SAELens TrainingSAEConfig for `layer` (trainer keys left out)."""
        values = self.values(layer, n_layers)
        d_sae = int(values.pop("expansion_factor", 8) * d_in)
        fractions = values.pop("matryoshka_fractions", DEFAULT_MATRYOSHKA_FRACTIONS)
        if self.architecture.startswith("matryoshka") and "matryoshka_widths" not in values:
            # Widths scale with d_sae, which differs by layer and model; the last is always d_sae.
            values["matryoshka_widths"] = sorted({max(1, round(f * d_sae)) for f in fractions} | {d_sae})
        sae_fields = {k: v for k, v in values.items() if k not in TRAINER_KEYS}
        if is_transcoder(self.architecture):
            # A transcoder's input and target have their own scales: the trainer applies
            # `normalize_activations` to both and folds the factors in (transcoders.to_inference).
            sae_fields.pop("normalize_activations", None)
        return _config_class(self.architecture)(d_in=d_in, d_sae=d_sae, **sae_fields, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "base": self.base,
                "by_depth": [[upper, overrides] for upper, overrides in self.by_depth], "description": self.description}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerSchedule":
        return cls(data.get("architecture", "batchtopk"), dict(data.get("base", {})),
                   [(float(u), dict(o)) for u, o in data.get("by_depth", [])], data.get("description", ""))


def relative_depth(layer: int, n_layers: int) -> float:
    if not 0 <= layer < n_layers:
        raise LayerflowError(f"Layer {layer} is out of range: valid layers are 0..{n_layers - 1}.")
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def _config_class(architecture: str):
    return get_sae_training_class(architecture)[1]


PRESETS: dict[str, LayerSchedule] = {
    "default": LayerSchedule(
        "batchtopk",
        {"expansion_factor": 8, "k": 32, "lr": 3e-4, "normalize_activations": "expected_average_only_in",
         "topk_threshold_lr": 0.1},
        description="BatchTopK, 8x, k=32 at every depth; activations scaled per layer so one setting fits all depths; "
                    "the inference threshold's EMA at rate 0.1 (SAELens' 0.01 leaves it at 65% of its value after "
                    "100 steps: L0 about 4x k).",
    ),
    "transcoder": LayerSchedule(
        "matryoshka_batchtopk_transcoder",
        {"expansion_factor": 2, "k": 48, "lr": 3e-4, "normalize_activations": "expected_average_only_in",
         "topk_threshold_lr": 0.1},
        description="The notes' Matryoshka transcoder (file 003): 2x d_model, L0 target 48; BatchTopK with nested "
                    "prefixes at 1/16, 1/4 and all of the dictionary, each predicting the MLP output; "
                    "the threshold EMA at 0.1 as in the default preset.",
    ),
    "notes": LayerSchedule(
        "standard",
        {"expansion_factor": 8, "lr": 3e-4, "normalize_activations": "expected_average_only_in"},
        [(1 / 3, {"l1_coefficient": 1.5e-4}), (2 / 3, {"l1_coefficient": 1e-4}), (1.0, {"l1_coefficient": 5e-5})],
        description="The research notes: ReLU+L1, 8x; L1 1.5e-4 in the first third of layers, 1e-4 in the middle, 5e-5 in the last.",
    ),
}


def get_preset(name: str) -> LayerSchedule:
    try:
        return PRESETS[name]
    except KeyError:
        raise LayerflowError(f"Unknown schedule preset '{name}'. {did_you_mean(name, list(PRESETS))}") from None
