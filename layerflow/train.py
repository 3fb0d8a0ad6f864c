"""Train one SAE per site, all sites from the same batches, and save them in SAELens format.

    plan.json             the run's settings (written first; resume checks it)
    checkpoints/step-N/   every `checkpoint_every` steps: all weights, optimizer and data position
    saes/<hook_name>/     a SAELens folder per site (cfg.json, sae_weights.safetensors, sparsity)
    samples/step-N/       every `samples_every` steps: each latent's top-activating held-out tokens
    curves.json           per site and step: loss, and for transcoders FVU, L0 and per-prefix FVU
    evals.json, evals.csv held-out figures per site (`evaluate.evals`)
    train.json            the manifest (written last: its presence means "complete")

Each site gets a real SAELens `TrainingSAE` built from the `LayerSchedule`. TopK-family SAEs with
the same shape are stacked and trained by `sparse_topk.StackedTopKSAEs` (SAELens' step, computed
sparsely); every other architecture is stepped by SAELens' own `SAETrainer`. Activations are
scaled per site to mean norm sqrt(d_in) (SAELens' `expected_average_only_in`) and the scale is
folded into the saved weights.

Transcoders (a transcoder architecture in the schedule, `layerflow.dictionaries.transcoders`) are trained the
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from layerflow import __version__
from layerflow.capture.batches import BUFFER_BYTES, mixed_batches, model_chunks, store_chunks
from layerflow.capture.writer import CaptureConfig, capture, split_sequences
from layerflow.data.tokens import TokenPlan
from layerflow.errors import LayerflowError
from layerflow.files import (CHECKPOINT_DIR, CURVES_FILE, PLAN_FILE, SAE_DIR, SAMPLES_DIR, SiteResult,
                             TRAINING_RUN, TrainManifest, atomic, atomic_write_text, prepare_out_dir, write_json)
from layerflow.capture.store import ActivationStore
from layerflow.dictionaries.io import sae_metadata, save_sae
from layerflow.dictionaries.kinds import is_transcoder
from layerflow.evaluate.evals import evaluate_run
from layerflow.models.sites import Site, parse_hook_name
from layerflow.schedule import LayerSchedule, get_preset
from layerflow.sparse_topk import StackedTopKSAEs, group_key, supports_fast_path

NORM_ESTIMATE_BATCHES = 8
SAMPLES_PER_LATENT = 8  # top-activating tokens kept per latent in the training samples
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
    transcoder_target: str = "mlp_out"  # with a transcoder architecture: the site kind each input predicts
    samples_every: int = 0  # every N steps, record each latent's top-activating held-out tokens (0: never)
    samples_tokens: int = 4096  # held-out tokens those samples are drawn from
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


class _TranscoderGroup:
    """Transcoder sites, each stepped by `transcoders.train_step` with its own Adam and SAELens' LR schedule."""

    def __init__(self, models: list, lrs: list[float], cfg: TrainConfig, total_steps: int,
                 scales_in: list[float], scales_out: list[float]):
        from sae_lens.training.optim import get_lr_scheduler

        from layerflow.dictionaries.transcoders import make_optimizer

        self.saes = models
        self.optimizers = [make_optimizer(m, lr) for m, lr in zip(models, lrs)]
        self.schedulers = [get_lr_scheduler(cfg.lr_scheduler, lr=lr, optimizer=opt, warm_up_steps=cfg.lr_warm_up_steps,
                                            decay_steps=cfg.lr_decay_steps, training_steps=total_steps,
                                            lr_end=lr / 10, num_cycles=1)
                           for opt, lr in zip(self.optimizers, lrs)]
        self.scales_in, self.scales_out = scales_in, scales_out
        self.fire_counts = [torch.zeros(m.cfg.d_sae, dtype=torch.float64) for m in models]
        self.n_tokens = 0
        self.last_metrics: list[dict[str, Any]] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from layerflow.dictionaries.transcoders import train_step

        losses, self.last_metrics = [], []
        for i, model in enumerate(self.saes):
            target = y[i] * self.scales_out[i]
            out = train_step(model, self.optimizers[i], x[i] * self.scales_in[i], target)
            self.schedulers[i].step()
            fired = out.latents > 0
            self.fire_counts[i] += fired.sum(0).double()
            variance = (target - target.mean(0)).square().sum(-1).mean()
            self.last_metrics.append({"fvu": (out.mse / variance).item(), "l0": fired.sum(-1).float().mean().item(),
                                      "prefix_fvu": [(m / variance).item() for m in out.prefix_mse]})
            losses.append(out.loss)
        self.n_tokens += x.shape[1]
        return torch.stack(losses)

    def log_feature_sparsity(self) -> list[torch.Tensor]:
        return [(counts / max(self.n_tokens, 1) + 1e-10).log10().float() for counts in self.fire_counts]

    def state_dict(self) -> dict:
        return {"saes": [m.state_dict() for m in self.saes], "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers], "fire_counts": self.fire_counts,
                "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        for i, model in enumerate(self.saes):
            model.load_state_dict(state["saes"][i])
            self.optimizers[i].load_state_dict(state["optimizers"][i])
            self.schedulers[i].load_state_dict(state["schedulers"][i])
        self.fire_counts, self.n_tokens = state["fire_counts"], state["n_tokens"]

    def sync(self) -> None:
        pass  # trained in place


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
    sites = {s.hook_name: s for s in manifest.sites}
    n_layers = _model_layers(manifest)
    transcoding = is_transcoder(cfg.schedule.architecture)
    targets = _transcoder_targets(cfg, store, hooks, explicit=bool(cfg.hooks)) if transcoding else {}
    hooks = [h for h in hooks if h in targets] if transcoding else hooks
    stream = hooks + [t for t in dict.fromkeys(targets.values()) if t not in hooks]  # every hook a batch holds
    specials = manifest.special_token_ids if cfg.exclude_special_tokens else []
    steps = cfg.steps or _steps_for_epochs(cfg, store, specials)
    if cfg.init_b_dec not in ("mean", "zeros"):
        raise LayerflowError(f"Unknown init_b_dec '{cfg.init_b_dec}'. Valid: mean, zeros.")
    if steps < 1 or cfg.batch_tokens < 1:
        raise LayerflowError(f"Nothing to train: {steps} steps of {cfg.batch_tokens} tokens. Use --steps >= 1.")
    if cfg.samples_every < 0 or cfg.samples_tokens < 1:
        raise LayerflowError(f"samples_every must be >= 0 and samples_tokens >= 1, got {cfg.samples_every} and "
                             f"{cfg.samples_tokens}.")
    plan = json.loads(json.dumps(cfg.plan() | {"hooks": hooks, "steps": steps}))  # as it reads back from disk

    state = prepare_out_dir(out_dir, TRAINING_RUN, plan, overwrite)
    if state == "complete":
        return TrainManifest.read(out_dir)
    if state == "fresh":
        write_json(out_dir / PLAN_FILE, plan, indent=2)

    torch.manual_seed(cfg.seed)
    values = {h: cfg.schedule.values(sites[h].layer, n_layers) for h in hooks}
    saes = {}
    for h in hooks:
        extra = {}
        if transcoding:
            extra["d_out"] = sites[targets[h]].d
            if "dead_feature_window" in cfg.schedule.valid_keys() and "dead_feature_window" not in values[h]:
                extra["dead_feature_window"] = cfg.dead_feature_window
        sae_cfg = cfg.schedule.sae_config(sites[h].layer, n_layers, sites[h].d, **extra)
        saes[h] = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)

    chunks = lambda seed: _train_chunks(cfg, store, stream, seed, loaded)
    batches = mixed_batches(chunks(cfg.seed), cfg.batch_tokens, specials, cfg.seed, _buffer_bytes(store, stream))
    norms, means = _input_statistics(cfg, chunks(cfg.seed + 1), store, stream, specials)

    def scale(hook: str, normalize: str) -> float:  # SAELens' rule: mean norm sqrt(d) for expected_average_only_in
        return sites[hook].d ** 0.5 / norms[hook] if normalize == "expected_average_only_in" else 1.0

    if transcoding:
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
    groups = _make_groups(cfg, saes, values, scales, steps, target_scales if transcoding else None)

    step = 0
    curves: dict[str, dict[str, list]] = {h: {"loss": []} for h in hooks}
    first_loss: dict[str, float] = {}
    checkpoint = _latest_checkpoint(out_dir)
    if checkpoint is not None:
        saved = torch.load(checkpoint / "state.pt", weights_only=False)
        for (members, group), group_state in zip(groups, saved["groups"]):
            group.load_state_dict(group_state)
        step, curves, first_loss = saved["step"], saved["curves"], saved["first_loss"]
        for _ in range(step):  # the data stream is a function of the seed: skip what was used
            next(batches)
    samples = _SampleRecorder(cfg, store, hooks, specials, scales) if cfg.samples_every else None

    if progress:
        progress(step, steps)
    index = {h: i for i, h in enumerate(stream)}
    while step < steps:
        x = next(batches)
        for members, group in groups:
            x_in = x[[index[h] for h in members]]
            group_losses = group.step(x_in, x[[index[targets[h]] for h in members]]) if transcoding else group.step(x_in)
            _check_losses(members, group_losses, first_loss, step, out_dir)
            for i, (h, value) in enumerate(zip(members, group_losses.tolist())):
                curves[h]["loss"].append(value)
                for name, metric in (group.last_metrics[i] if transcoding else {}).items():
                    curves[h].setdefault(name, []).append(metric)
        step += 1
        if samples is not None and step % cfg.samples_every == 0:
            samples.record(out_dir, step, groups, saes)
        if step % cfg.checkpoint_every == 0 and step < steps:
            _save_checkpoint(out_dir, step, groups, curves, first_loss)
        if progress:
            progress(step, steps)
        if stop_after is not None and step >= stop_after and step < steps:
            _save_checkpoint(out_dir, step, groups, curves, first_loss)
            return None

    atomic_write_text(out_dir / CURVES_FILE, json.dumps(curves))
    results = _save_saes(out_dir / sae_subdir, out_dir, store, hooks, saes, groups, values, scales, target_scales,
                         targets, curves, cfg)
    if evaluate:
        evals, _ = evaluate_run(out_dir, cfg.store, exclude_special_tokens=cfg.exclude_special_tokens,
                                model_eval=model_eval and loaded is not None, loaded=loaded)
        for h, site_eval in evals.items():
            results[h].evals = site_eval.to_row()
    train_manifest = TrainManifest(
        layerflow_version=__version__, config=plan, model=manifest.model, steps=steps,
        tokens_per_site=steps * cfg.batch_tokens, seconds=round(time.perf_counter() - started, 3),
        sites=list(results.values()))
    train_manifest.write(out_dir)
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
    from layerflow.models.zoo import ZOO

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


def _train_chunks(cfg: TrainConfig, store: ActivationStore, hooks: list[str], seed: int, loaded):
    """Activation chunks of the training split: read from the store, or computed online."""
    if cfg.online is None:
        return store_chunks(store, hooks, seed)
    plan = TokenPlan(cfg.online.source, cfg.online.context_size, cfg.online.prepend_bos, loaded.bos_token_id,
                     cfg.online.seed)
    tokens, n_train, _ = split_sequences(cfg.online, plan, loaded)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return model_chunks(loaded.model, tokens[:n_train][order], hooks, cfg.online.batch_size, cfg.online.device)


def _input_statistics(cfg, chunks, store, hooks, specials) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per hook, from NORM_ESTIMATE_BATCHES batches: the mean activation norm and the mean activation."""
    norms = torch.zeros(len(hooks), dtype=torch.float64)
    sums = None
    batches = mixed_batches(chunks, cfg.batch_tokens, specials, cfg.seed + 1, _buffer_bytes(store, hooks))
    for _ in range(NORM_ESTIMATE_BATCHES):
        x = next(batches)  # [sites, tokens, d]
        norms += x.norm(dim=-1).double().mean(1)
        sums = x.double().mean(1) if sums is None else sums + x.double().mean(1)
    return ({h: norms[i].item() / NORM_ESTIMATE_BATCHES for i, h in enumerate(hooks)},
            {h: (sums[i] / NORM_ESTIMATE_BATCHES).float() for i, h in enumerate(hooks)})


def _transcoder_targets(cfg: TrainConfig, store: ActivationStore, hooks: list[str], explicit: bool) -> dict[str, str]:
    """{input hook: target hook}: each input site predicts the `transcoder_target` site of its layer."""
    from layerflow.models.sites import parse_kind

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


def _make_groups(cfg, saes, values, scales, steps, target_scales=None):
    """[(hook names, group)]: transcoders (`target_scales` given) in one group; else stacks of
    same-shaped TopK-family SAEs, and the rest one by one."""
    hooks = list(saes)
    lr = {h: float(values[h].get("lr", 3e-4)) for h in hooks}
    if target_scales is not None:
        return [(hooks, _TranscoderGroup([saes[h] for h in hooks], [lr[h] for h in hooks], cfg, steps, scales,
                                         target_scales))]
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


def _latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted((out_dir / CHECKPOINT_DIR).glob("step-*[0-9]")) if (out_dir / CHECKPOINT_DIR).exists() else []
    return folders[-1] if folders else None


def _save_checkpoint(out_dir: Path, step: int, groups, curves, first_loss) -> None:
    folder = out_dir / CHECKPOINT_DIR / f"step-{step:09d}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic(folder) as tmp:
        tmp.mkdir()
        torch.save({"step": step, "groups": [g.state_dict() for _, g in groups], "curves": curves,
                    "first_loss": first_loss}, tmp / "state.pt")
    for old in (out_dir / CHECKPOINT_DIR).glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _save_saes(sae_root, out_dir, store, hooks, saes, groups, values, scales, target_scales, targets, curves,
               cfg) -> dict[str, SiteResult]:
    sites = {s.hook_name: s for s in store.manifest.sites}
    sparsity, scale, target_scale = {}, dict(zip(hooks, scales)), dict(zip(hooks, target_scales))
    for members, group in groups:
        group.sync()
        sparsity.update(zip(members, group.log_feature_sparsity()))
    results = {}
    for h in hooks:
        folder = sae_root / h
        metadata = sae_metadata(store.manifest, h, cfg.exclude_special_tokens)
        if h in targets:
            metadata["hook_name_out"] = targets[h]
        save_sae(saes[h], folder, metadata, sparsity[h], scale[h], target_scale[h] if h in targets else None)
        losses = curves[h]["loss"]
        tail = losses[-max(1, len(losses) // 10):]
        results[h] = SiteResult(h, sites[h].layer, str(folder.relative_to(out_dir)), values[h], scale[h],
                                losses[0], sum(tail) / len(tail), hook_name_out=targets.get(h),
                                target_scaling_factor=target_scale[h] if h in targets else None)
    return results


class _SampleRecorder:
    """Every `samples_every` steps: each latent's top-activating held-out tokens, per site, written to
    samples/step-N/<hook>.safetensors (`dictionaries.top_activations.TopActivations`; `layerflow samples` shows them)."""

    def __init__(self, cfg: TrainConfig, store: ActivationStore, hooks: list[str], specials: list[int],
                 scales: list[float]):
        from layerflow.capture.batches import heldout_batches

        self.batches = list(heldout_batches(store, hooks, specials, cfg.samples_tokens))
        self.scales = dict(zip(hooks, scales))
        self.k = SAMPLES_PER_LATENT

    @torch.no_grad()
    def record(self, out_dir: Path, step: int, groups, saes: dict) -> None:
        from layerflow.dictionaries.top_activations import TopActivations

        folder = out_dir / SAMPLES_DIR / f"step-{step:09d}"
        for _, group in groups:
            group.sync()
        for h, sae in saes.items():
            top = TopActivations.empty(sae.cfg.d_sae, self.k)
            for acts, positions in self.batches:
                top.update(sae.encode(acts[h] * self.scales[h]), positions)
            top.save(folder / f"{h}.safetensors")


def read_samples(run: str | Path, step: int | None = None,
                 hooks: list[str] | None = None) -> tuple[int, dict[str, "TopActivations"]]:
    """(step, {hook: TopActivations}) recorded during training at `step` (default: the last one)."""
    from layerflow.dictionaries.top_activations import TopActivations

    root = Path(run) / SAMPLES_DIR
    recorded = {int(p.name.removeprefix("step-")): p for p in root.glob("step-*[0-9]")} if root.exists() else {}
    if not recorded:
        raise LayerflowError(f"No training samples under '{run}': train with --samples-every N.")
    step = max(recorded) if step is None else step
    if step not in recorded:
        raise LayerflowError(f"No samples at step {step} in '{run}'. Recorded steps: {', '.join(map(str, sorted(recorded)))}.")
    files = {p.name.removesuffix(".safetensors"): p for p in recorded[step].glob("*.safetensors")}
    unknown = [h for h in hooks or [] if h not in files]
    if unknown:
        raise LayerflowError(f"No samples for {', '.join(unknown)} at step {step}. Sites: {', '.join(sorted(files))}.")
    order = hooks or sorted(files, key=lambda h: (parse_hook_name(h)[0], h))
    return step, {h: TopActivations.load(files[h]) for h in order}
