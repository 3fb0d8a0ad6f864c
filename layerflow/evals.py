"""Held-out evaluation of one SAE per site: reconstruction metrics and spliced-model figures.

Reconstruction (FVU, L0, dead/dense, l2 ratio, shrinkage) streams the held-out activations of a
capture store, shard by shard, through `metrics.ReconstructionStats`.

Spliced figures follow SAELens' `run_evals` (`get_recons_loss`), so the two can be compared:
- the reconstruction replaces the site's activation at every non-special position (special
  positions keep their clean activation); zero-ablation zeroes every position;
- CE is the mean next-token loss (logits[:, t] against tokens[:, t+1]) over predictions made
  *from* a non-special position t: the target may be special (e.g. an EOS), the input may not;
- KL(clean || spliced) is the mean over all non-special positions, the last one included;
- CE loss score = (CE_zero - CE_spliced) / (CE_zero - CE_clean).
With `exclude_special_tokens=False` every position counts and every position is spliced.

Transcoders (`cfg.metadata.hook_name_out` set, `layerflow.dictionaries.transcoders`) are evaluated against their
target: FVU is that of the prediction of x_out (variance of x_out around its own mean), and the
spliced pass replaces the target (e.g. `hook_mlp_out`: the whole MLP) with the prediction made from
the clean input. Matryoshka dictionaries (SAEs or transcoders, `matryoshka_widths` in the saved
metadata) also get the FVU of each nested prefix, coarse to fine.

Per batch of sequences there is one clean pass (logits plus the cached activations the sites
need), then one pass per site whose batch holds both variants, [spliced; zero-ablated]. That
pass starts at the site's layer (`start_at_layer`) from the cached residual, so the layers below
are not recomputed: a `resid_pre`/`resid_post` site *is* the residual entering layer L / L+1;
any other site is replaced by a hook inside block L.
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
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file

from layerflow.capture.batches import heldout_batches
from layerflow.capture.store import ActivationStore
from layerflow.dictionaries.kinds import encode, matryoshka_widths, output_hook, predict
from layerflow.errors import LayerflowError, did_you_mean
from layerflow.files import EVAL_CSV, EVAL_JSON, FREQUENCY_FILE, atomic, atomic_write_text
from layerflow.metrics import ReconstructionMetrics, ReconstructionStats
from layerflow.models.sites import prepare_hooks

if TYPE_CHECKING:
    from sae_lens import SAE

    from layerflow.models.load import LoadedModel

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
) -> dict[str, SiteEval]:
    """Evaluate `saes` (hook name -> SAELens SAE reading raw activations) on the held-out split.

    With `loaded`, also the spliced CE/KL figures on the held-out tokens (the first held-out
    sequences holding `spliced_max_tokens` tokens, or all: each site's splice re-runs the rest of
    the model, which costs far more than the reconstruction figures). `progress(done, total)`
    counts one unit per site (reconstruction) plus one per batch of sequences (spliced passes).
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
    tokens = store.tokens("heldout") if loaded is not None else None
    if tokens is not None and spliced_max_tokens is not None:
        tokens = tokens[:max(1, math.ceil(spliced_max_tokens / tokens.shape[1]))]
    total = len(saes) + (math.ceil(len(tokens) / batch_size) if tokens is not None else 0)
    report = progress or (lambda done, total: None)

    results = {}
    for i, (hook, sae) in enumerate(saes.items()):
        pairs = ((acts[hook], acts[targets[hook]]) for acts, _ in heldout_batches(store, [hook, targets[hook]], specials))
        results[hook] = _reconstruction(hook, sae, pairs, targets[hook] if targets[hook] != hook else None)
        report(i + 1, total)
    if loaded is not None and saes:
        starts = {h: splice_start(sites[targets[h]].layer, sites[targets[h]].kind) for h in saes}
        spliced = spliced_metrics(saes, loaded.model, tokens, starts, specials, batch_size,
                                  on_batch=lambda b: report(len(saes) + b, total), targets=targets)
        results = {h: dataclasses.replace(r, **spliced[h]) for h, r in results.items()}
    return results


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


def splice_start(layer: int, kind: str) -> tuple[int, bool]:
    """(layer the spliced pass starts at, whether the site *is* that layer's residual input)."""
    if kind == "resid_pre":
        return layer, True
    if kind == "resid_post":
        return layer + 1, True  # == n_layers for the last block: only ln_final and unembed run
    return layer, False


def attention_mask(model: Any, tokens: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"] | None:
    # The mask TransformerLens builds itself from tokens (left-padding tokenizers, e.g. Gemma 3);
    # a pass started mid-model sees no tokens, so both passes get it explicitly.
    from transformer_lens.utils import get_attention_mask

    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.padding_side != "left":
        return None
    return get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos)


def next_token_nll(logp: Float[torch.Tensor, "batch pos vocab"], tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos-1"]:
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


@dataclass
class CleanBatch:
    """A batch of held-out sequences run once, clean: what each patched pass is compared with."""

    tokens: Int[torch.Tensor, "batch pos"]
    keep: torch.Tensor  # [batch, pos] bool: non-special positions (patched and counted)
    mask: Int[torch.Tensor, "batch pos"] | None  # attention mask (left-padding tokenizers)
    logp: Float[torch.Tensor, "batch pos vocab"]
    cache: Any  # the activations asked for

    @property
    def keep_ce(self) -> torch.Tensor:
        return self.keep[:, :-1]  # a prediction counts when made from a non-special position

    def nll_sum(self, logp: Float[torch.Tensor, "batch pos vocab"]) -> float:
        """Summed next-token loss of `logp` (one copy of the batch) over the counted predictions."""
        return next_token_nll(logp, self.tokens)[self.keep_ce].double().sum().item()

    def kl(self, logp: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch pos"]:
        """KL(clean || patched) of the next-token distributions, per position."""
        return F.kl_div(logp, self.logp, log_target=True, reduction="none").sum(-1)


def clean_batches(model: Any, tokens: Int[torch.Tensor, "seqs ctx"], special_ids: list[int], batch_size: int,
                  names: set[str]) -> Iterator[CleanBatch]:
    """Run `tokens` clean, `batch_size` sequences at a time, caching the hooks in `names`."""
    device = model.cfg.device
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        keep = ~torch.isin(batch, torch.tensor(special_ids, dtype=batch.dtype, device=device))
        mask = attention_mask(model, batch)
        logits, cache = model.run_with_cache(batch, attention_mask=mask, names_filter=lambda name: name in names)
        logp = logits.log_softmax(-1)
        del logits  # logits are [batch, pos, vocab]: keep one copy per variant at most
        yield CleanBatch(batch, keep, mask, logp, cache)


def patched_logp(model: Any, clean: CleanBatch, start: int, fwd_hooks: list, copies: int = 1,
                 resid: torch.Tensor | None = None) -> Float[torch.Tensor, "copies*batch pos vocab"]:
    """Log-probs of `copies` stacked copies of the batch, re-run from block `start` with `fwd_hooks`.

    The run starts from `resid` (the residual entering block `start`, [copies * batch, pos, d]), by
    default the cached clean one (`blocks.{start}.hook_resid_pre` must be cached), so the blocks
    below are not recomputed. A shortformer model re-runs from the tokens: start_at_layer would
    drop the positional embedding TransformerLens passes to every block.
    """
    mask = None if clean.mask is None else clean.mask.repeat(copies, 1)
    if model.cfg.positional_embedding_type == "shortformer":
        out = model.run_with_hooks(clean.tokens.repeat(copies, 1), attention_mask=mask, fwd_hooks=fwd_hooks)
    else:
        if resid is None:
            resid = clean.cache[f"blocks.{start}.hook_resid_pre"].repeat(copies, 1, 1)
        out = model.run_with_hooks(resid, start_at_layer=start, attention_mask=mask, fwd_hooks=fwd_hooks)
    return out.log_softmax(-1)


@torch.no_grad()
def spliced_metrics(
    saes: dict[str, "SAE"],
    model: Any,
    tokens: Int[torch.Tensor, "seqs ctx"],
    starts: dict[str, tuple[int, bool]],
    special_ids: list[int],
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    targets: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """CE clean/spliced/zero-ablated, CE loss score, delta CE and KL for each site's SAE.

    `saes` are keyed by the hook they read. Each replaces `targets[hook]` (default: that same hook;
    a transcoder's target, e.g. `hook_mlp_out`) with its prediction from the clean activation.
    `starts[hook]` is `splice_start(layer, kind)` of the replaced site; `special_ids` are never
    spliced or counted. Each site's spliced and zero-ablated variants run as one doubled batch.
    """
    targets = {h: (targets or {}).get(h, h) for h in saes}
    prepare_hooks(model, list(saes) + list(targets.values()))
    cached = set(saes) | set(targets.values()) | {f"blocks.{layer}.hook_resid_pre" for layer, is_input in starts.values()
                                                  if not is_input}
    sums = {h: torch.zeros(3, dtype=torch.float64) for h in saes}  # CE spliced, CE zero-ablated, KL
    clean_sum, n_ce, n_kl = 0.0, 0, 0
    for b, clean in enumerate(clean_batches(model, tokens, special_ids, batch_size, cached)):
        n, keep = clean.tokens.shape[0], clean.keep
        clean_sum += clean.nll_sum(clean.logp)
        n_ce += int(clean.keep_ce.sum())
        n_kl += int(keep.sum())
        for hook, sae in saes.items():
            x_in, act = clean.cache[hook], clean.cache[targets[hook]]
            recon = predict(sae, x_in.to(sae.device, sae.dtype)).to(act.device, act.dtype)
            both = torch.cat([torch.where(keep.unsqueeze(-1), recon, act), torch.zeros_like(act)])
            start, is_input = starts[hook]
            replace = [(targets[hook], lambda a, hook, both=both: both)]
            logp = patched_logp(model, clean, start, replace, copies=2, resid=both if is_input else None)
            sums[hook] += torch.tensor([clean.nll_sum(logp[:n]), clean.nll_sum(logp[n:]),
                                        clean.kl(logp[:n])[keep].double().sum().item()], dtype=torch.float64)
        if on_batch:
            on_batch(b + 1)
    clean = clean_sum / max(n_ce, 1)
    results = {}
    for hook, s in sums.items():
        spliced, zero, kl = s[0].item() / max(n_ce, 1), s[1].item() / max(n_ce, 1), s[2].item() / max(n_kl, 1)
        results[hook] = {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
                         "ce_loss_score": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
                         "delta_ce": spliced - clean, "kl_div": kl}
    return results


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
