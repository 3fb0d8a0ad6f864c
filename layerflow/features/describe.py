"""What a feature means, cached per run: its top-activating held-out contexts, its firing density,
and the tokens its decoder direction promotes (logit lens).

Per (model, hook) one file, computed once from the run's held-out split and reused by `trace`
and `intervene`:

    DIR/features/<model>/<hook>.safetensors
        values     [d_sae, k]  top-k activations per latent, descending (0: fewer than k firings)
        positions  [d_sae, k]  flat held-out token index (seq * context + pos); -1: none
        fire_count [d_sae]     held-out tokens the latent fired on (special tokens left out)
        metadata   n_tokens (tokens seen), k, max_tokens, sae_key (size and mtime of the SAE's
                   weights file: a retrained SAE makes the cache stale and it is recomputed)

Files are written to a temporary name and renamed. All missing hooks of a model are computed
in one pass over the held-out shards (`capture.batches.heldout_batches`).

Promoted tokens: the top tokens of (d_f * w_final) @ W_U, where d_f = decode(e_f) - decode(0) is
the feature's decoder direction exactly as decoding adds it, and w_final the final norm's
elementwise weight. The norm's per-token scale (1 / rms) is positive, so it does not change the
ranking and is left out; a LayerNorm's mean subtraction and bias are left out too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from layerflow.capture.batches import heldout_batches
from layerflow.dictionaries.io import weights_file
from layerflow.dictionaries.kinds import encode, input_hook
from layerflow.dictionaries.top_activations import TopActivations, contexts, token_text
from layerflow.files import FEATURES_DIR, atomic

TOP_K = 10  # contexts kept per latent


@dataclass
class FeatureStats:
    """One SAE's held-out statistics: where each latent fires most, and how often it fires."""

    top: TopActivations
    fire_count: Int[Tensor, " d_sae"]
    n_tokens: int

    @property
    def density(self) -> Float[Tensor, " d_sae"]:
        """Fraction of held-out (non-special) tokens each latent fires on."""
        return self.fire_count.double() / max(self.n_tokens, 1)


@dataclass
class FeatureDescription:
    feature: int
    density: float  # firing fraction on held-out tokens
    max_activation: float  # largest held-out activation (0: never fired there)
    contexts: list[str] = field(default_factory=list)  # strongest first, the firing token in [[ ]]
    promoted_tokens: list[str] = field(default_factory=list)  # logit lens of the decoder direction

    def snippet(self, width: int = 40) -> str:
        """The best context, trimmed to about `width` characters around the firing token."""
        if not self.contexts:
            return "(never fires on held-out text)"
        text = " ".join(self.contexts[0].split())
        mark = text.find("[[")
        start = max(0, min(mark - width // 2, len(text) - width))
        return ("..." if start > 0 else "") + text[start:start + width] + ("..." if start + width < len(text) else "")


def cache_path(root: str | Path, model: str, hook: str) -> Path:
    return Path(root) / FEATURES_DIR / model / f"{hook}.safetensors"


def _sae_key(sae_folder: Path | None) -> str:
    weights = weights_file(sae_folder) if sae_folder else None
    if weights is None or not weights.exists():
        return "unknown"
    stat = weights.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def feature_stats(root: str | Path, model: str, saes: dict[str, Any], store: Any, k: int = TOP_K,
                  max_tokens: int | None = None, sae_folders: dict[str, Path] | None = None) -> dict[str, FeatureStats]:
    """{hook: FeatureStats} for every SAE in `saes` (hook -> SAELens SAE reading raw activations of
    that hook in `store`), read from the run's cache, or computed and cached when missing or stale."""
    sae_folders = sae_folders or {}
    wanted = {"k": str(k), "max_tokens": str(max_tokens)}
    stats, missing = {}, []
    for hook in saes:
        path = cache_path(root, model, hook)
        key = {**wanted, "sae_key": _sae_key(sae_folders.get(hook))}
        cached = _read(path, key)
        if cached is None:
            missing.append(hook)
        else:
            stats[hook] = cached
    if missing:
        fresh = _compute({h: saes[h] for h in missing}, store, k, max_tokens)
        for hook, s in fresh.items():
            _write(cache_path(root, model, hook), s, {**wanted, "sae_key": _sae_key(sae_folders.get(hook))})
        stats.update(fresh)
    return {h: stats[h] for h in saes}


@torch.no_grad()
def _compute(saes: dict[str, Any], store: Any, k: int, max_tokens: int | None) -> dict[str, FeatureStats]:
    reads = {h: input_hook(sae, h) for h, sae in saes.items()}  # a transcoder reads its input site
    tops = {h: TopActivations.empty(sae.cfg.d_sae, k) for h, sae in saes.items()}
    counts = {h: torch.zeros(sae.cfg.d_sae, dtype=torch.long) for h, sae in saes.items()}
    n_tokens = 0
    batches = heldout_batches(store, sorted(set(reads.values())), store.manifest.special_token_ids, max_tokens)
    for acts, positions in batches:
        n_tokens += len(positions)
        for hook, sae in saes.items():
            latents = encode(sae, acts[reads[hook]])
            tops[hook].update(latents, positions)
            counts[hook] += (latents > 0).sum(0).cpu()
    return {h: FeatureStats(tops[h], counts[h], n_tokens) for h in saes}


def _read(path: Path, key: dict[str, str]) -> FeatureStats | None:
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if any(meta.get(name) != value for name, value in key.items()):
            return None
        top = TopActivations(f.get_tensor("values"), f.get_tensor("positions"))
        return FeatureStats(top, f.get_tensor("fire_count"), int(meta["n_tokens"]))


def _write(path: Path, stats: FeatureStats, key: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"values": stats.top.values.contiguous(), "positions": stats.top.positions.contiguous(),
               "fire_count": stats.fire_count.contiguous()}
    with atomic(path) as tmp:
        save_file(tensors, str(tmp), metadata={**key, "n_tokens": str(stats.n_tokens)})


@torch.no_grad()
def decoder_directions(sae: Any, features: list[int]) -> Float[Tensor, "n d"]:
    """What decoding adds per unit of each feature: decode(e_f) - decode(0) (mind TopK's decoder-norm rescale)."""
    one_hot = torch.zeros(len(features), sae.cfg.d_sae, dtype=sae.dtype, device=sae.device)
    one_hot[torch.arange(len(features)), torch.tensor(features, dtype=torch.long)] = 1
    return (sae.decode(one_hot) - sae.decode(torch.zeros_like(one_hot))).float()


@torch.no_grad()
def promoted_tokens(sae: Any, model: Any, features: list[int], n: int = 5) -> dict[int, list[int]]:
    """{feature: the n token ids its decoder direction raises most}, through the final norm's weight and W_U.

    Empty lists when the SAE does not write into the residual stream's width (e.g. an MLP hidden site)."""
    width = getattr(sae.cfg, "d_out", sae.cfg.d_in)
    if not features or width != model.cfg.d_model:
        return {f: [] for f in features}
    directions = decoder_directions(sae, features).to(model.W_U.device)
    weight = getattr(model.ln_final, "w", None) if hasattr(model, "ln_final") else None
    if weight is not None:
        directions = directions * weight.float()
    logits = directions @ model.W_U.float()
    top = logits.topk(min(n, logits.shape[-1]), dim=-1).indices.tolist()
    return dict(zip(features, top))


def describe(stats: FeatureStats, features: list[int], heldout_tokens: Int[Tensor, "seqs ctx"], tokenizer: Any,
             promoted: dict[int, list[int]] | None = None, n_contexts: int = 3) -> dict[int, FeatureDescription]:
    """Descriptions of `features` from an SAE's cached statistics and its promoted token ids."""
    promoted = promoted or {}
    out = {}
    for f in features:
        found = contexts(stats.top, f, heldout_tokens, tokenizer)[:n_contexts]
        out[f] = FeatureDescription(f, float(stats.density[f]), float(stats.top.values[f, 0]),
                                    [c.text() for c in found], [token_text(tokenizer, t) for t in promoted.get(f, [])])
    return out
