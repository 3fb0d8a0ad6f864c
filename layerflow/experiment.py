"""One experiment, one config file: what `layerflow run` reads (TOML) and stores resolved in run.json.

    [[models]]                  # one or more; several models add cross-model transfer
    name = "smollm2-135m"
    layers = "all"              # "all", "0:30:2", "3,7,11" or a list [3, 7, 11]

    [capture]                   # sites, token budget, text
    [train]                     # SAE architecture and LayerSchedule (preset + overrides + by_depth)
    [eval]                      # spliced CE/KL on or off, out-of-domain FVU tokens
    [transfer]                  # transfer.TransferOptions (built by the pipeline)
    [cross_model]               # words of text for the cross-model alignment

Every section and field is optional; `ExperimentConfig()` is the default run (configs/default.toml
spells it out). Unknown fields, wrong types and bad values are refused with a message that names
the field, the bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerflow import defaults
from layerflow.errors import LayerflowError, did_you_mean
from layerflow.files import SHARD_DTYPES
from layerflow.models.sites import parse_kind, parse_layers
from layerflow.models.zoo import ZOO, get_spec


# Where a section's default is a library default, it reads it from `layerflow.defaults`. Where it is
# not (marked "the study's budget"), it is the default study's own choice, sized to finish in about
# 15 minutes on two CPU cores; configs/default.toml spells out every value.


@dataclass(frozen=True)
class ModelEntry:
    name: str = defaults.MODEL
    layers: str | list[int] = "all"


@dataclass(frozen=True)
class CaptureSection:
    sites: list[str] = field(default_factory=lambda: list(defaults.SITE_KINDS))
    tokens: int = 60_000  # the study's budget, per model, train + held-out
    context_size: int = defaults.CONTEXT_SIZE
    source: str = defaults.SOURCE  # the shipped corpus; or a .txt/.txt.gz path, hf:DATASET[:CONFIG]
    holdout: float = defaults.HOLDOUT_FRACTION
    dtype: str = "float16"  # the study's storage dtype: half the disk and reading time
    batch_size: int = defaults.FORWARD_BATCH


@dataclass(frozen=True)
class TrainSection:
    preset: str = defaults.PRESET  # train.schedule.PRESETS
    architecture: str | None = None  # overrides the preset's
    # the study's, at every depth: lr 4e-3 measured best in a short run (docs/training.md, "Quality in a short run")
    set: dict[str, Any] = field(default_factory=lambda: {"expansion_factor": 4, "lr": 4e-3})
    by_depth: list[dict[str, Any]] = field(default_factory=list)  # [{upper = 0.33, l1_coefficient = 1.5e-4}, ...]
    steps: int | None = None  # None: `epochs` passes over the training tokens
    epochs: float = 2.0  # the study's budget
    batch_tokens: int = 1024  # the study's: more, smaller steps from the 15-minute token budget
    checkpoint_every: int = defaults.CHECKPOINT_EVERY

    def schedule(self):
        """The LayerSchedule: the preset, then `architecture`, `set` and `by_depth` over it."""
        # SAELens (its config classes check the hyperparameters) takes seconds to import: only a config
        # that gets this far pays for it, so a config file's own errors are refused at once.
        from layerflow.train.schedule import LayerSchedule, get_preset

        schedule = get_preset(self.preset).with_overrides(self.architecture, self.set)
        if not self.by_depth:
            return schedule
        bands = []
        for i, band in enumerate(self.by_depth):
            if "upper" not in band:
                raise LayerflowError(f"train.by_depth[{i}] has no 'upper' (the relative depth where it ends, "
                                     f"in (0, 1]); got {band}.")
            bands.append((float(band["upper"]), {k: v for k, v in band.items() if k != "upper"}))
        return LayerSchedule(schedule.architecture, schedule.base, bands)  # validates every key


@dataclass(frozen=True)
class EvalSection:
    spliced: bool = True  # splice each SAE into the model: delta CE and KL
    spliced_tokens: int = 1536  # held-out tokens for the spliced figures (each site re-runs the rest of the model)
    ood_tokens: int = defaults.OOD_TOKENS  # out-of-domain text for each SAE's out-of-domain FVU (0: none)


@dataclass(frozen=True)
class TransferSection:
    max_tokens: int = 4096  # the study's budget: held-out tokens per site
    top_k: int = defaults.TOP_K
    match_distance: int = defaults.MATCH_DISTANCE  # Hungarian matching for sites this close (0: none)
    reference_sites: int = defaults.REFERENCE_SITES  # sites with a second-seed SAE, the ceilings (0: none; floors stay)
    spliced: bool = False
    exclude_special_tokens: bool = True



@dataclass(frozen=True)
class CrossModelSection:
    words: int = defaults.CROSS_MODEL_WORDS  # aligned words of text (every 5th document held out)
    source: str = defaults.SOURCE
    match_pairs: str = "same_depth"  # the study's: feature matching for "all" pairs, each source's "same_depth" target, "none"


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    models: list[ModelEntry] = field(default_factory=lambda: [ModelEntry()])
    capture: CaptureSection = CaptureSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    transfer: TransferSection = TransferSection()
    cross_model: CrossModelSection = CrossModelSection()
    seed: int = defaults.SEED
    device: str = defaults.DEVICE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the config") -> "ExperimentConfig":
        cfg = _build(cls, data, where)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "the config") -> None:
        """Semantic checks, each naming the field: models, layers, sites, schedule, budgets."""
        if not self.models:
            raise LayerflowError(f"{where}: [[models]] is empty; name at least one model, e.g. 'smollm2-135m'.")
        names = [m.name for m in self.models]
        for name in names:
            if name not in ZOO:
                raise LayerflowError(f"{where}: models.name '{name}' is not in the zoo. {did_you_mean(name, list(ZOO))}")
        if len(set(names)) != len(names):
            raise LayerflowError(f"{where}: a model is listed twice in [[models]]: {names}.")
        for i, m in enumerate(self.models):
            try:
                self.layers(m)
            except LayerflowError as e:
                raise LayerflowError(f"{where}: models[{i}].layers: {e}") from None
        for kind in self.capture.sites:
            try:
                parse_kind(kind)
            except LayerflowError as e:
                raise LayerflowError(f"{where}: capture.sites: {e}") from None
        if not self.capture.sites:
            raise LayerflowError(f"{where}: capture.sites is empty; e.g. ['resid_post'].")
        if self.capture.dtype not in SHARD_DTYPES:
            raise LayerflowError(f"{where}: capture.dtype '{self.capture.dtype}' is not valid. Valid: {', '.join(SHARD_DTYPES)}.")
        if not 0 < self.capture.holdout < 1:
            raise LayerflowError(f"{where}: capture.holdout {self.capture.holdout} must lie in (0, 1): "
                                 "transfer and evals need held-out tokens.")
        positive = {"capture.tokens": self.capture.tokens, "capture.context_size": self.capture.context_size - 1,
                    "capture.batch_size": self.capture.batch_size, "train.batch_tokens": self.train.batch_tokens,
                    "train.checkpoint_every": self.train.checkpoint_every, "train.steps": self.train.steps or 1,
                    "train.epochs": self.train.epochs, "transfer.max_tokens": self.transfer.max_tokens, "eval.spliced_tokens": self.eval.spliced_tokens,
                    "transfer.top_k": self.transfer.top_k, "cross_model.words": self.cross_model.words}
        for key, value in positive.items():
            if value <= 0:
                shown = value + 1 if key == "capture.context_size" else value
                raise LayerflowError(f"{where}: {key} = {shown} must be {'at least 2' if key == 'capture.context_size' else 'positive'}.")
        if self.eval.ood_tokens < 0:
            raise LayerflowError(f"{where}: eval.ood_tokens = {self.eval.ood_tokens} must be 0 (none) or positive.")
        if self.cross_model.match_pairs not in defaults.MATCH_PAIRS:
            raise LayerflowError(f"{where}: cross_model.match_pairs '{self.cross_model.match_pairs}' is not valid. "
                                 f"{did_you_mean(self.cross_model.match_pairs, list(defaults.MATCH_PAIRS))}")
        if self.transfer.match_distance < 0:
            raise LayerflowError(f"{where}: transfer.match_distance = {self.transfer.match_distance} must be >= 0.")
        if self.transfer.reference_sites < 0:
            raise LayerflowError(f"{where}: transfer.reference_sites = {self.transfer.reference_sites} must be >= 0 "
                                 "(0: no seed twins, so no ceilings).")
        schedule = self.train.schedule()  # unknown architectures, hyperparameters and depth bands are refused here
        from layerflow.dictionaries.kinds import SAE_ARCHITECTURES, is_transcoder  # loaded by schedule() just now

        if is_transcoder(schedule.architecture):
            raise LayerflowError(f"{where}: train '{schedule.architecture}' is a transcoder; `layerflow run` trains SAEs "
                                 f"on the residual stream (valid: {', '.join(SAE_ARCHITECTURES)}). Train transcoders with "
                                 "`layerflow capture --sites mlp_in,mlp_out` then `layerflow train --preset transcoder`.")

    def layers(self, model: ModelEntry) -> list[int]:
        n_layers = get_spec(model.name).n_layers
        spec = model.layers if isinstance(model.layers, str) else ",".join(str(layer) for layer in model.layers)
        return parse_layers(spec, n_layers, model.name)

    def quick(self) -> "ExperimentConfig":
        """A smoke-test version of this experiment: 4 layers per model, few tokens and steps."""
        models = []
        for m in self.models:
            layers = self.layers(m)
            picks = sorted({layers[round(i * (len(layers) - 1) / 3)] for i in range(4)})
            models.append(dataclasses.replace(m, layers=picks))
        return dataclasses.replace(
            self, name=f"{self.name}-quick", models=models,
            capture=dataclasses.replace(self.capture, tokens=min(self.capture.tokens, 6000)),
            eval=dataclasses.replace(self.eval, spliced_tokens=min(self.eval.spliced_tokens, 512),
                                     ood_tokens=min(self.eval.ood_tokens, 1280)),
            train=dataclasses.replace(self.train, steps=40, batch_tokens=1024,
                                      set={**self.train.set, "expansion_factor": 2}),
            transfer=dataclasses.replace(self.transfer, max_tokens=min(self.transfer.max_tokens, 512)),
            cross_model=dataclasses.replace(self.cross_model, words=min(self.cross_model.words, 2000)))


def load_config(path: str | Path | None) -> ExperimentConfig:
    """Read a TOML config (None: the default experiment)."""
    if path is None:
        return ExperimentConfig()
    path = Path(path)
    if not path.is_file():
        raise LayerflowError(f"Config file '{path}' does not exist. Shipped configs are in configs/.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LayerflowError(f"Config file '{path}' is not valid TOML: {e}.") from None
    return ExperimentConfig.from_dict(data, where=str(path))


# ------------------------------------------------------------------ typed construction from dicts


def _build(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    """`cls(**data)` with every key and value checked against the dataclass's type hints."""
    if not isinstance(data, dict):
        raise LayerflowError(f"{where}: [{prefix.rstrip('.') or 'top level'}] must be a table, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise LayerflowError(f"{where}: unknown field '{prefix}{key}'. {did_you_mean(key, names)}")
        values[key] = _convert(hints[key], value, where, prefix + key)
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, name + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, name)
            except LayerflowError as e:
                errors.append(e)
        raise errors[-1]
    if origin is list:
        if not isinstance(value, list):
            raise LayerflowError(f"{where}: {name} must be a list, got {value!r}.")
        return [_convert(args[0], v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise LayerflowError(f"{where}: {name} must be a table, got {value!r}.")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise LayerflowError(f"{where}: {name} must be {_TYPE_NAMES[hint]}, got {value!r}.")
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
