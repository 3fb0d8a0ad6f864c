"""Dictionaries per site: layer-aware configs, the training loop, groups stepped together, samples.

    config.py       TrainConfig: what a run is asked to do (its plan is what a rerun compares)
    schedule.py     LayerSchedule: hyperparameters by relative depth -> SAELens training configs; presets
    trainer.py      train(): the loop, setup, checkpoints (resume), saving SAELens folders, evals at the end
    groups.py       dictionaries stepped together: stacked TopK, SAELens' trainer, transcoders
    sparse_topk.py  SAELens' TopK/BatchTopK/Matryoshka step, computed sparsely for a stack of SAEs
    samples.py      each latent's top-activating held-out tokens, recorded while it trains
"""

from layerflow.train.config import TrainConfig
from layerflow.train.samples import read_samples
from layerflow.train.schedule import PRESETS, LayerSchedule, get_preset, relative_depth
from layerflow.train.trainer import train

__all__ = ["PRESETS", "LayerSchedule", "TrainConfig", "get_preset", "read_samples", "relative_depth", "train"]
