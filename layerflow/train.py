"""Train one SAE per site, all sites from the same batches, and save them in SAELens format.

    plan.json             the run's settings (written first; resume checks it)
    checkpoints/step-N/   every `checkpoint_every` steps: all weights, optimizer and data position
    saes/<hook_name>/     a SAELens folder per site (cfg.json, sae_weights.safetensors, sparsity)
    evals.json, evals.csv held-out figures per site (`evals.py`)
    train.json            the manifest (written last: its presence means "complete")

Each site gets a real SAELens `TrainingSAE` built from the `LayerSchedule`. TopK-family SAEs with
the same shape are stacked and trained by `sparse_topk.StackedTopKSAEs` (SAELens' step, computed
sparsely); every other architecture is stepped by SAELens' own `SAETrainer`. Activations are
scaled per site to mean norm sqrt(d_in) (SAELens' `expected_average_only_in`) and the scale is
folded into the saved weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from layerflow import __version__
from layerflow.activation_batches import BUFFER_BYTES, mixed_batches, model_chunks, store_chunks
from layerflow.capture import CaptureConfig, atomic_write_text, capture, split_sequences
from layerflow.data import TokenPlan
from layerflow.errors import LayerflowError
from layerflow.sae_io import SAE_DIR, load_saes, sae_metadata, save_sae
from layerflow.schedule import LayerSchedule, get_preset
from layerflow.sparse_topk import StackedTopKSAEs, group_key, supports_fast_path
from layerflow.store import ActivationStore

PLAN_FILE, MANIFEST_FILE = "plan.json", "train.json"
CHECKPOINT_DIR = "checkpoints"
NORM_ESTIMATE_BATCHES = 8
EXPLODING_LOSS = 1e4  # a per-site loss above this multiple of its first loss means divergence


@dataclass
class TrainConfig:
    store: str  # a capture directory; with `online`, where its held-out split is captured
    hooks: list[str] | None = None  # None: every captured site
    schedule: LayerSchedule = field(default_factory=lambda: get_preset("default"))
    steps: int | None = None  # None: `epochs` passes over the training tokens
    epochs: float = 1.0
    batch_tokens: int = 4096
    lr_scheduler: str = "constant"  # SAELens' names: constant, cosineannealing, ...
    lr_warm_up_steps: int = 0  # linear warm-up, as in SAELens
    lr_decay_steps: int = 0  # linear decay to 0 over the last steps, as in SAELens
    exclude_special_tokens: bool = True
    dead_feature_window: int = 1000  # steps without firing before a latent counts as dead
    checkpoint_every: int = 500
    seed: int = 0
    fast_path: bool = True  # stack TopK-family SAEs in sparse_topk; False: SAELens' step for all
    # "mean": the decoder bias starts at the mean training activation (as in EleutherAI's sparsify),
    # so a short run starts at FVU 1 rather than far above it where the mean is large (Gemma's
    # massive activations); "zeros": SAELens' own init.
    init_b_dec: str = "mean"
    # Online: train from model forwards on this capture's training sequences (nothing of them is
    # stored); only its held-out split is captured, to `store`, for the evals.
    online: CaptureConfig | None = None

    def plan(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        if self.online is not None:
            d["online"]["kinds"] = [k.value for k in self.online.kinds]
        d["store"] = str(Path(self.store).resolve())
        return d


class _SAELensGroup:
    """Sites whose SAEs SAELens' own `SAETrainer` steps, one trainer per site."""

    def __init__(self, saes: list, lrs: list[float], cfg: TrainConfig, total_steps: int, scales: list[float]):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.saes, self.trainers = saes, []
        for sae, lr, scale in zip(saes, lrs, scales):
            trainer = SAETrainer(SAETrainerConfig(
                total_training_samples=total_steps * cfg.batch_tokens, train_batch_size_samples=cfg.batch_tokens,
                lr=lr, lr_end=lr / 10, lr_scheduler_name=cfg.lr_scheduler, lr_warm_up_steps=cfg.lr_warm_up_steps,
                lr_decay_steps=cfg.lr_decay_steps,
                dead_feature_window=cfg.dead_feature_window, feature_sampling_window=10**9), sae, iter(()))
            trainer.activation_scaler.scaling_factor = scale
            self.trainers.append(trainer)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        losses = []
        for trainer, acts in zip(self.trainers, x):
            losses.append(trainer.step(acts).loss.detach())
            trainer.n_training_steps += 1
        return torch.stack(losses)

    def log_feature_sparsity(self) -> list[torch.Tensor]:
        return [t.log_feature_sparsity for t in self.trainers]

    def state_dict(self) -> dict:
        return {"saes": [s.state_dict() for s in self.saes],
                "optimizers": [t.optimizer.state_dict() for t in self.trainers],
                "schedulers": [t.lr_scheduler.state_dict() for t in self.trainers],
                "counters": [(t.n_training_samples, t.n_training_steps, t.act_freq_scores,
                              t.n_forward_passes_since_fired, t.n_frac_active_samples) for t in self.trainers]}

    def load_state_dict(self, state: dict) -> None:
        for i, (sae, t) in enumerate(zip(self.saes, self.trainers)):
            sae.load_state_dict(state["saes"][i])
            t.optimizer.load_state_dict(state["optimizers"][i])
            t.lr_scheduler.load_state_dict(state["schedulers"][i])
            (t.n_training_samples, t.n_training_steps, t.act_freq_scores,
             t.n_forward_passes_since_fired, t.n_frac_active_samples) = state["counters"][i]

    def sync(self) -> None:
        pass  # the SAELens SAEs are trained in place


class _StackedGroup:
    """TopK-family sites of one shape, stacked and stepped sparsely."""

    def __init__(self, saes: list, lrs: list[float], cfg: TrainConfig, total_steps: int, scales: list[float]):
        from sae_lens.training.optim import get_lr_scheduler

        self.saes = saes
        self.stack = StackedTopKSAEs(saes, lrs, dead_feature_window=cfg.dead_feature_window)
        self.scales = torch.tensor(scales).view(-1, 1, 1)
        # The LR schedule as a factor: SAELens' scheduler driving a stand-in optimizer with lr 1.
        self._lr_holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.lr_scheduler = get_lr_scheduler(cfg.lr_scheduler, lr=1.0, optimizer=self._lr_holder,
                                             warm_up_steps=cfg.lr_warm_up_steps, decay_steps=cfg.lr_decay_steps,
                                             training_steps=total_steps, lr_end=0.1, num_cycles=1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        factor = torch.tensor(self._lr_holder.param_groups[0]["lr"], dtype=torch.float64)
        losses = self.stack.step(x * self.scales.to(x.dtype), lr_factors=factor)
        self._lr_holder.step()  # a no-op (no gradient); keeps torch's scheduler order check quiet
        self.lr_scheduler.step()
        return losses["total"]

    def log_feature_sparsity(self) -> list[torch.Tensor]:
        return list(self.stack.log_feature_sparsity())

    def state_dict(self) -> dict:
        return {"stack": self.stack.state_dict(), "scheduler": self.lr_scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stack.load_state_dict(state["stack"])
        self.lr_scheduler.load_state_dict(state["scheduler"])

    def sync(self) -> None:
        self.stack.write_back(self.saes)


@dataclass
class SiteResult:
    hook_name: str
    layer: int
    folder: str  # relative to the run directory
    hyperparameters: dict[str, Any]  # this site's schedule values
    scaling_factor: float
    first_loss: float  # total loss of the first step (scaled units)
    final_loss: float  # mean total loss over the last 10% of steps (scaled units)
    evals: dict[str, Any] | None = None


@dataclass
class TrainManifest:
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


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    evaluate: bool = True,
    loaded=None,  # a LoadedModel: needed online; the end-of-training eval then includes spliced CE/KL
    model_eval: bool = True,  # with `loaded`: splice the SAEs into the model at the end
    stop_after: int | None = None,  # for tests/benchmarks: stop (as if interrupted) after this step
    sae_subdir: str = SAE_DIR,  # SAE folders go to out_dir/<sae_subdir>/<hook_name> ("" : out_dir/<hook_name>)
) -> TrainManifest | None:
    """Train (or resume training) every site of `cfg.store`; returns the manifest when complete."""
    from sae_lens.registry import get_sae_training_class

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if cfg.online is not None:
        if loaded is None:
            raise LayerflowError("Online training needs the loaded model (pass `loaded`).")
        capture(dataclasses.replace(cfg.online, splits=("heldout",)), cfg.store, loaded=loaded)
    store = ActivationStore(cfg.store)
    manifest = store.manifest
    hooks = _check_hooks(cfg.hooks, store)
    sites = {s["hook_name"]: s for s in manifest.sites}
    n_layers = _model_layers(manifest)
    specials = manifest.special_token_ids if cfg.exclude_special_tokens else []
    steps = cfg.steps or _steps_for_epochs(cfg, store, specials)
    if cfg.init_b_dec not in ("mean", "zeros"):
        raise LayerflowError(f"Unknown init_b_dec '{cfg.init_b_dec}'. Valid: mean, zeros.")
    if steps < 1 or cfg.batch_tokens < 1:
        raise LayerflowError(f"Nothing to train: {steps} steps of {cfg.batch_tokens} tokens. Use --steps >= 1.")
    plan = json.loads(json.dumps(cfg.plan() | {"hooks": hooks, "steps": steps}))  # as it reads back from disk

    state = _prepare_out_dir(out_dir, plan, overwrite)
    if state == "complete":
        return TrainManifest.from_json((out_dir / MANIFEST_FILE).read_text())

    torch.manual_seed(cfg.seed)
    values = {h: cfg.schedule.values(sites[h]["layer"], n_layers) for h in hooks}
    saes = {}
    for h in hooks:
        sae_cfg = cfg.schedule.sae_config(sites[h]["layer"], n_layers, sites[h]["d"])
        saes[h] = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)

    chunks = lambda seed: _train_chunks(cfg, store, hooks, seed, loaded)
    batches = mixed_batches(chunks(cfg.seed), cfg.batch_tokens, specials, cfg.seed, _buffer_bytes(store, hooks))
    scales, means = _input_statistics(cfg, chunks(cfg.seed + 1), store, hooks, specials, saes)
    if cfg.init_b_dec == "mean":
        with torch.no_grad():
            for h, scale, mean in zip(hooks, scales, means):
                saes[h].b_dec.copy_(mean * scale)  # in the scaled units the SAE trains in
    groups = _make_groups(cfg, saes, values, scales, steps)

    step = 0
    losses: dict[str, list[float]] = {h: [] for h in hooks}
    first_loss: dict[str, float] = {}
    checkpoint = _latest_checkpoint(out_dir)
    if checkpoint is not None:
        saved = torch.load(checkpoint / "state.pt", weights_only=False)
        for (members, group), group_state in zip(groups, saved["groups"]):
            group.load_state_dict(group_state)
        step, losses, first_loss = saved["step"], saved["losses"], saved["first_loss"]
        for _ in range(step):  # the data stream is a function of the seed: skip what was used
            next(batches)

    if progress:
        progress(step, steps)
    while step < steps:
        x = next(batches)
        index = {h: i for i, h in enumerate(hooks)}
        for members, group in groups:
            group_losses = group.step(x[[index[h] for h in members]])
            _check_losses(members, group_losses, first_loss, step, out_dir)
            for h, value in zip(members, group_losses.tolist()):
                losses[h].append(value)
        step += 1
        if step % cfg.checkpoint_every == 0 and step < steps:
            _save_checkpoint(out_dir, step, groups, losses, first_loss)
        if progress:
            progress(step, steps)
        if stop_after is not None and step >= stop_after and step < steps:
            _save_checkpoint(out_dir, step, groups, losses, first_loss)
            return None

    results = _save_saes(out_dir / sae_subdir, out_dir, store, hooks, saes, groups, values, scales, losses, cfg)
    if evaluate:
        evals, _ = evaluate_run(out_dir, cfg.store, exclude_special_tokens=cfg.exclude_special_tokens,
                                model_eval=model_eval and loaded is not None, loaded=loaded)
        for h, site_eval in evals.items():
            results[h].evals = site_eval.to_row()
    train_manifest = TrainManifest(
        layerflow_version=__version__, config=plan, model=manifest.model, steps=steps,
        tokens_per_site=steps * cfg.batch_tokens, seconds=round(time.perf_counter() - started, 3),
        sites=list(results.values()))
    atomic_write_text(out_dir / MANIFEST_FILE, train_manifest.to_json())
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return train_manifest


def _check_hooks(requested: list[str] | None, store: ActivationStore) -> list[str]:
    captured = store.hook_names
    if not requested:
        return captured
    missing = [h for h in requested if h not in captured]
    if missing:
        raise LayerflowError(f"Not in the capture at '{store.root}': {', '.join(missing)}. "
                             f"Captured: {', '.join(captured)}.")
    return [h for h in captured if h in requested]


def _model_layers(manifest) -> int:
    from layerflow.zoo import ZOO

    return int(manifest.model.get("n_layers") or ZOO[manifest.model["name"]].n_layers)


def _steps_for_epochs(cfg: TrainConfig, store: ActivationStore, specials: list[int]) -> int:
    n_tokens = store.manifest.split["train_tokens"]
    if specials and store.manifest.prepend_bos:
        n_tokens -= store.manifest.split["train_seqs"]
    return max(1, math.floor(cfg.epochs * n_tokens / cfg.batch_tokens))


def _buffer_bytes(store: ActivationStore, hooks: list[str]) -> int:
    widths = {s["hook_name"]: s["d"] for s in store.manifest.sites}
    epoch = store.manifest.split["train_tokens"] * sum(widths[h] for h in hooks) * 4
    return min(BUFFER_BYTES, epoch)


def _train_chunks(cfg: TrainConfig, store: ActivationStore, hooks: list[str], seed: int, loaded):
    """Activation chunks of the training split: read from the store, or computed online."""
    if cfg.online is None:
        return store_chunks(store, hooks, seed)
    plan = TokenPlan(cfg.online.source, cfg.online.context_size, cfg.online.prepend_bos, loaded.bos_token_id,
                     cfg.online.seed)
    tokens, n_train, _ = split_sequences(cfg.online, plan, loaded)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return model_chunks(loaded.model, tokens[:n_train][order], hooks, cfg.online.batch_size, cfg.online.device)


def _input_statistics(cfg, chunks, store, hooks, specials, saes) -> tuple[list[float], list[torch.Tensor]]:
    """Per site, from NORM_ESTIMATE_BATCHES batches: the scaling factor (sqrt(d_in) / mean norm for
    `expected_average_only_in`, else 1: SAELens' rule) and the mean activation (raw units)."""
    norms = torch.zeros(len(hooks), dtype=torch.float64)
    sums = None
    batches = mixed_batches(chunks, cfg.batch_tokens, specials, cfg.seed + 1, _buffer_bytes(store, hooks))
    for _ in range(NORM_ESTIMATE_BATCHES):
        x = next(batches)  # [sites, tokens, d]
        norms += x.norm(dim=-1).double().mean(1)
        sums = x.double().mean(1) if sums is None else sums + x.double().mean(1)
    norms /= NORM_ESTIMATE_BATCHES
    scales = [(saes[h].cfg.d_in ** 0.5 / norms[i].item()) if saes[h].cfg.normalize_activations == "expected_average_only_in"
              else 1.0 for i, h in enumerate(hooks)]
    return scales, [(sums[i] / NORM_ESTIMATE_BATCHES).float() for i in range(len(hooks))]


def _make_groups(cfg, saes, values, scales, steps):
    """[(hook names, group)]: stacks of same-shaped TopK-family SAEs, and the rest one by one."""
    hooks = list(saes)
    lr = {h: float(values[h].get("lr", 3e-4)) for h in hooks}
    scale = dict(zip(hooks, scales))
    stacks: dict[tuple, list[str]] = {}
    rest = []
    for h in hooks:
        if cfg.fast_path and supports_fast_path(saes[h].cfg):
            stacks.setdefault(group_key(saes[h].cfg), []).append(h)
        else:
            rest.append(h)
    groups = [(m, _StackedGroup([saes[h] for h in m], [lr[h] for h in m], cfg, steps, [scale[h] for h in m]))
              for m in stacks.values()]
    if rest:
        groups.append((rest, _SAELensGroup([saes[h] for h in rest], [lr[h] for h in rest], cfg, steps,
                                           [scale[h] for h in rest])))
    return groups


def _check_losses(members, group_losses, first_loss, step, out_dir) -> None:
    for h, value in zip(members, group_losses.tolist()):
        first_loss.setdefault(h, value)
        if not math.isfinite(value) or value > EXPLODING_LOSS * max(first_loss[h], 1e-12):
            last = _latest_checkpoint(out_dir)
            kept = f"The last good checkpoint is kept: {last}." if last else "No checkpoint had been written yet."
            raise LayerflowError(f"Training diverged at step {step} for {h}: loss {value:.4g} "
                                 f"(first loss {first_loss[h]:.4g}). Lower the learning rate. {kept}")


def _prepare_out_dir(out_dir: Path, plan: dict, overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete'; refuses a folder holding other SAEs or other files."""
    if out_dir.exists() and any(out_dir.iterdir()):
        plan_path = out_dir / PLAN_FILE
        if not plan_path.exists():
            holds_saes = any(out_dir.rglob("cfg.json"))
            what = "SAEs that this run did not write" if holds_saes else "files that are not a layerflow training run"
            raise LayerflowError(f"Output folder '{out_dir}' holds {what}. Choose another --out.")
        old = json.loads(plan_path.read_text())
        if old != plan and not overwrite:
            diffs = [f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]
            raise LayerflowError(f"Output folder '{out_dir}' holds SAEs from a different training run "
                                 f"({'; '.join(diffs)}). Choose another --out, or pass --overwrite to replace it.")
        if old != plan or overwrite:
            shutil.rmtree(out_dir)
        elif (out_dir / MANIFEST_FILE).exists():
            return "complete"
        else:
            return "resume"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PLAN_FILE, json.dumps(plan, indent=2))
    return "fresh"


def _latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted((out_dir / CHECKPOINT_DIR).glob("step-*[0-9]")) if (out_dir / CHECKPOINT_DIR).exists() else []
    return folders[-1] if folders else None


def _save_checkpoint(out_dir: Path, step: int, groups, losses, first_loss) -> None:
    folder = out_dir / CHECKPOINT_DIR / f"step-{step:09d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "groups": [g.state_dict() for _, g in groups], "losses": losses,
                "first_loss": first_loss}, tmp / "state.pt")
    os.replace(tmp, folder)
    for old in (out_dir / CHECKPOINT_DIR).glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _save_saes(sae_root, out_dir, store, hooks, saes, groups, values, scales, losses, cfg) -> dict[str, SiteResult]:
    sites = {s["hook_name"]: s for s in store.manifest.sites}
    sparsity, scale = {}, dict(zip(hooks, scales))
    for members, group in groups:
        group.sync()
        sparsity.update(zip(members, group.log_feature_sparsity()))
    results = {}
    for h in hooks:
        folder = sae_root / h
        save_sae(saes[h], folder, sae_metadata(store.manifest, h, cfg.exclude_special_tokens), sparsity[h], scale[h])
        tail = losses[h][-max(1, len(losses[h]) // 10):]
        results[h] = SiteResult(h, sites[h]["layer"], str(folder.relative_to(out_dir)), values[h], scale[h],
                                losses[h][0], sum(tail) / len(tail))
    return results


def run_store(run: Path) -> str:
    """The capture store a training run read (its held-out split is what evals and transfer use)."""
    if not (run / PLAN_FILE).exists():
        raise LayerflowError(f"'{run}' is not a layerflow training run: pass --store with held-out activations.")
    return json.loads((run / PLAN_FILE).read_text())["store"]


def evaluate_run(
    run: str | Path,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    exclude_special_tokens: bool = True,
    model_eval: bool = True,
    loaded=None,
    spliced_max_tokens: int | None = None,  # held-out tokens for spliced CE/KL (None: all)
) -> tuple[dict, list[Path]]:
    """Evaluate every SAE folder under `run` (a training run, or any folder of SAELens SAEs).

    Writes evals.json/csv to `out_dir` (default `run`) and, for a finished run, updates its
    manifest. Returns ({hook_name: SiteEval}, written paths)."""
    from layerflow.evals import evaluate_saes, write_eval_results

    run = Path(run)
    saes = load_saes(run)
    activation_store = ActivationStore(store or run_store(run))
    if model_eval and loaded is None:
        from layerflow.models import load_model

        loaded = load_model(activation_store.manifest.model["name"])
    results = evaluate_saes(saes, activation_store, loaded=loaded if model_eval else None,
                            exclude_special_tokens=exclude_special_tokens, spliced_max_tokens=spliced_max_tokens)
    written = list(write_eval_results(results, Path(out_dir or run)))
    if (run / MANIFEST_FILE).exists():
        manifest = TrainManifest.from_json((run / MANIFEST_FILE).read_text())
        for site in manifest.sites:
            if site.hook_name in results:
                site.evals = results[site.hook_name].to_row()
        atomic_write_text(run / MANIFEST_FILE, manifest.to_json())
        written.append(run / MANIFEST_FILE)
    return results, written
