"""Held-out evaluation of one SAE per site: reconstruction metrics and spliced-model figures.

Reconstruction (FVU, L0, dead/dense, l2 ratio, shrinkage) streams the held-out activations of a
capture store, shard by shard, through `metrics.ReconstructionStats`.

Spliced figures (CE, KL and the CE loss score with the dictionary's output in place of the
activation) come from `splice.py`, which follows SAELens' `run_evals`.

Out-of-domain FVU (`ood_fvu`, with a bootstrap interval over sequences) is the same FVU on text the
training corpus does not hold: the shipped `ood` corpus (verse, another project's documentation
and code, the other half of the reference glossary), run through the model. It says whether a
dictionary describes its layer or only the register it was trained on.

Transcoders (`cfg.metadata.hook_name_out` set, `layerflow.dictionaries.transcoders`) are evaluated against their
target: FVU is that of the prediction of x_out (variance of x_out around its own mean), and the
spliced pass replaces the target (e.g. `hook_mlp_out`: the whole MLP) with the prediction made from
the clean input. Matryoshka dictionaries (SAEs or transcoders, `matryoshka_widths` in the saved
metadata) also get the FVU of each nested prefix, coarse to fine.

`evaluate_run` evaluates a training run's folder (or any folder of SAELens SAEs) and writes
evals.json/csv; the run's manifest gets each site's figures.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from layerflow import defaults
from layerflow.capture.batches import heldout_batches
from layerflow.capture.store import ActivationStore
from layerflow.dictionaries.io import load_saes
from layerflow.dictionaries.kinds import encode, matryoshka_widths, output_hook, predict
from layerflow.errors import LayerflowError, did_you_mean
from layerflow.data.tokens import OOD_SOURCE, TokenPlan, make_sequences
from layerflow.evaluate.splice import clean_batches, splice_start, spliced_metrics
from layerflow.files import (EVAL_CSV, EVAL_JSON, FREQUENCY_FILE, TRAIN_MANIFEST, TrainManifest, atomic, atomic_write_text,
                             run_store)
from layerflow.metrics import (InputSums, ReconstructionMetrics, ReconstructionStats, bootstrap_weights,
                               percentile_interval, variance_concentration)
from layerflow.models.load import LoadedModel, load_model

if TYPE_CHECKING:
    from sae_lens import SAE

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SiteEval:
    hook_name: str
    reconstruction: ReconstructionMetrics  # over held-out activations
    ce_clean: float | None = None  # mean next-token CE of the clean model (nats)
    ce_spliced: float | None = None  # with the SAE reconstruction in place of the activation
    ce_zero_ablation: float | None = None  # with the activation set to zero
    ce_loss_score: float | None = None  # (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    delta_ce: float | None = None  # ce_spliced - ce_clean (nats)
    kl_div: float | None = None  # mean over tokens of KL(clean || spliced), next-token distributions
    hook_name_out: str | None = None  # a transcoder's target (what FVU and the splice are about)
    prefix_widths: list[int] | None = None  # Matryoshka prefixes, coarse to fine (the last is d_sae)
    prefix_fvu: list[float] | None = None  # FVU with each prefix alone
    # the share of the held-out variance carried by the 1% of tokens farthest from the mean (0.01 when
    # spread evenly; near 1 when a few attention-sink tokens dominate FVU): `metrics.variance_concentration`
    variance_top1: float | None = None
    ood_fvu: float | None = None  # FVU on out-of-domain text (`ood_reconstruction`)
    ood_fvu_low: float | None = None  # its bootstrap interval over sequences
    ood_fvu_high: float | None = None
    ood_tokens: int | None = None
    # per latent: the fraction of held-out tokens it fires on (feature_frequency.safetensors, not in the row)
    frequency: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def to_row(self) -> dict[str, Any]:
        """Flat dict for CSV/JSON: hook_name, every reconstruction field, the CE/KL fields."""
        row = {"hook_name": self.hook_name, **self.reconstruction.to_dict()}
        row.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IN_ROW})
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SiteEval":
        recon = {f.name: row[f.name] for f in fields(ReconstructionMetrics)}
        rest = {f.name: row.get(f.name) for f in fields(cls) if f.name not in _NOT_IN_ROW}
        return cls(row["hook_name"], ReconstructionMetrics(**recon), **rest)


_NOT_IN_ROW = ("hook_name", "reconstruction", "frequency")


def evaluate_saes(
    saes: dict[str, "SAE"],
    store: ActivationStore,
    loaded: "LoadedModel | None" = None,
    exclude_special_tokens: bool = True,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    spliced_max_tokens: int | None = None,
    spliced: bool = True,
    ood_tokens: int = defaults.OOD_TOKENS,
) -> dict[str, SiteEval]:
    """Evaluate `saes` (hook name -> SAELens SAE reading raw activations) on the held-out split.

    With `loaded`, also (unless `spliced` is False) the spliced CE/KL figures on the held-out tokens (the first held-out
    sequences holding `spliced_max_tokens` tokens, or all: each site's splice re-runs the rest of
    the model, which costs far more than the reconstruction figures), and the FVU on `ood_tokens`
    tokens of out-of-domain text (0: not; models without a tokenizer have none). `progress(done,
    total)` counts one unit per site (reconstruction) plus one per batch of sequences (spliced passes).
    """
    sites = {s.hook_name: s for s in store.manifest.sites}
    targets = {hook: output_hook(sae, hook) for hook, sae in saes.items()}
    for hook, sae in saes.items():
        if hook not in sites:
            raise LayerflowError(f"SAE for hook '{hook}': that hook is not in the capture at '{store.root}'. "
                                 f"{did_you_mean(hook, list(sites))}")
        if sae.cfg.d_in != sites[hook].d:
            raise LayerflowError(f"SAE for '{hook}' has d_in {sae.cfg.d_in}, but the captured activations there "
                                 f"have width {sites[hook].d}. Use an SAE trained on this site.")
        if targets[hook] not in sites:
            raise LayerflowError(f"The transcoder from '{hook}' predicts '{targets[hook]}', which is not in the capture "
                                 f"at '{store.root}'. Capture that site too.")
    if not store.shards("heldout"):
        raise LayerflowError(f"The capture at '{store.root}' has no held-out split: capture with --holdout > 0.")
    if batch_size < 1:
        raise LayerflowError(f"Batch size {batch_size} must be at least 1.")
    if loaded is not None and loaded.name != store.manifest.model["name"]:
        raise LayerflowError(f"The capture at '{store.root}' is of model '{store.manifest.model['name']}', "
                             f"but the loaded model is '{loaded.name}'. Load '{store.manifest.model['name']}'.")
    specials = store.manifest.special_token_ids if exclude_special_tokens else []
    tokens = store.tokens("heldout") if loaded is not None and spliced else None
    if tokens is not None and spliced_max_tokens is not None:
        tokens = tokens[:max(1, math.ceil(spliced_max_tokens / tokens.shape[1]))]
    total = len(saes) + (math.ceil(len(tokens) / batch_size) if tokens is not None else 0)
    report = progress or (lambda done, total: None)

    results = {}
    for i, (hook, sae) in enumerate(saes.items()):
        pairs = ((acts[hook], acts[targets[hook]]) for acts, _ in heldout_batches(store, [hook, targets[hook]], specials))
        results[hook] = _reconstruction(hook, sae, pairs, targets[hook] if targets[hook] != hook else None)
        x = store.heldout([targets[hook]], exclude_special_tokens=bool(specials))[targets[hook]]
        results[hook] = dataclasses.replace(results[hook], variance_top1=variance_concentration(x))
        report(i + 1, total)
    if tokens is not None and saes:
        starts = {h: splice_start(sites[targets[h]].layer, sites[targets[h]].kind) for h in saes}
        spliced = spliced_metrics(saes, loaded.model, tokens, starts, specials, batch_size,
                                  on_batch=lambda b: report(len(saes) + b, total), targets=targets)
        results = {h: dataclasses.replace(r, **spliced[h]) for h, r in results.items()}
    if loaded is not None and saes and ood_tokens > 0 and loaded.tokenizer is not None:
        ood = ood_reconstruction(saes, loaded, targets, specials, ood_tokens, store.manifest.context_size,
                                 store.manifest.prepend_bos, batch_size)
        results = {h: dataclasses.replace(r, **ood[h]) for h, r in results.items()}
    return results


@torch.no_grad()
def ood_reconstruction(saes: dict[str, "SAE"], loaded: "LoadedModel", targets: dict[str, str], specials: list[int],
                       n_tokens: int, context_size: int, prepend_bos: bool, batch_size: int = 8,
                       seed: int = defaults.SEED) -> dict[str, dict[str, float]]:
    """Each dictionary's FVU on `n_tokens` tokens of the shipped out-of-domain text (whole sequences
    drawn from across it, as the capture draws them), with a bootstrap interval over the sequences:
    {hook: {"ood_fvu", "ood_fvu_low", "ood_fvu_high", "ood_tokens"}}."""
    plan = TokenPlan(OOD_SOURCE, context_size, prepend_bos, loaded.bos_token_id, seed)
    tokens = make_sequences(max(defaults.MIN_BOOTSTRAP_GROUPS, math.ceil(n_tokens / context_size)), plan, loaded.tokenizer)
    n_seqs = tokens.shape[0]
    stats = {h: ReconstructionStats() for h in saes}
    for b, clean in enumerate(clean_batches(loaded.model, tokens, specials, batch_size, set(saes) | set(targets.values()))):
        keep = clean.keep.reshape(-1)
        seq = (b * batch_size + torch.arange(clean.tokens.shape[0]).repeat_interleave(clean.tokens.shape[1]))[keep.cpu()]
        for hook, sae in saes.items():
            x_in = clean.cache[hook].reshape(-1, sae.cfg.d_in)[keep].to(sae.device, sae.dtype)
            target = clean.cache[targets[hook]]
            x_out = target.reshape(-1, target.shape[-1])[keep].float().cpu()
            stats[hook].add(x_out, predict(sae, x_in).float().cpu(), x_sums=InputSums.of(x_out, seq, n_seqs),
                            error_only=True)
    weights = bootstrap_weights(n_seqs, defaults.BOOTSTRAP_REPLICATES, seed)
    out = {}
    for hook, st in stats.items():
        low, high = percentile_interval(1 - st.bootstrap(weights).numpy(), defaults.INTERVAL_LEVEL)
        out[hook] = {"ood_fvu": st.compute().fvu, "ood_fvu_low": float(low), "ood_fvu_high": float(high),
                     "ood_tokens": st.n}
    return out


@torch.no_grad()
def _reconstruction(hook: str, sae: "SAE", pairs: Iterator[tuple[torch.Tensor, torch.Tensor]],
                    hook_name_out: str | None) -> SiteEval:
    """Held-out figures of one SAE (pairs are (x, x)) or transcoder (pairs are (x_in, x_out))."""
    widths = matryoshka_widths(sae)
    stats, prefix_stats = ReconstructionStats(), [ReconstructionStats() for _ in (widths or [])[:-1]]
    for x_in, x_out in pairs:
        x_in = x_in.to(sae.device)
        latents = encode(sae, x_in)
        stats.add(x_out.float(), predict(sae, x_in, latents).float().cpu(), latents)
        for width, prefix in zip(widths or [], prefix_stats):
            head = torch.zeros_like(latents)
            head[:, :width] = latents[:, :width]
            prefix.add(x_out.float(), predict(sae, x_in, head).float().cpu())
    if stats.n == 0:
        raise LayerflowError("The held-out split holds only special tokens: nothing to evaluate.")
    metrics = stats.compute()
    prefix_fvu = [p.compute().fvu for p in prefix_stats] + [metrics.fvu] if widths else None
    return SiteEval(hook, metrics, hook_name_out=hook_name_out, prefix_widths=widths, prefix_fvu=prefix_fvu,
                    frequency=(stats.fire_counts.double() / stats.n).float())


def write_eval_results(results: dict[str, SiteEval], folder: str | Path) -> tuple[Path, Path]:
    """evals.json and evals.csv in `folder`, each written to a temporary name and renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r.to_row() for r in results.values()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["hook_name"])
    writer.writeheader()
    writer.writerows(rows)
    json_path, csv_path = folder / EVAL_JSON, folder / EVAL_CSV
    frequencies = {h: r.frequency.contiguous() for h, r in results.items() if r.frequency is not None}
    if frequencies:
        with atomic(folder / FREQUENCY_FILE) as tmp:
            save_file(frequencies, str(tmp))
    atomic_write_text(json_path, json.dumps({"schema_version": SCHEMA_VERSION, "sites": rows}, indent=2))
    atomic_write_text(csv_path, text.getvalue())
    return json_path, csv_path


def read_eval_results(path: str | Path) -> dict[str, SiteEval]:
    """Read back what `write_eval_results` wrote (evals.json, or the folder holding it)."""
    path = Path(path)
    path = path / EVAL_JSON if path.is_dir() else path
    if not path.exists():
        raise LayerflowError(f"No eval results at '{path}'. Run `layerflow eval` first.")
    rows = json.loads(path.read_text())["sites"]
    results = {r["hook_name"]: SiteEval.from_row(r) for r in rows}
    if (path.parent / FREQUENCY_FILE).exists():
        with safe_open(str(path.parent / FREQUENCY_FILE), "pt") as f:
            results = {h: dataclasses.replace(r, frequency=f.get_tensor(h) if h in f.keys() else None)
                       for h, r in results.items()}
    return results


def evaluate_run(
    run: str | Path,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    exclude_special_tokens: bool = True,
    model_eval: bool = True,
    loaded=None,
    spliced_max_tokens: int | None = None,  # held-out tokens for spliced CE/KL (None: all)
    spliced: bool = True,  # with the model: spliced CE/KL
    ood_tokens: int = defaults.OOD_TOKENS,  # with the model: out-of-domain FVU on this many tokens (0: none)
) -> tuple[dict, list[Path]]:
    """Evaluate every SAE folder under `run` (a training run, or any folder of SAELens SAEs);
    `model_eval`: load the model (unless `loaded` is given) for the figures that need it.

    Writes evals.json/csv to `out_dir` (default `run`) and, for a finished run, updates its
    manifest. Returns ({hook_name: SiteEval}, written paths)."""
    run = Path(run)
    saes = load_saes(run)
    activation_store = ActivationStore(store or run_store(run))
    if model_eval and loaded is None:
        loaded = load_model(activation_store.manifest.model["name"])
    results = evaluate_saes(saes, activation_store, loaded=loaded if model_eval else None,
                            exclude_special_tokens=exclude_special_tokens, spliced_max_tokens=spliced_max_tokens,
                            spliced=spliced, ood_tokens=ood_tokens)
    written = list(write_eval_results(results, Path(out_dir or run)))
    if (run / TRAIN_MANIFEST).exists():
        manifest = TrainManifest.read(run)
        for site in manifest.sites:
            if site.hook_name in results:
                site.evals = results[site.hook_name].to_row()
        manifest.write(run)
        written.append(run / TRAIN_MANIFEST)
    return results, written
