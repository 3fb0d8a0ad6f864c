"""Groups of dictionaries stepped together on each batch.

Every group reads its own rows of the batch ([sites, tokens, d], one row per hook of the stream),
steps its dictionaries and returns one loss per site; `metrics` holds each site's extra per-step
figures for the training curves. Groups checkpoint (`state_dict`) and write their weights back to
the SAELens objects they train (`sync`) before samples and saving.

    StackedGroup     TopK-family SAEs of one shape, stacked and stepped sparsely (`sparse_topk`)
    SAELensGroup     any other SAE, each stepped by SAELens' own `SAETrainer`
    TranscoderGroup  transcoders, each stepped by `transcoders.train_step` against its target rows
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer

from layerflow import defaults
from layerflow.dictionaries.transcoders import make_optimizer, train_step
from layerflow.metrics import batch_variance
from layerflow.train.config import TrainConfig
from layerflow.train.sparse_topk import StackedTopKSAEs, group_key, supports_fast_path

DEFAULT_LR = 3e-4  # a schedule without `lr`


class SAELensGroup:
    """Sites whose SAEs SAELens' own `SAETrainer` steps, one trainer per site."""

    def __init__(self, saes: list, lrs: list[float], cfg: TrainConfig, total_steps: int, scales: list[float],
                 rows: list[int]):
        self.saes, self.trainers, self.rows = saes, [], rows
        self.metrics: list[dict[str, Any]] = [{} for _ in saes]
        for sae, lr, scale in zip(saes, lrs, scales):
            trainer = SAETrainer(SAETrainerConfig(
                total_training_samples=total_steps * cfg.batch_tokens, train_batch_size_samples=cfg.batch_tokens,
                lr=lr, lr_end=lr / 10, lr_scheduler_name=cfg.lr_scheduler, lr_warm_up_steps=cfg.lr_warm_up_steps,
                lr_decay_steps=cfg.lr_decay_steps,
                dead_feature_window=cfg.window(total_steps), feature_sampling_window=10**9), sae, iter(()))
            trainer.activation_scaler.scaling_factor = scale
            self.trainers.append(trainer)

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        losses = []
        for trainer, acts in zip(self.trainers, batch[self.rows]):
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


class StackedGroup:
    """TopK-family sites of one shape, stacked and stepped sparsely."""

    def __init__(self, saes: list, lrs: list[float], cfg: TrainConfig, total_steps: int, scales: list[float],
                 rows: list[int]):
        self.saes, self.rows = saes, rows
        self.metrics: list[dict[str, Any]] = [{} for _ in saes]
        self.stack = StackedTopKSAEs(saes, lrs, dead_feature_window=cfg.window(total_steps))
        self.anneal_steps = cfg.k_anneal_fraction * total_steps
        self.scales = torch.tensor(scales).view(-1, 1, 1)
        # The LR schedule as a factor: SAELens' scheduler driving a stand-in optimizer with lr 1.
        self._lr_holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.lr_scheduler = get_lr_scheduler(cfg.lr_scheduler, lr=1.0, optimizer=self._lr_holder,
                                             warm_up_steps=cfg.lr_warm_up_steps, decay_steps=cfg.lr_decay_steps,
                                             training_steps=total_steps, lr_end=0.1, num_cycles=1)

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch[self.rows]
        factor = torch.tensor(self._lr_holder.param_groups[0]["lr"], dtype=torch.float64)
        left = max(0.0, 1 - self.stack.adam_step / self.anneal_steps) if self.anneal_steps else 0.0
        self.stack.k_factor = 1 + (defaults.K_ANNEAL_START - 1) * left
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


class TranscoderGroup:
    """Transcoder sites, each stepped by `transcoders.train_step` with its own Adam and SAELens' LR
    schedule; `metrics` are each one's FVU, L0 and per-prefix FVU on the step's batch."""

    def __init__(self, models: list, lrs: list[float], cfg: TrainConfig, total_steps: int,
                 scales_in: list[float], scales_out: list[float], rows: list[int], target_rows: list[int]):
        self.saes, self.rows, self.target_rows = models, rows, target_rows
        self.optimizers = [make_optimizer(m, lr) for m, lr in zip(models, lrs)]
        self.schedulers = [get_lr_scheduler(cfg.lr_scheduler, lr=lr, optimizer=opt, warm_up_steps=cfg.lr_warm_up_steps,
                                            decay_steps=cfg.lr_decay_steps, training_steps=total_steps,
                                            lr_end=lr / 10, num_cycles=1)
                           for opt, lr in zip(self.optimizers, lrs)]
        self.scales_in, self.scales_out = scales_in, scales_out
        self.fire_counts = [torch.zeros(m.cfg.d_sae, dtype=torch.float64) for m in models]
        self.n_tokens = 0
        self.metrics: list[dict[str, Any]] = []

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[self.rows], batch[self.target_rows]
        losses, self.metrics = [], []
        for i, model in enumerate(self.saes):
            target = y[i] * self.scales_out[i]
            out = train_step(model, self.optimizers[i], x[i] * self.scales_in[i], target)
            self.schedulers[i].step()
            fired = out.latents > 0
            self.fire_counts[i] += fired.sum(0).double()
            variance = batch_variance(target)
            self.metrics.append({"fvu": (out.mse / variance).item(), "l0": fired.sum(-1).float().mean().item(),
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


Group = SAELensGroup | StackedGroup | TranscoderGroup


def make_groups(cfg: TrainConfig, saes: dict[str, Any], values: dict[str, dict], scales: list[float], steps: int,
                stream: list[str], targets: dict[str, str], target_scales: list[float]) -> list[tuple[list[str], Group]]:
    """[(hook names, group)]: transcoders (`targets` given) in one group; else stacks of same-shaped
    TopK-family SAEs, and the rest one by one. `stream` lists the hooks of a batch's rows."""
    hooks = list(saes)
    row = {h: i for i, h in enumerate(stream)}
    lr = {h: float(values[h].get("lr", DEFAULT_LR)) for h in hooks}
    if targets:
        return [(hooks, TranscoderGroup([saes[h] for h in hooks], [lr[h] for h in hooks], cfg, steps, scales,
                                        target_scales, [row[h] for h in hooks], [row[targets[h]] for h in hooks]))]
    scale = dict(zip(hooks, scales))
    stacks: dict[tuple, list[str]] = {}
    rest = []
    for h in hooks:
        if cfg.fast_path and supports_fast_path(saes[h].cfg):
            stacks.setdefault(group_key(saes[h].cfg), []).append(h)
        else:
            rest.append(h)
    groups: list[tuple[list[str], Group]] = [
        (m, StackedGroup([saes[h] for h in m], [lr[h] for h in m], cfg, steps, [scale[h] for h in m], [row[h] for h in m]))
        for m in stacks.values()]
    if rest:
        groups.append((rest, SAELensGroup([saes[h] for h in rest], [lr[h] for h in rest], cfg, steps,
                                          [scale[h] for h in rest], [row[h] for h in rest])))
    return groups
