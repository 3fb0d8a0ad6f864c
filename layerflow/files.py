"""The on-disk contract: every file and folder layerflow writes, the manifests that say a stage is
finished, and how they are written.

Each stage hands the next one a folder. A folder holds a plan, written first (what is being made;
a rerun compares it), and a manifest, written last (its presence means "complete"):

    capture        plan.json, shards/<split>-NNNNN.safetensors (+ a .json sidecar each), capture.json
    training run   plan.json, checkpoints/step-N/, saes/<hook>/ (SAELens folders), samples/step-N/,
                   curves.json, evals.json, evals.csv, feature_frequency.safetensors, train.json
    transfer       matched_features.json, summary.json, depth_comparison.json (cross-model),
                   transfer_matrix.csv, transfer_matrix.json (the manifest, written last)
    run            run.json (config, provenance, stages), activations/<model>/ (a capture),
                   saes/<model>/ (a training run, its SAE folders directly inside),
                   transfer/<model>/, transfer/<model_a>~<model_b>/, plots/,
                   features/<model>/<hook>.safetensors, summary.json, report.md

Every file is written to a temporary name beside it and renamed into place (`atomic`), so a
crash never leaves half a file under the real name. `prepare_out_dir` is the one rule for a
stage's output folder. (The user cache, which every run shares, is `layerflow.cache`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from layerflow.cache import replace_on_success
from layerflow.errors import LayerflowError
from layerflow.models.sites import Site

# --- names ---------------------------------------------------------------------------------------

PLAN_FILE = "plan.json"  # a capture's or a training run's plan
SHARD_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a capture may store activations in

CAPTURE_MANIFEST = "capture.json"
SHARD_DIR = "shards"
TOKENS_KEY = "tokens"  # every shard holds the token ids [seqs, ctx] beside one tensor per hook

TRAIN_MANIFEST = "train.json"
CURVES_FILE = "curves.json"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
SAE_DIR = "saes"  # a training run's SAE folders; in a run folder, one training run per model

EVAL_JSON, EVAL_CSV, FREQUENCY_FILE = "evals.json", "evals.csv", "feature_frequency.safetensors"

TRANSFER_DIR = "transfer"
CEILING_DIR = "ceiling"  # in a run folder, per model: SAEs of a few sites trained with another seed (transfer ceilings)
MATRIX_JSON, MATRIX_CSV = "transfer_matrix.json", "transfer_matrix.csv"
REPLICATES_SUFFIX = ".bootstrap.npz"  # beside <stem>.json: each bootstrap resample of the matrix, for derived figures' intervals
MATCHED_FILE = "matched_features.json"
SUMMARY_FILE = "summary.json"  # a transfer folder's summaries, and a run's summary
DEPTH_FILE = "depth_comparison.json"

RUN_FILE = "run.json"
ACTIVATIONS_DIR = "activations"
PLOTS_DIR = "plots"
FEATURES_DIR = "features"
REPORT_FILE = "report.md"
CROSS_SEPARATOR = "~"  # transfer/<model_a>~<model_b>: model names never hold it


def cross_dir_name(model_a: str, model_b: str) -> str:
    """The folder of model A's dictionaries applied to model B's sites."""
    return f"{model_a}{CROSS_SEPARATOR}{model_b}"


def run_store(run: str | Path) -> str:
    """The capture a training run read (its held-out split is what evals and transfer use)."""
    run = Path(run)
    if not (run / PLAN_FILE).exists():
        raise LayerflowError(f"'{run}' is not a layerflow training run: pass --store with held-out activations.")
    return json.loads((run / PLAN_FILE).read_text())["store"]


# --- output folders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderKind:
    """What a stage writes into its output folder, as far as `prepare_out_dir` needs to know."""

    name: str  # what refusals call it
    plan_file: str  # written first: what is being made
    manifest_file: str | None  # written last: its presence means "complete" (None: the stages decide)
    other_plan: str  # how a refusal names a folder that holds another plan
    plan_key: str | None = None  # where the plan sits inside the plan file (None: it is the whole file)
    owned: tuple[str, ...] | None = None  # what --overwrite removes (None: everything in the folder)


CAPTURE = FolderKind("capture", PLAN_FILE, CAPTURE_MANIFEST, "a different capture")
TRAINING_RUN = FolderKind("training run", PLAN_FILE, TRAIN_MANIFEST, "SAEs from a different training run")
# A run folder also keeps the feature-description cache and whatever else its owner puts there.
RUN = FolderKind("run", RUN_FILE, None, "a run with a different config", plan_key="config",
                 owned=(ACTIVATIONS_DIR, SAE_DIR, CEILING_DIR, TRANSFER_DIR, PLOTS_DIR, REPORT_FILE, SUMMARY_FILE, RUN_FILE))


def prepare_out_dir(folder: str | Path, kind: FolderKind, plan: dict[str, Any], overwrite: bool = False) -> str:
    """The one rule for a stage's output folder: "fresh", "resume" or "complete".

    - A missing or empty folder is fresh.
    - A folder without the plan file was not written by layerflow: it is refused, even with
      `overwrite`, and nothing in it is touched.
    - The same plan: "complete" when the manifest is there, else "resume" (finished work is kept).
    - Another plan: refused, naming what differs, unless `overwrite`.
    - With `overwrite`, what layerflow wrote there is removed and the folder is fresh.

    Nothing is written here: a stage writes its plan when its work starts.
    """
    folder = Path(folder)
    if not folder.exists() or not any(folder.iterdir()):
        return "fresh"
    plan_path = folder / kind.plan_file
    if not plan_path.exists():
        saes = " (it holds SAEs that this run did not write)" if any(folder.rglob("cfg.json")) else ""
        raise LayerflowError(f"Output folder '{folder}' is not empty and holds no layerflow {kind.name}{saes}. "
                             "Choose another --out.")
    old = json.loads(plan_path.read_text())
    old = old[kind.plan_key] if kind.plan_key else old
    if overwrite:
        for entry in list(folder.iterdir()) if kind.owned is None else [folder / name for name in kind.owned]:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        return "fresh"
    if old != json.loads(json.dumps(plan)):  # the plan as it reads back from disk
        diffs = plan_differences(old, json.loads(json.dumps(plan)))
        raise LayerflowError(f"Output folder '{folder}' holds {kind.other_plan} ({'; '.join(diffs[:5])}). "
                             "Choose another --out, or pass --overwrite to replace it.")
    return "complete" if kind.manifest_file and (folder / kind.manifest_file).exists() else "resume"


def plan_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every value that differs, nested tables followed key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in plan_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# --- manifests -----------------------------------------------------------------------------------


@dataclass
class ShardRecord:
    """One shard of a capture; also its sidecar <shard>.json, written once the shard is complete."""

    file: str
    split: str  # "train" or "heldout"
    first_seq: int
    n_seqs: int
    n_tokens: int
    checksum: str  # "xxh3_128:<hex>" of the whole file
    norm_sums: dict[str, float]  # per hook: sum of activation L2 norms over non-special tokens
    norm_count: int  # number of non-special tokens


@dataclass
class CaptureManifest:
    """capture.json: what a finished capture holds (`layerflow.capture`)."""

    schema_version: int
    layerflow_version: str
    model: dict[str, Any]  # name, official_name, family, weights_source, from_pretrained_kwargs, n_layers
    sites: list[Site]  # records (layer, kind, hook_name, d) in the file; read back with the model's name and depth
    layers: list[int]
    d_model: int
    dtype: str
    context_size: int
    prepend_bos: bool
    bos_token_id: int | None
    special_token_ids: list[int]
    text_source: dict[str, Any]
    split: dict[str, int]  # train_seqs, heldout_seqs, train_tokens, heldout_tokens
    n_tokens: int
    shards: list[ShardRecord]
    mean_norm: dict[str, float]  # per hook, over non-special tokens of all shards
    seconds: float

    def __post_init__(self) -> None:
        model = self.model
        self.sites = [s if isinstance(s, Site) else Site.from_dict(s, model=model["name"], n_layers=model.get("n_layers", 0))
                      for s in self.sites]

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"sites": [s.to_dict(SITE_KEYS) for s in self.sites]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CaptureManifest":
        data = json.loads(text)
        data["shards"] = [ShardRecord(**s) for s in data["shards"]]
        return cls(**data)

    @classmethod
    def read(cls, folder: str | Path) -> "CaptureManifest":
        return cls.from_json((Path(folder) / CAPTURE_MANIFEST).read_text())

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / CAPTURE_MANIFEST
        atomic_write_text(path, self.to_json())
        return path


SITE_KEYS = ("layer", "kind", "hook_name", "d")  # a site in capture.json


@dataclass
class SiteResult:
    """One site of a finished training run."""

    hook_name: str
    layer: int
    folder: str  # relative to the run directory
    hyperparameters: dict[str, Any]  # this site's schedule values
    scaling_factor: float
    first_loss: float  # total loss of the first step (scaled units)
    final_loss: float  # mean total loss over the last 10% of steps (scaled units)
    evals: dict[str, Any] | None = None
    hook_name_out: str | None = None  # a transcoder's target site
    target_scaling_factor: float | None = None  # a transcoder's target scale


@dataclass
class TrainManifest:
    """train.json: what a finished training run made (`layerflow.train`)."""

    layerflow_version: str
    config: dict[str, Any]
    model: dict[str, Any]
    steps: int
    tokens_per_site: int
    seconds: float
    sites: list[SiteResult]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainManifest":
        data = json.loads(text)
        data["sites"] = [SiteResult(**s) for s in data["sites"]]
        return cls(**data)

    @classmethod
    def read(cls, folder: str | Path) -> "TrainManifest":
        return cls.from_json((Path(folder) / TRAIN_MANIFEST).read_text())

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / TRAIN_MANIFEST
        atomic_write_text(path, self.to_json())
        return path


# --- writing -------------------------------------------------------------------------------------


def atomic(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary path beside `path` (`<name>.tmp`) to write a file or a folder to; it replaces
    `path` when the block succeeds and is removed when it fails."""
    path = Path(path)
    return replace_on_success(path, path.with_name(path.name + ".tmp"))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any, indent: int | None = None) -> Path:
    """`data` as JSON at `path` (its folder made if needed), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=indent))
    return path


def json_safe(value: Any) -> Any:
    """For JSON: numpy scalars to Python, NaN/inf to None (null), tuples to lists, keys to str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_, np.integer)):
        return value.item() if isinstance(value, np.generic) else value
    return (float(value) if math.isfinite(value) else None) if isinstance(value, (float, np.floating)) else value


def file_checksum(path: str | Path) -> str:
    """"xxh3_128:<hex>" of a file: the checksum shard records carry."""
    with open(path, "rb") as f:
        return f"xxh3_128:{hashlib.file_digest(f, xxhash.xxh3_128).hexdigest()}"
