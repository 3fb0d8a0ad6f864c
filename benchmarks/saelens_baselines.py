"""SAELens' own training paths, driven on the exact work layerflow's benchmark gives its trainer.

Used by `benchmarks/train_speed.py`; run this file for a small smoke test:

    HF_HUB_OFFLINE=1 python benchmarks/saelens_baselines.py

Three baselines, all on CPU or GPU, float32, no autocast, no wandb, no evals, nothing written:

- `saelens_multi_runner`: one `MultiSAETrainingRunner` training one SAE per hook from one shared
  model pass per LLM batch (SAELens' parallel multi-SAE path);
- `saelens_sequential_runs`: one `LanguageModelSAETrainingRunner` per hook, one after another
  (the classic way: N runs, N passes over the tokens);
- `saelens_step_seconds`: one `SAETrainer.step` (forward, backward, grad clip, Adam) on a fixed
  batch, for the SAE-update-only comparison.

How the runners are fed (identical tokens to layerflow's capture):

- The model is the already-loaded `loaded.model` (a TransformerLens `HookedTransformer`), passed as
  `override_model`. SAELens' training path only calls `model.run_with_cache(tokens,
  names_filter=..., stop_at_layer=..., prepend_bos=False)` and reads `model.tokenizer` /
  `model.W_E`; `HookedSAETransformer` is only needed to splice SAEs into the model (evals, which
  are off here), so no second model is built.
- The tokens go in as `override_dataset`, a `datasets.Dataset` with one pre-tokenized `tokens`
  column (one row per sequence, BOS already first). A `tokens` column makes SAELens treat the
  data as pre-tokenized: each row is used as is (sliced to `context_size` = tokens.shape[1]), and
  the model is always run with `prepend_bos=False`, so no second BOS is added. (`prepend_bos=True`
  in the config only matters for text datasets; here it is metadata that matches the data.)
- `exclude_special_tokens` is passed through (layerflow's benchmark passes its special-token ids,
  so BOS positions are dropped by every method).

Store sizes (see `_store_settings`), chosen so small token counts work without re-reading tokens:

- `training_tokens = n_steps * batch_tokens` and `train_batch_size_tokens = batch_tokens`: the
  trainers stop once `n_training_samples >= training_tokens`, each step adds exactly
  `batch_tokens`, so every SAE gets exactly `n_steps` optimizer steps.
- `store_batch_size_prompts = LLM_BATCH_SEQS = 8` sequences per model forward, the default batch
  of layerflow's `capture` (so both do the same forward shapes), capped at the number of rows.
- `n_batches_in_buffer = ceil(batch_tokens / context_size)`: SAELens' mixing buffer holds
  `n_batches_in_buffer * context_size` tokens and must hold at least one training batch; this is
  the smallest legal buffer. SAELens' default `activations_mixing_fraction = 0.5` is kept
  (`MIXING_FRACTION`; the shuffle is part of SAELens' cost, and layerflow mixes too), so about half
  a buffer (~batch_tokens / 2 tokens) is forwarded but never trained on, plus up to one LLM batch
  of rounding.
- `n_batches_for_norm_estimate = NORM_ESTIMATE_BATCHES = 1` (SAELens' default is 1000): with
  `normalize_activations="expected_average_only_in"` SAELens draws that many *training-sized*
  batches from the live stream before training, each a full model forward. One batch keeps this
  to 1/n_steps of extra forward work and already averages `batch_tokens` norms. (layerflow
  estimates from 8 batches of its captured store, at no extra forward cost.) Both runners accept
  `n_batches_for_norm_estimate=` to change it.
- Because norm estimation and the mixing buffer consume tokens beyond `n_steps * batch_tokens`,
  SAELens may run past the end of the given sequences; it then starts a new epoch over them (its
  own behaviour, with a warning). `last_run_stats` records how many sequences were forwarded.

Checkpoints and outputs are off (`n_checkpoints=0`, `checkpoint_path=None`, `output_path=None`,
`save_final_checkpoint=False`), `log_to_wandb=False` (SAELens only runs evals when logging to
wandb, so no evals run; `n_eval_batches` is set to 1 anyway). SAELens seeds nothing itself;
`torch.manual_seed(seed)` is set before each runner is built (SAE init) and run (buffer shuffles).

Timings are wall seconds of `runner.run()` only (the model passes, the mixing buffer, norm
estimation and SAE updates); building the runner (SAE init, dataset wrapping) is not timed.
Like layerflow's capture, SAELens stops the model at the deepest requested layer
(`stop_at_layer = max layer + 1` for `blocks.L.*` hooks), not at the unembedding.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

import torch

LLM_BATCH_SEQS = 8  # sequences per model forward; layerflow CaptureConfig.batch_size default
NORM_ESTIMATE_BATCHES = 1  # SAELens n_batches_for_norm_estimate (its default: 1000)
MIXING_FRACTION = 0.5  # SAELens activations_mixing_fraction (its default); 0 serves in order, unshuffled

# Filled by the runner functions: what the last call forwarded, per runner.
last_run_stats: dict[str, Any] = {}


def tokens_dataset(tokens: torch.Tensor):
    """A pre-tokenized `datasets.Dataset` (column `tokens`, one row per sequence)."""
    from datasets import Dataset

    return Dataset.from_dict({"tokens": tokens.to(torch.int64).cpu().tolist()})


def _store_settings(tokens: torch.Tensor, n_steps: int, batch_tokens: int, n_batches_for_norm_estimate: int,
                    llm_batch_seqs: int) -> dict[str, Any]:
    n_seqs, ctx = tokens.shape
    return dict(
        context_size=ctx,
        training_tokens=n_steps * batch_tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=min(llm_batch_seqs, n_seqs),
        n_batches_in_buffer=math.ceil(batch_tokens / ctx),
        n_batches_for_norm_estimate=n_batches_for_norm_estimate,
        activations_mixing_fraction=MIXING_FRACTION,
    )


def _common_settings(loaded, exclude_special_tokens: list[int] | bool, seed: int) -> dict[str, Any]:
    from sae_lens.config import LoggingConfig

    device = str(loaded.model.cfg.device)
    return dict(
        model_name=loaded.spec.official_name,  # metadata only: the model itself is override_model
        model_class_name="HookedTransformer",
        model_from_pretrained_kwargs=dict(loaded.from_pretrained_kwargs),
        streaming=False,
        prepend_bos=True,  # tokens already start with BOS; pre-tokenized rows are used as is
        exclude_special_tokens=list(exclude_special_tokens) if isinstance(exclude_special_tokens, (list, tuple))
        else bool(exclude_special_tokens),
        device=device,
        dtype="float32",
        autocast=False,
        autocast_lm=False,
        compile_llm=False,
        prefetch_llm_batches=False,
        seed=seed,
        n_eval_batches=1,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        output_path=None,
    )


@contextmanager
def _quiet_and_restore_signals() -> Iterator[None]:
    """SAELens logs 'override_* is not reproducible' per runner and warns that a dataset with fewer
    rows than training tokens means several epochs (it compares rows to tokens). Silence those.
    `run()` also installs its own SIGINT/SIGTERM handlers and never restores them; restore them."""
    sae_logger = logging.getLogger("sae_lens")
    level = sae_logger.level
    sae_logger.setLevel(logging.ERROR)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
            # SAELens wraps each pre-tokenized row with torch.tensor(row): harmless copy warning
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            yield
    finally:
        sae_logger.setLevel(level)
        for s, h in handlers.items():
            signal.signal(s, h)


def _count_forwards(store, stats: dict[str, Any]) -> None:
    """Count the sequences the store sends through the model (and check each starts with one BOS)."""
    inner = store.get_batch_tokens
    bos = getattr(getattr(store.model, "tokenizer", None), "bos_token_id", None)

    def counted(*args, **kwargs):
        batch = inner(*args, **kwargs)
        stats["sequences_forwarded"] += batch.shape[0]
        stats["tokens_forwarded"] += batch.numel()
        if bos is not None:
            stats["rows_not_starting_with_bos"] += int((batch[:, 0] != bos).sum())
            stats["rows_with_bos_at_position_1"] += int((batch[:, 1] == bos).sum()) if batch.shape[1] > 1 else 0
        return batch

    store.get_batch_tokens = counted


def _new_stats(tokens: torch.Tensor) -> dict[str, Any]:
    return {"input_sequences": tokens.shape[0], "context_size": tokens.shape[1], "sequences_forwarded": 0,
            "tokens_forwarded": 0, "rows_not_starting_with_bos": 0, "rows_with_bos_at_position_1": 0}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_run(runner, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    runner.run()
    _sync(device)
    return time.perf_counter() - start


def build_multi_runner(loaded, tokens: torch.Tensor, hook_names: list[str],
                       sae_cfg_for: Callable[[str], Any], n_steps: int, batch_tokens: int,
                       exclude_special_tokens: list[int] | bool, seed: int = 0,
                       n_batches_for_norm_estimate: int = NORM_ESTIMATE_BATCHES,
                       llm_batch_seqs: int = LLM_BATCH_SEQS):
    """The `MultiSAETrainingRunner` that `saelens_multi_runner` times (SAEs named by hook)."""
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    cfg = MultiSAETrainingRunnerConfig(
        saes={h: sae_cfg_for(h) for h in hook_names},
        hook_names={h: h for h in hook_names},
        **_store_settings(tokens, n_steps, batch_tokens, n_batches_for_norm_estimate, llm_batch_seqs),
        **_common_settings(loaded, exclude_special_tokens, seed),
    )
    torch.manual_seed(seed)
    return MultiSAETrainingRunner(cfg, override_dataset=tokens_dataset(tokens), override_model=loaded.model)


def saelens_multi_runner(loaded, tokens: torch.Tensor, hook_names: list[str],
                         sae_cfg_for: Callable[[str], Any], n_steps: int, batch_tokens: int,
                         exclude_special_tokens: list[int] | bool, seed: int = 0,
                         n_batches_for_norm_estimate: int = NORM_ESTIMATE_BATCHES,
                         llm_batch_seqs: int = LLM_BATCH_SEQS) -> float:
    """Wall seconds of one `MultiSAETrainingRunner.run()`: one SAE per hook, `n_steps` steps of
    `batch_tokens` tokens each, from the given pre-tokenized sequences (shared model passes)."""
    stats = _new_stats(tokens)
    with _quiet_and_restore_signals():
        runner = build_multi_runner(loaded, tokens, hook_names, sae_cfg_for, n_steps, batch_tokens,
                                    exclude_special_tokens, seed, n_batches_for_norm_estimate, llm_batch_seqs)
        _count_forwards(runner.activations_store, stats)
        torch.manual_seed(seed)
        seconds = _timed_run(runner, runner.cfg.device)
    stats["seconds"] = seconds
    last_run_stats["multi"] = stats
    return seconds


def build_single_runner(loaded, tokens: torch.Tensor, hook_name: str, sae_cfg, n_steps: int, batch_tokens: int,
                        exclude_special_tokens: list[int] | bool, seed: int = 0,
                        n_batches_for_norm_estimate: int = NORM_ESTIMATE_BATCHES,
                        llm_batch_seqs: int = LLM_BATCH_SEQS):
    """One `LanguageModelSAETrainingRunner` for one hook, configured like `build_multi_runner`."""
    from sae_lens.config import LanguageModelSAERunnerConfig
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        hook_name=hook_name,
        is_dataset_tokenized=True,
        verbose=False,
        compile_sae=False,
        **_store_settings(tokens, n_steps, batch_tokens, n_batches_for_norm_estimate, llm_batch_seqs),
        **_common_settings(loaded, exclude_special_tokens, seed),
    )
    torch.manual_seed(seed)
    return LanguageModelSAETrainingRunner(cfg, override_dataset=tokens_dataset(tokens), override_model=loaded.model)


def saelens_sequential_runs(loaded, tokens: torch.Tensor, hook_names: list[str],
                            sae_cfg_for: Callable[[str], Any], n_steps: int, batch_tokens: int,
                            exclude_special_tokens: list[int] | bool, seed: int = 0,
                            n_batches_for_norm_estimate: int = NORM_ESTIMATE_BATCHES,
                            llm_batch_seqs: int = LLM_BATCH_SEQS) -> float:
    """Total wall seconds of N separate `LanguageModelSAETrainingRunner.run()`s, one per hook, each
    with the settings of `saelens_multi_runner` (each run does its own model passes)."""
    total = 0.0
    per_hook = {}
    for hook in hook_names:
        stats = _new_stats(tokens)
        with _quiet_and_restore_signals():
            runner = build_single_runner(loaded, tokens, hook, sae_cfg_for(hook), n_steps, batch_tokens,
                                         exclude_special_tokens, seed, n_batches_for_norm_estimate, llm_batch_seqs)
            _count_forwards(runner.activations_store, stats)
            torch.manual_seed(seed)
            seconds = _timed_run(runner, runner.cfg.device)
        stats["seconds"] = seconds
        per_hook[hook] = stats
        total += seconds
    last_run_stats["sequential"] = per_hook
    return total


def saelens_step_seconds(sae_cfg, batch: torch.Tensor, n_repeats: int = 3) -> float:
    """Median seconds of one `SAETrainer.step(batch)` (forward, backward, grad-norm clip, Adam, LR and
    coefficient schedulers, dead-feature stats) on a fixed [batch_tokens, d_in] batch, after one
    warm-up step. No activation scaling (the scaler is unset, as before norm estimation)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    device = str(batch.device)
    sae_cls, _ = get_sae_training_class(sae_cfg.architecture())
    sae = sae_cls(copy.deepcopy(sae_cfg)).to(device)
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=batch.shape[0], lr_end=3e-5,
                         device=device, autocast=False, logger=LoggingConfig(log_to_wandb=False)),
        sae, iter(()),
    )
    trainer.step(batch)  # warm-up
    times = []
    for _ in range(n_repeats):
        _sync(device)
        start = time.perf_counter()
        trainer.step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _smoke() -> None:
    import json
    import os
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sae_lens import BatchTopKTrainingSAEConfig

    from layerflow.data.tokens import TokenPlan, make_sequences, special_token_ids
    from layerflow.models.load import load_model

    loaded = load_model("smollm2-135m")
    hooks = ["blocks.3.hook_resid_post", "blocks.10.hook_resid_post"]
    n_steps, batch_tokens, ctx = 2, 1024, 128
    n_seqs = math.ceil(n_steps * batch_tokens / (ctx - 1)) + 2  # as train_speed.py sizes it
    plan = TokenPlan("default", ctx, True, loaded.bos_token_id, 0)
    tokens = make_sequences(n_seqs, plan, loaded.tokenizer, loaded.model.cfg.d_vocab)
    specials = special_token_ids(loaded.tokenizer, plan)
    cfg = BatchTopKTrainingSAEConfig(d_in=576, d_sae=4608, k=32, normalize_activations="expected_average_only_in")
    print(f"model {type(loaded.model).__name__}, tokens {tuple(tokens.shape)}, specials {specials}, "
          f"threads {torch.get_num_threads()}", flush=True)

    multi = saelens_multi_runner(loaded, tokens, hooks, lambda h: copy.deepcopy(cfg), n_steps, batch_tokens, specials)
    print(f"saelens_multi_runner:    {multi:.3f} s", flush=True)
    seq = saelens_sequential_runs(loaded, tokens, hooks, lambda h: copy.deepcopy(cfg), n_steps, batch_tokens, specials)
    print(f"saelens_sequential_runs: {seq:.3f} s", flush=True)
    step = saelens_step_seconds(copy.deepcopy(cfg), torch.randn(batch_tokens, 576) + 0.5)
    print(f"saelens_step_seconds:    {step:.4f} s per step ({batch_tokens} tokens)", flush=True)
    print(json.dumps(last_run_stats, indent=2))


if __name__ == "__main__":
    _smoke()
