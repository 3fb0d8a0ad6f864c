"""Spliced passes: a dictionary's output put in place of an activation, and what the model then predicts.

Spliced figures follow SAELens' `run_evals` (`get_recons_loss`), so the two can be compared:
- the reconstruction replaces the site's activation at every non-special position (special
  positions keep their clean activation); zero-ablation zeroes every position;
- CE is the mean next-token loss (logits[:, t] against tokens[:, t+1]) over predictions made
  *from* a non-special position t: the target may be special (e.g. an EOS), the input may not;
- KL(clean || spliced) is the mean over all non-special positions, the last one included;
- CE loss score = (CE_zero - CE_spliced) / (CE_zero - CE_clean).
With `exclude_special_tokens=False` every position counts and every position is spliced.

Per batch of sequences there is one clean pass (logits plus the cached activations the sites
need), then one pass per site whose batch holds both variants, [spliced; zero-ablated]. That
pass starts at the site's layer (`start_at_layer`) from the cached residual, so the layers below
are not recomputed: a `resid_pre`/`resid_post` site *is* the residual entering layer L / L+1;
any other site is replaced by a hook inside block L. The same clean pass and patched re-run
serve the interventions of `features.intervene`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from layerflow.dictionaries.kinds import predict
from layerflow.models.load import attention_mask
from layerflow.models.sites import prepare_hooks

if TYPE_CHECKING:
    from sae_lens import SAE


def splice_start(layer: int, kind: str) -> tuple[int, bool]:
    """(layer the spliced pass starts at, whether the site *is* that layer's residual input)."""
    if kind == "resid_pre":
        return layer, True
    if kind == "resid_post":
        return layer + 1, True  # == n_layers for the last block: only ln_final and unembed run
    return layer, False


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

    def nll_rows(self, logp: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, " batch"]:
        """`nll_sum` per sequence, float64 on the CPU."""
        nll = next_token_nll(logp, self.tokens).double()
        return torch.where(self.keep_ce, nll, 0.0).sum(1).cpu()

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


@dataclass
class SplicedSums:
    """Per held-out sequence: the counted predictions (`n_ce`) and positions (`n_kl`), the clean
    next-token loss, and for each site (`hook`) [sequences, 3] sums of the spliced loss, the
    zero-ablated loss and KL(clean || spliced). `metrics()` gives the figures; `resample` the
    figures of whole sequences drawn again (the transfer matrix's intervals)."""

    n_ce: torch.Tensor
    n_kl: torch.Tensor
    clean: torch.Tensor
    sites: dict[str, torch.Tensor]

    def metrics(self) -> dict[str, dict[str, float]]:
        n_ce, n_kl = max(self.n_ce.sum().item(), 1), max(self.n_kl.sum().item(), 1)
        clean = self.clean.sum().item() / n_ce
        results = {}
        for hook, s in self.sites.items():
            spliced, zero, kl = s[:, 0].sum().item() / n_ce, s[:, 1].sum().item() / n_ce, s[:, 2].sum().item() / n_kl
            results[hook] = {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
                             "ce_loss_score": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
                             "delta_ce": spliced - clean, "kl_div": kl}
        return results

    def resample(self, hook: str, weights: Float[torch.Tensor, "replicates sequences"]) -> dict[str, torch.Tensor]:
        """delta_ce and kl_div of `hook` under each row of `weights` (how many times each sequence is drawn)."""
        w, s = weights.double(), self.sites[hook]
        return {"delta_ce": (w @ (s[:, 0] - self.clean)) / (w @ self.n_ce), "kl_div": (w @ s[:, 2]) / (w @ self.n_kl)}


@torch.no_grad()
def spliced_metrics(saes: dict[str, "SAE"], model: Any, tokens: Int[torch.Tensor, "seqs ctx"],
                    starts: dict[str, tuple[int, bool]], special_ids: list[int], batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None,
                    targets: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """CE clean/spliced/zero-ablated, CE loss score, delta CE and KL for each site's SAE: `spliced_sums`."""
    return spliced_sums(saes, model, tokens, starts, special_ids, batch_size, on_batch, targets).metrics()


@torch.no_grad()
def spliced_sums(
    saes: dict[str, "SAE"],
    model: Any,
    tokens: Int[torch.Tensor, "seqs ctx"],
    starts: dict[str, tuple[int, bool]],
    special_ids: list[int],
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    targets: dict[str, str] | None = None,
) -> SplicedSums:
    """The per-sequence sums behind CE clean/spliced/zero-ablated and KL for each site's SAE.

    `saes` are keyed by the hook they read. Each replaces `targets[hook]` (default: that same hook;
    a transcoder's target, e.g. `hook_mlp_out`) with its prediction from the clean activation.
    `starts[hook]` is `splice_start(layer, kind)` of the replaced site; `special_ids` are never
    spliced or counted. Each site's spliced and zero-ablated variants run as one doubled batch.
    """
    targets = {h: (targets or {}).get(h, h) for h in saes}
    prepare_hooks(model, list(saes) + list(targets.values()))
    cached = set(saes) | set(targets.values()) | {f"blocks.{layer}.hook_resid_pre" for layer, is_input in starts.values()
                                                  if not is_input}
    rows: dict[str, list[torch.Tensor]] = {h: [] for h in saes}  # per batch, [batch, 3]
    clean_rows, n_ce, n_kl = [], [], []
    for b, clean in enumerate(clean_batches(model, tokens, special_ids, batch_size, cached)):
        n, keep = clean.tokens.shape[0], clean.keep
        clean_rows.append(clean.nll_rows(clean.logp))
        n_ce.append(clean.keep_ce.sum(1).double().cpu())
        n_kl.append(keep.sum(1).double().cpu())
        for hook, sae in saes.items():
            x_in, act = clean.cache[hook], clean.cache[targets[hook]]
            recon = predict(sae, x_in.to(sae.device, sae.dtype)).to(act.device, act.dtype)
            both = torch.cat([torch.where(keep.unsqueeze(-1), recon, act), torch.zeros_like(act)])
            start, is_input = starts[hook]
            replace = [(targets[hook], lambda a, hook, both=both: both)]
            logp = patched_logp(model, clean, start, replace, copies=2, resid=both if is_input else None)
            kl = torch.where(keep, clean.kl(logp[:n]).double(), 0.0).sum(1).cpu()
            rows[hook].append(torch.stack([clean.nll_rows(logp[:n]), clean.nll_rows(logp[n:]), kl], 1))
        if on_batch:
            on_batch(b + 1)
    empty = torch.zeros(0, dtype=torch.float64)
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return SplicedSums(cat(n_ce), cat(n_kl), cat(clean_rows),
                       {h: torch.cat(r) if r else torch.zeros(0, 3, dtype=torch.float64) for h, r in rows.items()})
