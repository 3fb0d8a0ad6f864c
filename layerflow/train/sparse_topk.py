"""One training step for a stack of TopK-family SAEs, touching only the active latents.

SAELens' TopK step is six dense matmuls per layer (12 * d_in * d_sae FLOPs per token). Only the
encoder forward has to be dense: after the top-k selection, the decoder forward, every gradient
and the auxiliary (dead-latent) loss involve just the selected latents, as EleutherAI's
sparsify exploits. Here the selection is a list of (row, latent) pairs over all layers of a
group, and the sparse parts run once for the whole stack:

    decoder forward      embedding_bag over the stacked decoder rows
    decoder gradients    autograd of embedding_bag (scatter-add into the rows used)
    encoder gradients    one embedding_bag that sums, per latent, the inputs that selected it

The maths is SAELens' own (`TopKTrainingSAE`, `BatchTopKTrainingSAE`,
`MatryoshkaBatchTopKTrainingSAE` and `SAETrainer._train_step`: MSE + AuxK loss, activations
rescaled by decoder norms, grad-norm clipping at 1, Adam, threshold EMA); tests check loss,
gradients and updated weights against SAELens step by step. Layers keep their own SAELens
objects; `write_back` copies the trained weights into them for saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.optim.adam import adam as torch_adam

FAST_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")


def supports_fast_path(cfg) -> bool:
    """Whether `cfg` (a SAELens TrainingSAEConfig) can use this step."""
    arch = cfg.architecture()
    return (arch in FAST_ARCHITECTURES and cfg.normalize_activations in ("none", "expected_average_only_in")
            and not getattr(cfg, "use_matryoshka_aux_loss", False) and cfg.reshape_activations == "none")


def group_key(cfg) -> tuple:
    """Layers whose SAEs share this key are stacked into one group."""
    return (cfg.architecture(), cfg.d_in, cfg.d_sae, float(cfg.k), cfg.rescale_acts_by_decoder_norm,
            cfg.apply_b_dec_to_input, tuple(getattr(cfg, "matryoshka_widths", ()) or ()), cfg.dtype)


@dataclass
class Selection:
    """Active latents of a stack, row-major: pair i is (row[i], col[i]) with value values[i].

    Rows index the flattened [layer, token] batch, columns the flattened [layer, latent] one.
    """

    row: Int[Tensor, " nnz"]
    col: Int[Tensor, " nnz"]
    values: Float[Tensor, " nnz"]  # scaled pre-activations, before the ReLU


class _GatherEncode(torch.autograd.Function):
    """values[i] = (sae_in[row_i] . W_enc[:, col_i] + b_enc[col_i]) * norm[col_i], sparse backward.

    The forward values were already computed densely (for the top-k selection); the backward
    needs one segmented sum over the inputs per latent instead of a dense [d_in, d_sae] matmul.
    """

    @staticmethod
    def forward(ctx, W_enc, b_enc, b_dec, norm, values, sae_in, row, col, by_col, col_offsets):
        ctx.save_for_backward(W_enc, norm, values, sae_in, row, col, by_col, col_offsets)
        return values

    @staticmethod
    def backward(ctx, grad):
        W_enc, norm, values, sae_in, row, col, by_col, col_offsets = ctx.saved_tensors
        n_layers, d_in, d_sae = W_enc.shape
        norm_at = norm.reshape(-1)[col]
        grad_pre = grad * norm_at  # gradient w.r.t. the unscaled pre-activation
        grad_b_enc = torch.zeros(n_layers * d_sae, dtype=grad.dtype).index_add_(0, col, grad_pre)
        grad_W_enc_t = F.embedding_bag(row[by_col], sae_in, col_offsets, mode="sum",
                                       per_sample_weights=grad_pre[by_col])
        grad_W_enc = grad_W_enc_t.view(n_layers, d_sae, d_in).transpose(1, 2).contiguous()
        grad_b_enc = grad_b_enc.view(n_layers, d_sae)
        grad_b_dec = -torch.bmm(W_enc, grad_b_enc.unsqueeze(-1)).squeeze(-1)
        grad_norm = torch.zeros(n_layers * d_sae, dtype=grad.dtype).index_add_(0, col, grad * values / norm_at)
        return grad_W_enc, grad_b_enc, grad_b_dec, grad_norm.view(n_layers, d_sae), *([None] * 6)


def _offsets(index: Tensor, n: int) -> Tensor:
    """Start of each of `n` segments in a sorted index list (empty segments allowed)."""
    counts = torch.bincount(index, minlength=n)
    return torch.cumsum(counts, 0) - counts


def _batch_topk(relu_pre: Float[Tensor, "tokens d_sae"], n_keep: int) -> Int[Tensor, " n"]:
    """Flat indices of the `n_keep` largest entries (as torch.topk on the flattened tensor would
    select, up to ties). A threshold estimated from a strided sample cuts the candidates to a few
    times `n_keep` first: a full top-k over tokens x d_sae costs twice the encoder matmul."""
    flat = relu_pre.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 65536)]
    keep_fraction = 1.5 * n_keep / flat.numel()
    # kthvalue, not quantile: quantile sorts the sample, which cost as much as the encoder matmul
    rank = int(sample.numel() * (1 - keep_fraction))
    threshold = sample.float().kthvalue(rank).values.item() if keep_fraction < 1 and rank >= 1 else 0.0
    candidates = (flat > threshold).nonzero().squeeze(1) if threshold > 0 else None
    if candidates is None or candidates.numel() < n_keep:
        candidates = (flat > 0).nonzero().squeeze(1)
        if candidates.numel() <= n_keep:
            return candidates  # fewer positive entries than n_keep: the rest would be zeros anyway
    top = flat[candidates].topk(n_keep, sorted=False).indices
    return candidates[top].sort().values


class StackedTopKSAEs:
    """Weights, Adam state and firing statistics of N same-shaped TopK-family SAEs, stacked."""

    def __init__(self, saes: list, lrs: list[float], adam_betas: tuple[float, float] = (0.9, 0.999),
                 dead_feature_window: int = 1000):
        cfg = saes[0].cfg
        if any(group_key(s.cfg) != group_key(cfg) for s in saes):
            raise ValueError("All SAEs of a stack need the same architecture, shape and sparsity.")
        self.cfg, self.arch = cfg, cfg.architecture()
        self.n_layers, self.d_in, self.d_sae = len(saes), cfg.d_in, cfg.d_sae
        stack = lambda name: torch.stack([getattr(s, name).detach() for s in saes]).clone().requires_grad_(True)
        self.params = {name: stack(name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        self.aux_coefficients = torch.tensor([s.cfg.aux_loss_coefficient for s in saes], dtype=torch.float64)
        self.lrs = torch.tensor(lrs, dtype=torch.float64)
        self.betas, self.eps = adam_betas, 1e-8
        self.fused_adam = True  # torch's fused Adam kernel: one pass over each tensor
        self.adam_step = 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.dead_feature_window = dead_feature_window
        self.passes_since_fired = torch.zeros(self.n_layers, self.d_sae)
        self.fire_counts = torch.zeros(self.n_layers, self.d_sae)
        self.n_counted = 0
        self.topk_threshold = torch.tensor([float(getattr(s, "topk_threshold", 0.0)) for s in saes],
                                           dtype=torch.float64)
        self.k_factor = 1.0  # k annealing: the trainer sets it before each step

    # ---- forward and loss ---------------------------------------------------------------
    def _select(self, hidden: Float[Tensor, "tokens d_sae"]) -> tuple[Tensor, Tensor]:
        """(token, latent) of the active latents of one layer, row-major. BatchTopK selects among
        ReLU'd values and applies the ReLU to `hidden` in place (the selected values are positive)."""
        k = self.cfg.k * self.k_factor
        if self.arch == "topk":
            idx = hidden.topk(int(k), dim=-1, sorted=False).indices
            return torch.arange(hidden.shape[0]).repeat_interleave(idx.shape[1]), idx.reshape(-1)
        flat = _batch_topk(hidden.relu_(), int(k * hidden.shape[0]))
        return flat // self.d_sae, flat % self.d_sae

    def losses(self, x: Float[Tensor, "layers tokens d_in"], dead: torch.Tensor | None = None) -> dict[str, Tensor]:
        """Per-layer losses [layers] with a graph for backward: mse, aux, inner (Matryoshka), total."""
        p = self.params
        n_layers, n_tok, d_in = x.shape
        d_sae = self.d_sae
        norm = p["W_dec"].norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else torch.ones(n_layers, d_sae, dtype=x.dtype)
        sae_in = (x - p["b_dec"].unsqueeze(1) * self.cfg.apply_b_dec_to_input).detach()
        rows, cols, vals, aux_rows, aux_cols, aux_vals, aux_scale = [], [], [], [], [], [], []
        with torch.no_grad():
            W_eff = p["W_enc"] * norm.unsqueeze(1)  # fold the decoder norm into the encoder
            b_eff = p["b_enc"] * norm
            for layer in range(n_layers):
                hidden = torch.addmm(b_eff[layer], sae_in[layer], W_eff[layer])
                if dead is not None and (n_dead := int(dead[layer].sum())) > 0:
                    # AuxK: the top d_in/2 dead latents per token model the residual.
                    k_aux = d_in // 2
                    dead_idx = dead[layer].nonzero().squeeze(1)
                    top = hidden[:, dead_idx].topk(min(k_aux, n_dead), dim=-1, sorted=False)
                    aux_rows.append(torch.arange(n_tok).repeat_interleave(top.indices.shape[1]) + layer * n_tok)
                    aux_cols.append(dead_idx[top.indices.reshape(-1)] + layer * d_sae)
                    aux_vals.append(top.values.reshape(-1))
                    aux_scale.append((layer, min(n_dead / k_aux, 1.0)))
                tok, lat = self._select(hidden)  # may apply the ReLU in place
                rows.append(tok + layer * n_tok)
                cols.append(lat + layer * d_sae)
                vals.append(hidden[tok, lat])
        selection = Selection(torch.cat(rows), torch.cat(cols), torch.cat(vals))
        x_flat, sae_in_flat = x.reshape(-1, d_in), sae_in.reshape(-1, d_in)

        pre = self._encode_values(selection, norm, sae_in_flat)
        acts = pre.relu()
        self.last_acts = (selection, acts.detach())
        out = self._decode(selection, acts, norm, n_layers * n_tok) + p["b_dec"].repeat_interleave(n_tok, 0)
        mse = (out - x_flat).pow(2).sum(-1).view(n_layers, n_tok).mean(1)
        result = {"mse": mse}

        aux_terms = [x.new_zeros(())] * n_layers
        if aux_rows:
            aux_sel = Selection(torch.cat(aux_rows), torch.cat(aux_cols), torch.cat(aux_vals))
            aux_pre = self._encode_values(aux_sel, norm, sae_in_flat)
            recons = self._decode(aux_sel, aux_pre, norm, n_layers * n_tok).view(n_layers, n_tok, d_in)
            residual = (x_flat - out).detach().view(n_layers, n_tok, d_in)
            for layer, scale in aux_scale:
                layer_loss = (recons[layer] - residual[layer]).pow(2).sum(-1).mean()
                aux_terms[layer] = self.aux_coefficients[layer].item() * scale * layer_loss
        aux = torch.stack(aux_terms)
        result["aux"] = aux

        inner = torch.zeros(n_layers, dtype=x.dtype)
        for width in (getattr(self.cfg, "matryoshka_widths", None) or [])[:-1]:
            in_prefix = (selection.col % d_sae < width).to(acts.dtype)
            prefix_out = self._decode(selection, acts * in_prefix, norm, n_layers * n_tok)
            prefix_out = prefix_out + p["b_dec"].repeat_interleave(n_tok, 0)
            inner = inner + (prefix_out - x_flat).pow(2).sum(-1).view(n_layers, n_tok).mean(1)
        result["inner"] = inner
        result["total"] = mse + aux + inner
        return result

    def _encode_values(self, sel: Selection, norm: Tensor, sae_in_flat: Tensor) -> Tensor:
        by_col = torch.argsort(sel.col, stable=True)
        col_offsets = _offsets(sel.col, self.n_layers * self.d_sae)
        p = self.params
        return _GatherEncode.apply(p["W_enc"], p["b_enc"], p["b_dec"], norm, sel.values, sae_in_flat,
                                   sel.row, sel.col, by_col, col_offsets)

    def _decode(self, sel: Selection, acts: Tensor, norm: Tensor, n_rows: int) -> Tensor:
        """sum over active latents of acts / ||W_dec row|| * W_dec row, per row (no bias)."""
        coef = acts / norm.reshape(-1)[sel.col]
        W_dec = self.params["W_dec"].reshape(-1, self.d_in)
        return F.embedding_bag(sel.col, W_dec, _offsets(sel.row, n_rows), mode="sum", per_sample_weights=coef)

    # ---- one optimizer step ---------------------------------------------------------------
    def dead_latents(self) -> torch.Tensor:
        return self.passes_since_fired > self.dead_feature_window

    def step(self, x: Float[Tensor, "layers tokens d_in"], lr_factors: Tensor | None = None) -> dict[str, Tensor]:
        """SAELens' `_train_step` for every layer at once; returns the detached per-layer losses.

        `lr_factors` [layers] multiplies each layer's learning rate (the LR schedule)."""
        losses = self.losses(x, self.dead_latents())
        self._update_statistics(x.shape[1])
        losses["total"].sum().backward()
        self._clip_and_adam(lr_factors)
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def _update_statistics(self, n_tok: int) -> None:
        selection, acts = self.last_acts
        fired = selection.col[acts > 0]
        counts = torch.bincount(fired, minlength=self.n_layers * self.d_sae).view(self.n_layers, self.d_sae)
        self.passes_since_fired += 1
        self.passes_since_fired[counts > 0] = 0
        self.fire_counts += counts
        self.n_counted += n_tok
        if self.arch != "topk":
            layer_of = selection.col[acts > 0] // self.d_sae
            min_positive = torch.full((self.n_layers,), math.inf, dtype=acts.dtype)
            min_positive.scatter_reduce_(0, layer_of, acts[acts > 0], reduce="amin")
            lr = self.cfg.topk_threshold_lr
            has = torch.isfinite(min_positive)
            self.topk_threshold[has] = (1 - lr) * self.topk_threshold[has] + lr * min_positive[has].double()

    @torch.no_grad()
    def _clip_and_adam(self, lr_factors: Tensor | None) -> None:
        grads = {k: p.grad for k, p in self.params.items()}
        sq = sum(torch.linalg.vector_norm(g.reshape(self.n_layers, -1), dim=1).pow(2) for g in grads.values())
        clip = (1.0 / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_(max_norm=1), per SAE
        for name, grad in grads.items():
            grad.mul_(clip.view((self.n_layers,) + (1,) * (grad.dim() - 1)))
        self.adam_step += 1
        lrs = (self.lrs * (lr_factors if lr_factors is not None else 1.0)).tolist()
        # torch's own Adam, one call per distinct learning rate, on per-layer views of the stacks.
        for lr in sorted(set(lrs)):
            layers = [i for i, value in enumerate(lrs) if value == lr]
            views = lambda tensors: [t[i] for t in tensors.values() for i in layers]
            torch_adam(
                views(self.params), views(grads), views(self.exp_avg), views(self.exp_avg_sq), [],
                [torch.tensor(float(self.adam_step - 1)) for _ in range(len(layers) * len(self.params))],
                foreach=False, fused=self.fused_adam, amsgrad=False, lr=lr, beta1=self.betas[0], beta2=self.betas[1],
                weight_decay=0.0, eps=self.eps, maximize=False)
        for param in self.params.values():
            param.grad = None

    # ---- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def write_back(self, saes: list) -> None:
        """Copy the trained weights (and BatchTopK thresholds) into the layers' SAELens SAEs."""
        for layer, sae in enumerate(saes):
            for name, param in self.params.items():
                getattr(sae, name).data.copy_(param[layer])
            if hasattr(sae, "topk_threshold"):
                sae.topk_threshold.fill_(self.topk_threshold[layer].item())

    def log_feature_sparsity(self) -> Float[Tensor, "layers d_sae"]:
        """log10 firing frequency per latent since the start (SAELens' sparsity.safetensors)."""
        return torch.log10(self.fire_counts / max(self.n_counted, 1) + 1e-10)

    def state_dict(self) -> dict:
        return {"params": {k: p.detach() for k, p in self.params.items()}, "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq, "adam_step": self.adam_step,
                "passes_since_fired": self.passes_since_fired, "fire_counts": self.fire_counts,
                "n_counted": self.n_counted, "topk_threshold": self.topk_threshold}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k, p in self.params.items():
            p.copy_(state["params"][k])
        self.exp_avg = {k: v.clone() for k, v in state["exp_avg"].items()}
        self.exp_avg_sq = {k: v.clone() for k, v in state["exp_avg_sq"].items()}
        self.adam_step, self.n_counted = state["adam_step"], state["n_counted"]
        self.passes_since_fired = state["passes_since_fired"].clone()
        self.fire_counts = state["fire_counts"].clone()
        self.topk_threshold = state["topk_threshold"].clone()
