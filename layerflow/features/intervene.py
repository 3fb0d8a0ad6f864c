"""Interventions on SAE features, and what they change downstream.

An edit goes through the SAE with the reconstruction error kept. With latents a = enc(x), the
edited latents a' and the error e = x - dec(a), the site gets dec(a') + e, computed as

    x' = x + dec(a') - dec(a)

so only the edited features change the activation: ablating feature f moves x by exactly
-a_f * d_f (d_f = dec(e_f) - dec(0), its decoder direction) and not at all where a_f = 0.
For a transcoder the latents are read at its input site and the change is added at its output
site. Modes, per feature f and value v:

    ablate  a'_f = 0         scale  a'_f = v * a_f
    clamp   a'_f = v         steer  a'_f = a_f + v   (adds v * d_f: a decoder-direction steer)

Edits apply at every non-special position (BOS and other special tokens keep their activation:
the SAEs never saw them).

What is measured (`intervene`): on the prompt, at the chosen token, how every later SAE site's
features respond (largest |delta| first), the logits of given tokens, and KL(clean || edited)
of the next-token distribution (at the token, and the mean over non-special positions); on the
run's held-out text, the change in next-token CE and the mean KL, as `evaluate.splice.spliced_metrics`
counts them (predictions from non-special positions).

Batch mode (`rank_features`): ablate each of the top-N features of a site one at a time and rank
them by effect. Selectivity is a feature's firing density on held-out tokens (descriptions
cache); importance is the mean held-out KL when it is ablated. Because a rare feature changes
few positions, the mean over all tokens is partly density by construction, so the KL over the
positions where the feature fires ("KL when active") is reported and correlated too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from scipy.stats import spearmanr

from layerflow import defaults
from layerflow.dictionaries.kinds import encode
from layerflow.errors import LayerflowError, did_you_mean
from layerflow.evaluate.splice import clean_batches, patched_logp
from layerflow.features.describe import FeatureDescription
from layerflow.features.run_saes import Loader, RunSAEs
from layerflow.files import json_safe
from layerflow.results import RunResults

MODES = ("ablate", "scale", "clamp", "steer")


@dataclass(frozen=True)
class FeatureEdit:
    feature: int
    mode: str = "ablate"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LayerflowError(f"Unknown mode '{self.mode}'. {did_you_mean(self.mode, list(MODES))}")
        if self.mode != "ablate" and self.value is None:
            raise LayerflowError(f"Mode '{self.mode}' needs a value (--value), e.g. --value 2.")

    def apply(self, latents: Float[torch.Tensor, "... d_sae"]) -> None:
        """Edit `latents` in place."""
        a = latents[..., self.feature]
        if self.mode == "ablate":
            latents[..., self.feature] = 0
        elif self.mode == "scale":
            latents[..., self.feature] = a * self.value
        elif self.mode == "clamp":
            latents[..., self.feature] = self.value
        else:
            latents[..., self.feature] = a + self.value


@torch.no_grad()
def edited(sae: Any, x_in: Float[torch.Tensor, "... d_in"], x_out: Float[torch.Tensor, "... d_out"],
           edits: list[FeatureEdit], keep: Bool[torch.Tensor, "..."] | None = None
           ) -> tuple[Float[torch.Tensor, "... d_out"], Float[torch.Tensor, "... d_sae"]]:
    """(x_out + dec(a') - dec(a) where `keep`, the clean latents a = enc(x_in)). For an SAE x_in is x_out."""
    latents = encode(sae, x_in)
    changed = latents.clone()
    for edit in edits:
        edit.apply(changed)
    delta = (sae.decode(changed) - sae.decode(latents)).to(x_out.device, x_out.dtype)
    if keep is not None:
        delta = delta * keep.unsqueeze(-1).to(delta.dtype)
    return x_out + delta, latents


def edit_hooks(sae: Any, input_hook: str, output_hook: str, edits: list[FeatureEdit],
               keep: Bool[torch.Tensor, "batch pos"] | None, seen: dict | None = None) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks applying `edits` through `sae`; `seen["latents"]` gets the clean latents."""
    seen = {} if seen is None else seen

    def read_input(act, hook):
        seen["x_in"] = act
        return act

    def write(act, hook):
        out, seen["latents"] = edited(sae, seen.get("x_in", act), act, edits, keep)
        return out

    if input_hook == output_hook:
        return [(output_hook, write)]
    return [(input_hook, read_input), (output_hook, write)]


# ------------------------------------------------------------------ results


@dataclass
class FeatureChange:
    feature: int
    clean: float
    edited: float

    @property
    def delta(self) -> float:
        return self.edited - self.clean


@dataclass
class DownstreamLayer:
    hook: str
    layer: int
    changes: list[FeatureChange]  # largest |delta| first
    total_abs_change: float  # sum over features of |delta|
    n_changed: int  # features whose activation changed


@dataclass
class TokenLogit:
    token: str
    token_id: int
    clean: float
    edited: float


@dataclass
class HeldoutEffect:
    n_tokens: int  # predictions counted
    ce_clean: float
    ce_edited: float
    kl_mean: float  # mean KL(clean || edited) over non-special positions
    kl_when_active: float  # mean KL over the positions where an edited feature was active (NaN: never)
    active_fraction: float  # fraction of positions where an edited feature was active

    @property
    def delta_ce(self) -> float:
        return self.ce_edited - self.ce_clean


@dataclass
class InterventionResult:
    model: str
    hook: str
    layer: int
    edits: list[FeatureEdit]
    prompt: str | None = None
    position: int | None = None
    token: str | None = None
    clean_activation: dict[int, float] = field(default_factory=dict)  # edited feature -> its activation at the token
    downstream: list[DownstreamLayer] = field(default_factory=list)
    logits: list[TokenLogit] = field(default_factory=list)
    kl_at_token: float | None = None
    kl_prompt_mean: float | None = None
    heldout: HeldoutEffect | None = None
    descriptions: dict[str, dict[int, FeatureDescription]] = field(default_factory=dict)  # hook -> feature -> description

    @property
    def logit_difference(self) -> tuple[float, float] | None:
        """(clean, edited) logit of the first given token minus the second."""
        if len(self.logits) < 2:
            return None
        a, b = self.logits[:2]
        return a.clean - b.clean, a.edited - b.edited

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heldout"] = None if self.heldout is None else {**asdict(self.heldout), "delta_ce": self.heldout.delta_ce}
        d["logit_difference"] = self.logit_difference
        d["descriptions"] = {h: {str(f): asdict(x) for f, x in fs.items()} for h, fs in self.descriptions.items()}
        for layer in d["downstream"]:
            for c in layer["changes"]:
                c["delta"] = c["edited"] - c["clean"]
        return json_safe(d)


# ------------------------------------------------------------------ the API


def intervene(
    run: str | Path | RunResults | RunSAEs,
    layer: int | str,
    features: int | list[int],
    mode: str = "ablate",
    value: float | None = None,
    prompt: str | list[int] | torch.Tensor | None = None,
    tokens: list[str] | None = None,
    token: int = -1,
    heldout_tokens: int = defaults.INTERVENE_HELDOUT_TOKENS,
    top_n: int = defaults.INTERVENE_TOP_N,
    model: str | None = None,
    load: Loader | None = None,
    describe: bool = True,
) -> InterventionResult:
    """Edit `features` of the SAE at `layer` (a layer number or hook name) and measure what changes.

    `prompt` (text or token ids): downstream features, the logits of `tokens` (strings that are
    one token each) and KL at position `token`. `heldout_tokens`: CE and KL on that many of the
    run's held-out tokens (whole sequences; 0 = none). `describe`: descriptions of the edited and
    the most changed downstream features (the run's descriptions cache).
    """
    run_saes = run if isinstance(run, RunSAEs) else RunSAEs.open(run, model)
    hook = run_saes.hook_at(layer)
    features = [features] if isinstance(features, int) else list(features)
    if not features:
        raise LayerflowError("No feature to edit: give at least one feature id.")
    edits = [FeatureEdit(run_saes.check_feature(hook, f), mode, value) for f in features]
    if isinstance(prompt, str) and not prompt.strip():
        raise LayerflowError("The prompt is empty: give some text, e.g. --prompt 'The capital of France is'.")
    if prompt is None and heldout_tokens <= 0:
        raise LayerflowError("Nothing to measure: give a prompt or held-out tokens (> 0).")
    run_saes.load(load)
    result = InterventionResult(run_saes.name, hook, run_saes.layer(hook), edits)
    if prompt is not None:
        _on_prompt(run_saes, hook, edits, prompt, tokens or [], token, top_n, result)
    elif tokens:
        raise LayerflowError("--tokens needs a --prompt: the logits are read at a token of the prompt.")
    if heldout_tokens > 0:
        result.heldout = heldout_effects(run_saes, hook, [edits], heldout_tokens)[0]
    if describe:
        wanted = {hook: [e.feature for e in edits]}
        for layer in result.downstream:
            wanted[layer.hook] = [c.feature for c in layer.changes]
        stats = run_saes.feature_stats([h for h, fs in wanted.items() if fs])
        result.descriptions = {h: run_saes.describe(h, sorted(set(fs)), stats[h]) for h, fs in wanted.items() if fs}
    return result


def _token_ids(run_saes: RunSAEs, strings: list[str]) -> list[int]:
    tokenizer = run_saes.tl_model.tokenizer
    ids = []
    for s in strings:
        if tokenizer is None:
            if not s.strip().isdigit():
                raise LayerflowError(f"{run_saes.name} has no tokenizer: give token ids, not '{s}'.")
            ids.append(int(s))
            continue
        encoded = tokenizer.encode(s, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = [tokenizer.decode([t]) for t in encoded]
            raise LayerflowError(f"'{s}' is {len(encoded)} tokens for {run_saes.name} ({pieces}): give strings that "
                                 "are one token each (mind the leading space, e.g. ' Paris').")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def _on_prompt(run_saes: RunSAEs, hook: str, edits: list[FeatureEdit], prompt: Any, strings: list[str], token: int,
               top_n: int, result: InterventionResult) -> None:
    model = run_saes.tl_model
    ids = run_saes.tokenize(prompt)
    texts = run_saes.token_texts(ids)
    position = run_saes.token_positions(ids, token, texts)[0]
    token_ids = _token_ids(run_saes, strings)
    later = [h for h in run_saes.hooks if run_saes.layer(h) > run_saes.layer(hook)]
    keep = ~torch.isin(ids, torch.tensor(run_saes.special_ids, dtype=ids.dtype, device=ids.device))
    names = set(later)
    clean_logits, clean = model.run_with_cache(ids, names_filter=lambda n: n in names)
    seen: dict = {}
    hooks = edit_hooks(run_saes.saes[hook], hook, run_saes.output_hook(hook), edits, keep, seen)
    with model.hooks(fwd_hooks=hooks):
        new_logits, new = model.run_with_cache(ids, names_filter=lambda n: n in names)
    result.prompt = prompt if isinstance(prompt, str) else " ".join(map(str, ids[0].tolist()))
    result.position, result.token = position, texts[position]
    result.clean_activation = {e.feature: float(seen["latents"][0, position, e.feature]) for e in edits}
    for h in later:
        a, b = run_saes.encode(h, clean[h][0, position]), run_saes.encode(h, new[h][0, position])
        delta = b - a
        order = delta.abs().argsort(descending=True)[:top_n]
        changes = [FeatureChange(int(f), float(a[f]), float(b[f])) for f in order.tolist() if delta[f] != 0]
        result.downstream.append(DownstreamLayer(h, run_saes.layer(h), changes, float(delta.abs().sum()),
                                                 int((delta != 0).sum())))
    result.logits = [TokenLogit(s, t, float(clean_logits[0, position, t]), float(new_logits[0, position, t]))
                     for s, t in zip(strings, token_ids)]
    kl = F.kl_div(new_logits.log_softmax(-1), clean_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)[0]
    result.kl_at_token = float(kl[position])
    result.kl_prompt_mean = float(kl[keep[0]].mean()) if keep.any() else math.nan


@torch.no_grad()
def heldout_effects(run_saes: RunSAEs, hook: str, edit_sets: list[list[FeatureEdit]], max_tokens: int,
                    batch_size: int = 8, on_batch: Callable[[int, int], None] | None = None) -> list[HeldoutEffect]:
    """CE and KL on the run's first held-out sequences holding `max_tokens` tokens, for each set of edits.

    Per batch one clean pass caches the residual entering the SAE's block; each edit set then
    re-runs only from that block on (`start_at_layer`), as `evaluate.splice.spliced_metrics` does.
    """
    model = run_saes.tl_model
    sae = run_saes.saes[hook]
    tokens = run_saes.store.tokens("heldout")
    tokens = tokens[:max(1, math.ceil(max_tokens / tokens.shape[1]))]
    output_hook = run_saes.output_hook(hook)
    start = min(run_saes.layer(hook), run_saes.layer(output_hook))
    n_sets = len(edit_sets)
    sums = torch.zeros(n_sets, 4, dtype=torch.float64)  # CE edited, KL, KL where active, active positions
    clean_sum, n_ce, n_kl = 0.0, 0, 0
    n_batches = math.ceil(len(tokens) / batch_size)
    names = {f"blocks.{start}.hook_resid_pre"}
    for b, clean in enumerate(clean_batches(model, tokens, run_saes.special_ids, batch_size, names)):
        keep = clean.keep
        clean_sum += clean.nll_sum(clean.logp)
        n_ce += int(clean.keep_ce.sum())
        n_kl += int(keep.sum())
        for i, edits in enumerate(edit_sets):
            seen: dict = {}
            logp = patched_logp(model, clean, start, edit_hooks(sae, hook, output_hook, edits, keep, seen))
            kl = clean.kl(logp)
            active = keep & (seen["latents"][..., [e.feature for e in edits]] > 0).any(-1).to(keep.device)
            sums[i] += torch.tensor([clean.nll_sum(logp), kl[keep].double().sum().item(),
                                     kl[active].double().sum().item(), active.sum().item()], dtype=torch.float64)
        if on_batch:
            on_batch(b + 1, n_batches)
    clean = clean_sum / max(n_ce, 1)
    return [HeldoutEffect(n_ce, clean, s[0].item() / max(n_ce, 1), s[1].item() / max(n_kl, 1),
                          s[2].item() / s[3].item() if s[3] > 0 else math.nan, s[3].item() / max(n_kl, 1))
            for s in sums]


# ------------------------------------------------------------------ batch mode


@dataclass
class RankedFeature:
    feature: int
    density: float  # selectivity: firing fraction on held-out tokens (lower = more selective)
    prompt_activation: float | None  # at the chosen token, when ranked on a prompt
    effect: HeldoutEffect  # of ablating it alone
    description: FeatureDescription | None = None


@dataclass
class LayerRanking:
    hook: str
    layer: int
    features: list[RankedFeature]  # most important first (mean held-out KL)
    spearman_density_kl: float | None  # across these features (NaN/None: fewer than 3 or constant)
    spearman_density_kl_when_active: float | None


@dataclass
class FeatureRanking:
    model: str
    selection: str  # how the N features were chosen
    heldout_tokens: int
    layers: list[LayerRanking]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for layer, ranked in zip(d["layers"], self.layers):
            for f, r in zip(layer["features"], ranked.features):
                f["effect"]["delta_ce"] = r.effect.delta_ce
        return json_safe(d)


def rank_features(
    run: str | Path | RunResults | RunSAEs,
    layers: list[int | str],
    n: int = 10,
    prompt: str | list[int] | torch.Tensor | None = None,
    token: int = -1,
    heldout_tokens: int = defaults.INTERVENE_HELDOUT_TOKENS,
    model: str | None = None,
    load: Loader | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> FeatureRanking:
    """Ablate each of the top-`n` features at each layer, one at a time, and rank them by held-out KL.

    The top features are those firing most at `token` of `prompt` when one is given, else the
    most frequently firing on held-out text. Reports each feature's density (selectivity) and
    effect (importance), and per layer the Spearman correlation of density with importance.
    """
    run_saes = run if isinstance(run, RunSAEs) else RunSAEs.open(run, model)
    hooks = [run_saes.hook_at(layer) for layer in layers]
    if n < 1:
        raise LayerflowError(f"--batch {n} must be at least 1.")
    if heldout_tokens <= 0:
        raise LayerflowError("Batch mode ranks by held-out effect: give held-out tokens > 0.")
    if isinstance(prompt, str) and not prompt.strip():
        raise LayerflowError("The prompt is empty: give some text, e.g. --prompt 'The capital of France is'.")
    run_saes.load(load)
    stats = run_saes.feature_stats(hooks)
    on_prompt = {}
    if prompt is not None:
        ids = run_saes.tokenize(prompt)
        position = run_saes.token_positions(ids, token, run_saes.token_texts(ids))[0]
        _, cache = run_saes.tl_model.run_with_cache(ids, names_filter=lambda name: name in set(hooks))
        on_prompt = {h: run_saes.encode(h, cache[h][0, position]) for h in hooks}
    rankings = []
    for hook in hooks:
        density = stats[hook].density
        if prompt is not None:
            acts = on_prompt[hook]
            chosen = [f for f in acts.topk(min(n, acts.numel())).indices.tolist() if acts[f] > 0]
        else:
            chosen = [f for f in density.topk(min(n, density.numel())).indices.tolist() if density[f] > 0]
        report = (lambda done, total, hook=hook: progress(hook, done, total)) if progress else None
        effects = heldout_effects(run_saes, hook, [[FeatureEdit(f)] for f in chosen], heldout_tokens, on_batch=report)
        described = run_saes.describe(hook, chosen, stats[hook])
        ranked = [RankedFeature(f, float(density[f]), float(on_prompt[hook][f]) if prompt is not None else None, e,
                                described[f]) for f, e in zip(chosen, effects)]
        ranked.sort(key=lambda r: -r.effect.kl_mean)

        def correlation(values: list[float]) -> float | None:
            pairs = [(r.density, v) for r, v in zip(ranked, values) if math.isfinite(v)]
            if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
                return None
            return float(spearmanr(*zip(*pairs)).statistic)

        rankings.append(LayerRanking(hook, run_saes.layer(hook), ranked,
                                     correlation([r.effect.kl_mean for r in ranked]),
                                     correlation([r.effect.kl_when_active for r in ranked])))
    selection = "top activations at the prompt's token" if prompt is not None else "most frequently firing on held-out text"
    return FeatureRanking(run_saes.name, f"top {n}: {selection}", heldout_tokens, rankings)
