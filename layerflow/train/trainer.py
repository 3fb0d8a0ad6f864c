"""The training loop: one SAE per site, all sites from the same batches, saved in SAELens format.

    plan.json             the run's settings (written first; resume checks it)
    checkpoints/step-N/   every `checkpoint_every` steps: all weights, optimizer and data position
    saes/<hook_name>/     a SAELens folder per site (cfg.json, sae_weights.safetensors, sparsity)
    samples/step-N/       every `samples_every` steps: each latent's top-activating held-out tokens
    curves.json           per site and step: loss, and for transcoders FVU, L0 and per-prefix FVU
    evals.json, evals.csv held-out figures per site (`evaluate.evals`)
    train.json            the manifest (written last: its presence means "complete")

`train()` reads top to bottom: `_setup` checks the config against the capture and fixes the plan,
`_build` makes the dictionaries and their groups (`groups.py`), `_resume` loads the last
checkpoint, the loop steps every group on each batch, and `_finish` saves and evaluates.

Each site gets a real SAELens `TrainingSAE` built from the `LayerSchedule`. TopK-family SAEs with
the same shape are stacked and trained by `sparse_topk.StackedTopKSAEs` (SAELens' step, computed
sparsely); every other architecture is stepped by SAELens' own `SAETrainer`. Activations are
scaled per site to mean norm sqrt(d_in) (SAELens' `expected_average_only_in`) and the scale is
folded into the saved weights.

Transcoders (a transcoder architecture in the schedule, `dictionaries.transcoders`) are trained the
same way, from the same batches: the site is the transcoder's input (e.g. `mlp_in`) and its target
is the `transcoder_target` site of the same layer (default `mlp_out`), which the capture must hold
too. Input and target are scaled separately and both factors are folded in when saving.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from sae_lens.registry import get_sae_training_class

from layerflow import __version__
from layerflow.capture.batches import BUFFER_BYTES, mixed_batches, model_chunks, store_chunks
from layerflow.capture.store import ActivationStore
from layerflow.capture.writer import capture, split_sequences
from layerflow.data.tokens import TokenPlan
from layerflow.dictionaries.io import sae_metadata, save_sae
from layerflow.dictionaries.kinds import is_transcoder
from layerflow.errors import LayerflowError
from layerflow.evaluate.evals import evaluate_run
from layerflow.files import (CHECKPOINT_DIR, CURVES_FILE, PLAN_FILE, SAE_DIR, TRAINING_RUN, SiteResult, TrainManifest,
                             atomic, atomic_write_text, prepare_out_dir, write_json)
from layerflow.models.load import LoadedModel
from layerflow.models.sites import Site, parse_hook_name, parse_kind
from layerflow.models.zoo import ZOO
from layerflow.train.config import TrainConfig
from layerflow.train.groups import Group, make_groups
from layerflow.train.samples import SampleRecorder

NORM_ESTIMATE_BATCHES = 8
EXPLODING_LOSS = 1e4  # a per-site loss above this multiple of its first loss means divergence


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    evaluate: bool = True,
    loaded: LoadedModel | None = None,  # needed online; the end-of-training eval then includes spliced CE/KL
    model_eval: bool = True,  # with `loaded`: splice the SAEs into the model at the end
    stop_after: int | None = None,  # for tests/benchmarks: stop (as if interrupted) after this step
    sae_subdir: str = SAE_DIR,  # SAE folders go to out_dir/<sae_subdir>/<hook_name> ("" : out_dir/<hook_name>)
) -> TrainManifest | None:
    """Train (or resume training) every site of `cfg.store`; returns the manifest when complete."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    setup = _setup(cfg, loaded)
    state = prepare_out_dir(out_dir, TRAINING_RUN, setup.plan, overwrite)
    if state == "complete":
        return TrainManifest.read(out_dir)
    if state == "fresh":
        write_json(out_dir / PLAN_FILE, setup.plan, indent=2)
    run = _build(cfg, setup, loaded)
    step, log = _resume(out_dir, run)
    samples = (SampleRecorder(setup.store, setup.hooks, setup.specials, cfg.samples_tokens, run.scales)
               if cfg.samples_every else None)
    report = progress or (lambda done, total: None)
    report(step, setup.steps)
    while step < setup.steps:
        batch = next(run.batches)
        for members, group in run.groups:
            losses = group.step(batch)
            log.add(members, losses, group.metrics, step, out_dir)  # a group's metrics are its last step's
        step += 1
        if samples is not None and step % cfg.samples_every == 0:
            samples.record(out_dir, step, run.groups, run.saes)
        if step % cfg.checkpoint_every == 0 and step < setup.steps:
            _save_checkpoint(out_dir, step, run.groups, log)
        report(step, setup.steps)
        if stop_after is not None and stop_after <= step < setup.steps:
            _save_checkpoint(out_dir, step, run.groups, log)
            return None
    return _finish(cfg, out_dir, sae_subdir, setup, run, log, evaluate, loaded if model_eval else None, started)


# ------------------------------------------------------------------ setup


@dataclass
class _Setup:
    """What a training run is made of, fixed before any weight exists; `plan` is what a rerun compares."""

    store: ActivationStore
    hooks: list[str]  # the sites that get a dictionary (a transcoder's input site)
    targets: dict[str, str]  # transcoders: input hook -> the hook it predicts
    stream: list[str]  # every hook a batch holds, one row each
    specials: list[int]  # token ids left out of training
    steps: int
    n_layers: int
    plan: dict[str, Any]


def _setup(cfg: TrainConfig, loaded: LoadedModel | None) -> _Setup:
    """Check the config against the capture (captured online first, held-out split only) and plan the run."""
    if cfg.online is not None:
        if loaded is None:
            raise LayerflowError("Online training needs the loaded model (pass `loaded`).")
        capture(dataclasses.replace(cfg.online, splits=("heldout",)), cfg.store, loaded=loaded)
    store = ActivationStore(cfg.store)
    hooks = _check_hooks(cfg.hooks, store)
    targets = _transcoder_targets(cfg, store, hooks, explicit=bool(cfg.hooks)) if is_transcoder(cfg.schedule.architecture) else {}
    hooks = [h for h in hooks if h in targets] if targets else hooks
    stream = hooks + [t for t in dict.fromkeys(targets.values()) if t not in hooks]
    specials = store.manifest.special_token_ids if cfg.exclude_special_tokens else []
    steps = cfg.steps or _steps_for_epochs(cfg, store, specials)
    if cfg.init_b_dec not in ("mean", "zeros"):
        raise LayerflowError(f"Unknown init_b_dec '{cfg.init_b_dec}'. Valid: mean, zeros.")
    if steps < 1 or cfg.batch_tokens < 1:
        raise LayerflowError(f"Nothing to train: {steps} steps of {cfg.batch_tokens} tokens. Use --steps >= 1.")
    if cfg.samples_every < 0 or cfg.samples_tokens < 1:
        raise LayerflowError(f"samples_every must be >= 0 and samples_tokens >= 1, got {cfg.samples_every} and "
                             f"{cfg.samples_tokens}.")
    plan = json.loads(json.dumps(cfg.plan() | {"hooks": hooks, "steps": steps,
                                               "dead_feature_window": cfg.window(steps)}))  # as it reads back from disk
    return _Setup(store, hooks, targets, stream, specials, steps, _model_layers(store.manifest), plan)


@dataclass
class _Run:
    """The dictionaries being trained, the scales of what they read and predict, their groups, the batches."""

    saes: dict[str, Any]
    values: dict[str, dict[str, Any]]  # each site's schedule values
    scales: list[float]
    target_scales: list[float]  # a transcoder's target; an SAE's own input
    groups: list[tuple[list[str], Group]]
    batches: Iterator[torch.Tensor]


def _build(cfg: TrainConfig, setup: _Setup, loaded: LoadedModel | None) -> _Run:
    """SAELens training dictionaries from the schedule, activation scales and decoder biases from a
    few batches, groups, and the seeded stream of training batches."""
    sites = {s.hook_name: s for s in setup.store.manifest.sites}
    hooks, targets = setup.hooks, setup.targets
    torch.manual_seed(cfg.seed)
    values = {h: cfg.schedule.values(sites[h].layer, setup.n_layers) for h in hooks}
    saes = {}
    for h in hooks:
        extra = {}
        if targets:
            extra["d_out"] = sites[targets[h]].d
            if "dead_feature_window" in cfg.schedule.valid_keys() and "dead_feature_window" not in values[h]:
                extra["dead_feature_window"] = cfg.window(setup.steps)
        sae_cfg = cfg.schedule.sae_config(sites[h].layer, setup.n_layers, sites[h].d, **extra)
        saes[h] = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)

    buffer = _buffer_bytes(setup.store, setup.stream)
    chunks = lambda seed: _train_chunks(cfg, setup.store, setup.stream, seed, loaded)  # noqa: E731
    batches = mixed_batches(chunks(cfg.seed), cfg.batch_tokens, setup.specials, cfg.seed, buffer)
    # a buffer of a few batches is mixed enough for a mean; filling the full one cost 10 s at 30 sites
    stats_buffer = min(buffer, 4 * NORM_ESTIMATE_BATCHES * cfg.batch_tokens * sum(sites[h].d for h in setup.stream) * 4)
    norms, means = _input_statistics(cfg, chunks(cfg.seed + 1), setup.stream, setup.specials, stats_buffer)

    def scale(hook: str, normalize: str) -> float:  # SAELens' rule: mean norm sqrt(d) for expected_average_only_in
        return sites[hook].d ** 0.5 / norms[hook] if normalize == "expected_average_only_in" else 1.0

    if targets:
        normalize = {h: values[h].get("normalize_activations", "none") for h in hooks}
        scales = [scale(h, normalize[h]) for h in hooks]
        target_scales = [scale(targets[h], normalize[h]) for h in hooks]
    else:
        scales = [scale(h, saes[h].cfg.normalize_activations) for h in hooks]
        target_scales = scales
    if cfg.init_b_dec == "mean":
        with torch.no_grad():
            for h, target_scale in zip(hooks, target_scales):
                saes[h].b_dec.copy_(means[targets.get(h, h)] * target_scale)  # in the units the SAE trains in
    groups = make_groups(cfg, saes, values, scales, setup.steps, setup.stream, targets, target_scales)
    return _Run(saes, values, scales, target_scales, groups, batches)


# ------------------------------------------------------------------ losses and checkpoints


@dataclass
class _Log:
    """Per site and step: the loss (and a group's extra metrics); stops a diverging run. Checkpointed."""

    curves: dict[str, dict[str, list]]
    first_loss: dict[str, float]

    def add(self, members: list[str], losses: torch.Tensor, metrics: list[dict[str, Any]], step: int,
            out_dir: Path) -> None:
        _check_losses(members, losses, self.first_loss, step, out_dir)
        for h, value, extra in zip(members, losses.tolist(), metrics):
            self.curves[h]["loss"].append(value)
            for name, metric in extra.items():
                self.curves[h].setdefault(name, []).append(metric)


def _resume(out_dir: Path, run: _Run) -> tuple[int, _Log]:
    """(step, log) of the last checkpoint, its weights and optimizer states loaded and the batches it
    used skipped (the data stream is a function of the seed); (0, an empty log) without one."""
    log = _Log({h: {"loss": []} for h in run.saes}, {})
    checkpoint = _latest_checkpoint(out_dir)
    if checkpoint is None:
        return 0, log
    saved = torch.load(checkpoint / "state.pt", weights_only=False)
    for (_, group), group_state in zip(run.groups, saved["groups"]):
        group.load_state_dict(group_state)
    for _ in range(saved["step"]):
        next(run.batches)
    return saved["step"], _Log(saved["curves"], saved["first_loss"])


# ------------------------------------------------------------------ helpers


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
    return int(manifest.model.get("n_layers") or ZOO[manifest.model["name"]].n_layers)


def _steps_for_epochs(cfg: TrainConfig, store: ActivationStore, specials: list[int]) -> int:
    n_tokens = store.manifest.split["train_tokens"]
    if specials and store.manifest.prepend_bos:
        n_tokens -= store.manifest.split["train_seqs"]
    return max(1, math.floor(cfg.epochs * n_tokens / cfg.batch_tokens))


def _buffer_bytes(store: ActivationStore, hooks: list[str]) -> int:
    widths = {s.hook_name: s.d for s in store.manifest.sites}
    epoch = store.manifest.split["train_tokens"] * sum(widths[h] for h in hooks) * 4
    return min(BUFFER_BYTES, epoch)


def _train_chunks(cfg: TrainConfig, store: ActivationStore, hooks: list[str], seed: int, loaded: LoadedModel | None):
    """Activation chunks of the training split: read from the store, or computed online."""
    if cfg.online is None:
        return store_chunks(store, hooks, seed)
    plan = TokenPlan(cfg.online.source, cfg.online.context_size, cfg.online.prepend_bos, loaded.bos_token_id,
                     cfg.online.seed)
    tokens, n_train, _ = split_sequences(cfg.online, plan, loaded)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return model_chunks(loaded.model, tokens[:n_train][order], hooks, cfg.online.batch_size, cfg.online.device)


def _input_statistics(cfg: TrainConfig, chunks: Iterator, hooks: list[str], specials: list[int],
                      buffer_bytes: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per hook, from NORM_ESTIMATE_BATCHES batches: the mean activation norm and the mean activation."""
    norms = torch.zeros(len(hooks), dtype=torch.float64)
    sums = None
    batches = mixed_batches(chunks, cfg.batch_tokens, specials, cfg.seed + 1, buffer_bytes)
    for _ in range(NORM_ESTIMATE_BATCHES):
        x = next(batches)  # [sites, tokens, d]
        norms += x.norm(dim=-1).double().mean(1)
        sums = x.double().mean(1) if sums is None else sums + x.double().mean(1)
    return ({h: norms[i].item() / NORM_ESTIMATE_BATCHES for i, h in enumerate(hooks)},
            {h: (sums[i] / NORM_ESTIMATE_BATCHES).float() for i, h in enumerate(hooks)})


def _transcoder_targets(cfg: TrainConfig, store: ActivationStore, hooks: list[str], explicit: bool) -> dict[str, str]:
    """{input hook: target hook}: each input site predicts the `transcoder_target` site of its layer."""
    kind = parse_kind(cfg.transcoder_target)
    inputs = [h for h in hooks if parse_hook_name(h)[1] != kind]
    if explicit and len(inputs) < len(hooks):
        raise LayerflowError(f"{', '.join(h for h in hooks if h not in inputs)}: a {kind.value} site is what the "
                             f"transcoders predict, not an input. Pass input sites (e.g. mlp_in, resid_mid).")
    if not inputs:
        raise LayerflowError(f"The capture at '{store.root}' holds only {kind.value} sites: a transcoder needs an input "
                             f"site too. Capture with --sites mlp_in,{kind.value} (or resid_mid / resid_pre).")
    targets = {h: Site(parse_hook_name(h)[0], kind).hook_name for h in inputs}
    missing = sorted({t for t in targets.values() if t not in store.hook_names})
    if missing:
        raise LayerflowError(f"Transcoders predict {kind.value} at each input's layer, but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not in the capture at '{store.root}'. "
                             f"Capture with --sites <input>,{kind.value}.")
    return targets


def _check_losses(members, group_losses, first_loss, step, out_dir) -> None:
    for h, value in zip(members, group_losses.tolist()):
        first_loss.setdefault(h, value)
        if not math.isfinite(value) or value > EXPLODING_LOSS * max(first_loss[h], 1e-12):
            last = _latest_checkpoint(out_dir)
            kept = f"The last good checkpoint is kept: {last}." if last else "No checkpoint had been written yet."
            raise LayerflowError(f"Training diverged at step {step} for {h}: loss {value:.4g} "
                                 f"(first loss {first_loss[h]:.4g}). Lower the learning rate. {kept}")


def _latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted((out_dir / CHECKPOINT_DIR).glob("step-*[0-9]")) if (out_dir / CHECKPOINT_DIR).exists() else []
    return folders[-1] if folders else None


def _save_checkpoint(out_dir: Path, step: int, groups: list[tuple[list[str], Group]], log: _Log) -> None:
    folder = out_dir / CHECKPOINT_DIR / f"step-{step:09d}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic(folder) as tmp:
        tmp.mkdir()
        torch.save({"step": step, "groups": [g.state_dict() for _, g in groups], "curves": log.curves,
                    "first_loss": log.first_loss}, tmp / "state.pt")
    for old in (out_dir / CHECKPOINT_DIR).glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _finish(cfg: TrainConfig, out_dir: Path, sae_subdir: str, setup: _Setup, run: _Run, log: _Log, evaluate: bool,
            loaded: LoadedModel | None, started: float) -> TrainManifest:
    """Curves, SAELens folders, held-out evals (spliced with `loaded`), the manifest; checkpoints go."""
    atomic_write_text(out_dir / CURVES_FILE, json.dumps(log.curves))
    results = _save_saes(out_dir / sae_subdir, out_dir, setup, run, log.curves, cfg.exclude_special_tokens)
    if evaluate:
        evals, _ = evaluate_run(out_dir, cfg.store, exclude_special_tokens=cfg.exclude_special_tokens,
                                model_eval=loaded is not None, loaded=loaded)
        for h, site_eval in evals.items():
            results[h].evals = site_eval.to_row()
    manifest = TrainManifest(
        layerflow_version=__version__, config=setup.plan, model=setup.store.manifest.model, steps=setup.steps,
        tokens_per_site=setup.steps * cfg.batch_tokens, seconds=round(time.perf_counter() - started, 3),
        sites=list(results.values()))
    manifest.write(out_dir)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return manifest


def _save_saes(sae_root: Path, out_dir: Path, setup: _Setup, run: _Run, curves: dict[str, dict[str, list]],
               exclude_special_tokens: bool) -> dict[str, SiteResult]:
    store, hooks, targets = setup.store, setup.hooks, setup.targets
    sites = {s.hook_name: s for s in store.manifest.sites}
    sparsity, scale, target_scale = {}, dict(zip(hooks, run.scales)), dict(zip(hooks, run.target_scales))
    for members, group in run.groups:
        group.sync()
        sparsity.update(zip(members, group.log_feature_sparsity()))
    results = {}
    for h in hooks:
        folder = sae_root / h
        metadata = sae_metadata(store.manifest, h, exclude_special_tokens)
        if h in targets:
            metadata["hook_name_out"] = targets[h]
        save_sae(run.saes[h], folder, metadata, sparsity[h], scale[h], target_scale[h] if h in targets else None)
        losses = curves[h]["loss"]
        tail = losses[-max(1, len(losses) // 10):]
        results[h] = SiteResult(h, sites[h].layer, str(folder.relative_to(out_dir)), run.values[h], scale[h],
                                losses[0], sum(tail) / len(tail), hook_name_out=targets.get(h),
                                target_scaling_factor=target_scale[h] if h in targets else None)
    return results
