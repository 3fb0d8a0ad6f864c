"""Held-out evaluation of one SAE per site: reconstruction metrics and spliced-model figures.

Reconstruction (FVU, L0, dead/dense, l2 ratio, shrinkage) is computed on the held-out
activations of a capture store with `metrics.ReconstructionStats`.

Spliced figures follow SAELens' `run_evals` conventions, so the two can be compared:
- the reconstruction replaces the site's activation at every non-special position (special
  positions keep their clean activation); zero-ablation zeroes every position;
- CE is the mean next-token loss over predictions made *from* non-special positions;
  KL(clean || spliced) is the mean over non-special positions;
- CE loss score = (CE_zero - CE_spliced) / (CE_zero - CE_clean).
With `exclude_special_tokens=False` every position counts.

Per batch of sequences there is one clean pass (caching what the sites need), then one pass per
site whose batch holds both variants, [spliced; zero-ablated]. That pass starts at the site's
layer (`start_at_layer`) from the cached residual, so the layers below are not recomputed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from layerflow.errors import LayerflowError
from layerflow.metrics import ReconstructionMetrics, ReconstructionStats
from layerflow.sites import prepare_hooks
from layerflow.store import ActivationStore

EVAL_JSON, EVAL_CSV = "evals.json", "evals.csv"
CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class SiteEval:
    hook_name: str
    reconstruction: ReconstructionMetrics
    ce_clean: float | None = None  # mean next-token CE of the clean model (nats)
    ce_spliced: float | None = None  # with the SAE reconstruction in place of the activation
    ce_zero_ablation: float | None = None  # with the activation set to zero
    ce_loss_score: float | None = None  # (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    delta_ce: float | None = None  # ce_spliced - ce_clean
    kl_div: float | None = None  # mean KL(clean || spliced) of next-token distributions

    def to_row(self) -> dict[str, Any]:
        row = {"hook_name": self.hook_name, **self.reconstruction.to_dict()}
        row.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("hook_name", "reconstruction")})
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SiteEval":
        recon = {f.name: row[f.name] for f in fields(ReconstructionMetrics)}
        rest = {f.name: row.get(f.name) for f in fields(cls) if f.name not in ("hook_name", "reconstruction")}
        return cls(row["hook_name"], ReconstructionMetrics(**recon), **rest)


def evaluate_saes(
    saes: dict[str, Any],
    store: ActivationStore,
    loaded: Any | None = None,
    exclude_special_tokens: bool = True,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, SiteEval]:
    """Evaluate `saes` (hook name -> SAELens SAE reading raw activations) on the held-out split."""
    widths = {s["hook_name"]: s["d"] for s in store.manifest.sites}
    for hook, sae in saes.items():
        if hook not in widths:
            raise LayerflowError(f"SAE for '{hook}': that hook is not in the capture at '{store.root}'. "
                                 f"Captured: {', '.join(widths)}.")
        if sae.cfg.d_in != widths[hook]:
            raise LayerflowError(f"SAE for '{hook}' has d_in {sae.cfg.d_in}, but the captured activations there "
                                 f"have width {widths[hook]}. Use an SAE trained on this site.")
    if not store.shards("heldout"):
        raise LayerflowError(f"The capture at '{store.root}' has no held-out split: capture with --holdout > 0.")
    special = store.special_mask("heldout") if exclude_special_tokens else None
    recon = {}
    for i, (hook, sae) in enumerate(saes.items()):
        recon[hook] = _reconstruction(sae, store.activations(hook, "heldout"), special)
        if progress:
            progress(i + 1, len(saes))
    spliced = {}
    if loaded is not None:
        specials = store.manifest.special_token_ids if exclude_special_tokens else []
        spliced = spliced_metrics(saes, loaded.model, store.tokens("heldout"), specials, batch_size)
    return {h: SiteEval(h, recon[h], **spliced.get(h, {})) for h in saes}


@torch.no_grad()
def _reconstruction(sae, x: Float[torch.Tensor, "tokens d"], special: torch.Tensor | None) -> ReconstructionMetrics:
    if special is not None:
        x = x[~special]
    stats = ReconstructionStats()
    for chunk in x.split(CHUNK_TOKENS):
        chunk = chunk.to(sae.device, sae.dtype)
        latents = sae.encode(chunk)
        stats.add(chunk, sae.decode(latents), latents)
    return stats.compute()


def _start_layer(hook: str) -> tuple[int, bool]:
    """(layer to start the spliced pass at, whether the site *is* that layer's residual input)."""
    layer = int(hook.split(".")[1])
    if hook.endswith("hook_resid_pre"):
        return layer, True
    if hook.endswith("hook_resid_post"):
        return layer + 1, True
    return layer, False


@torch.no_grad()
def spliced_metrics(
    saes: dict[str, Any],
    model: Any,
    tokens: Int[torch.Tensor, "seqs ctx"],
    special_ids: list[int],
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """CE clean/spliced/zero-ablated, CE loss score, delta CE and KL for each site's SAE."""
    prepare_hooks(model, list(saes))
    starts = {h: _start_layer(h) for h in saes}
    cached = set(saes) | {f"blocks.{layer}.hook_resid_pre" for layer, is_input in starts.values() if not is_input}
    sums = {h: torch.zeros(4, dtype=torch.float64) for h in saes}  # CE clean, spliced, zero-ablated; KL
    n_ce = n_kl = 0
    device = next(model.parameters()).device
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        keep = ~torch.isin(batch, torch.tensor(special_ids, dtype=batch.dtype, device=device))
        keep_ce = keep[:, :-1]  # a prediction counts when made from a non-special position
        logits, cache = model.run_with_cache(batch, names_filter=lambda name: name in cached)
        clean_ce = model.loss_fn(logits, batch, per_token=True)
        clean_logp = logits.log_softmax(-1)
        n_ce += int(keep_ce.sum())
        n_kl += int(keep.sum())
        for hook, sae in saes.items():
            act = cache[hook]
            recon = sae.decode(sae.encode(act.to(sae.device, sae.dtype))).to(act.dtype).to(act.device)
            recon = torch.where(keep.unsqueeze(-1), recon, act)
            both = torch.cat([recon, torch.zeros_like(act)])
            start, is_input = starts[hook]
            if is_input:
                out = model(both, start_at_layer=start)
            else:
                resid = cache[f"blocks.{start}.hook_resid_pre"]
                out = model.run_with_hooks(torch.cat([resid, resid]), start_at_layer=start,
                                           fwd_hooks=[(hook, lambda a, hook, both=both: both)])
            spliced_logits, zero_logits = out.split(batch.shape[0])
            doubled = torch.cat([batch, batch])
            ce = model.loss_fn(torch.cat([spliced_logits, zero_logits]), doubled, per_token=True).split(batch.shape[0])
            kl = F.kl_div(spliced_logits.log_softmax(-1), clean_logp, log_target=True, reduction="none").sum(-1)
            sums[hook] += torch.stack([clean_ce[keep_ce].double().sum(), ce[0][keep_ce].double().sum(),
                                       ce[1][keep_ce].double().sum(), kl[keep].double().sum()])
    results = {}
    for hook, s in sums.items():
        clean, spliced, zero, kl = (s[:3] / max(n_ce, 1)).tolist() + [s[3].item() / max(n_kl, 1)]
        results[hook] = {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
                         "ce_loss_score": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
                         "delta_ce": spliced - clean, "kl_div": kl}
    return results


def write_eval_results(results: dict[str, SiteEval], folder: Path) -> tuple[Path, Path]:
    """evals.json and evals.csv in `folder`, each written to a temporary name and renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r.to_row() for r in results.values()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["hook_name"])
    writer.writeheader()
    writer.writerows(rows)
    paths = folder / EVAL_JSON, folder / EVAL_CSV
    for path, content in zip(paths, (json.dumps({"schema_version": 1, "sites": rows}, indent=2), text.getvalue())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
    return paths


def read_eval_results(path: Path) -> dict[str, SiteEval]:
    rows = json.loads(Path(path).read_text())["sites"]
    return {r["hook_name"]: SiteEval.from_row(r) for r in rows}
