"""Sites: a typed name for "this activation at this layer of this model", resolved to a TransformerLens hook.

Resolution reads the architecture's traits from the model config (parallel attention/MLP,
attention-only, mixture-of-experts), never a per-model table, so a new model that TransformerLens
supports gets the right hooks for free.

`mlp_in` is the exact tensor the MLP receives. TransformerLens 3 has no hook for it:
`ln2.hook_normalized` fires *before* the norm's affine weight, and `hook_mlp_in` is the
residual before the norm. layerflow adds a `HookPoint` named `blocks.{L}.mlp.hook_in`, fed by a
forward pre-hook on the MLP module, so it works with `run_with_cache`, `run_with_hooks` and
SAELens exactly like a native hook (it is also TransformerLens 4's canonical name for it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from layerflow.errors import LayerflowError, did_you_mean


class SiteKind(str, Enum):
    resid_pre = "resid_pre"
    resid_mid = "resid_mid"
    resid_post = "resid_post"
    attn_out = "attn_out"
    mlp_in = "mlp_in"
    mlp_out = "mlp_out"
    mlp_hidden = "mlp_hidden"


KIND_DESCRIPTIONS: dict[SiteKind, str] = {
    SiteKind.resid_pre: "residual stream entering the block",
    SiteKind.resid_mid: "residual stream after attention, before the MLP",
    SiteKind.resid_post: "residual stream leaving the block (post-MLP residual)",
    SiteKind.attn_out: "attention output added to the residual (after any post-norm)",
    SiteKind.mlp_in: "exact MLP input (after the pre-MLP norm, affine included)",
    SiteKind.mlp_out: "MLP output added to the residual (after any post-norm)",
    SiteKind.mlp_hidden: "MLP hidden activations (input of W_out)",
}

_HOOK_TEMPLATES: dict[SiteKind, str] = {
    SiteKind.resid_pre: "blocks.{L}.hook_resid_pre",
    SiteKind.resid_mid: "blocks.{L}.hook_resid_mid",
    SiteKind.resid_post: "blocks.{L}.hook_resid_post",
    SiteKind.attn_out: "blocks.{L}.hook_attn_out",
    SiteKind.mlp_in: "blocks.{L}.mlp.hook_in",
    SiteKind.mlp_out: "blocks.{L}.hook_mlp_out",
    SiteKind.mlp_hidden: "blocks.{L}.mlp.hook_post",
}


@dataclass(frozen=True, order=True)
class Site:
    """One activation: a layer, a site kind, and the TransformerLens hook that holds it.

    `Site(12, SiteKind.resid_post)` names it. The sites a model resolves (`resolve`), which a
    capture manifest records and every later stage reads back, transfer matrices included, also
    carry the model, its depth and the activation's width. `site_at` builds one from a hook name.
    """

    layer: int
    kind: str  # a SiteKind value; for a hook outside layerflow's kinds, its name inside the block
    model: str = ""  # zoo name; "" when the site is not tied to a model
    n_layers: int = 0  # the model's depth; 0 when unknown
    hook_name: str = ""  # the TransformerLens hook; derived from layer and kind when not given
    d: int = field(default=0, compare=False)  # the activation's width; 0 when unknown

    def __post_init__(self) -> None:
        kind = self.kind.value if isinstance(self.kind, SiteKind) else str(self.kind)
        object.__setattr__(self, "kind", kind)
        if not self.hook_name:
            object.__setattr__(self, "hook_name", _HOOK_TEMPLATES[parse_kind(kind)].format(L=self.layer))

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}"

    def __getitem__(self, key: str) -> Any:
        """A site read from a manifest also answers to the manifest's keys: `site["hook_name"]`."""
        if key not in SITE_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    @property
    def relative_depth(self) -> float:
        """Layer position in [0, 1]: 0 = first block, 1 = last; compares models of different depth."""
        return self.layer / max(self.n_layers - 1, 1)

    @property
    def label(self) -> str:
        return f"{self.model}:{self.hook_name}"

    def to_dict(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The fields `keys`, in that order: each file that lists sites writes the ones it needs."""
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **known: Any) -> "Site":
        """A site from a file's record; `known` fills the fields the record leaves to its context."""
        return cls(**{key: value for key, value in {**known, **data}.items() if key in SITE_FIELDS})

    @classmethod
    def parse(cls, text: str) -> "Site":
        """'L12.resid_post' -> Site(12, resid_post)."""
        layer, _, kind = text.partition(".")
        if not layer.startswith("L") or not layer[1:].isdigit():
            raise LayerflowError(f"Bad site '{text}': expected L<layer>.<kind>, e.g. L12.resid_post.")
        return cls(int(layer[1:]), parse_kind(kind))


SITE_FIELDS = ("layer", "kind", "model", "n_layers", "hook_name", "d")


def site_at(model: str, hook_name: str, layer: int | None = None, n_layers: int = 0, kind: str | None = None,
            d: int = 0) -> Site:
    """The Site of `hook_name` in `model`: its layer and kind read from the hook name unless given
    ('blocks.7.hook_resid_post' -> layer 7, resid_post; 'blocks.7.attn.hook_z' -> kind 'attn.hook_z')."""
    if layer is None or kind is None:
        parsed_layer, parsed_kind = parse_hook_name(hook_name)
        layer = parsed_layer if layer is None else layer
        kind = kind or (parsed_kind.value if parsed_kind else hook_name.split(".", 2)[2])
    return Site(layer, kind, model, n_layers, hook_name, d)


def parse_hook_name(hook_name: str) -> tuple[int, SiteKind | None]:
    """'blocks.7.hook_resid_post' -> (7, SiteKind.resid_post); the kind is None for a block hook
    that is not one of layerflow's site kinds."""
    match = re.match(r"^blocks\.(\d+)\.", hook_name)
    if match is None:
        raise LayerflowError(f"Hook '{hook_name}' is not inside a block (expected 'blocks.<layer>.<hook>').")
    layer = int(match.group(1))
    return layer, next((k for k in SiteKind if _HOOK_TEMPLATES[k].format(L=layer) == hook_name), None)


def parse_kind(text: str) -> SiteKind:
    try:
        return SiteKind(text)
    except ValueError:
        raise LayerflowError(f"Unknown site kind '{text}'. {did_you_mean(text, [k.value for k in SiteKind])}") from None


def unavailable_reason(cfg: Any, kind: SiteKind) -> str | None:
    """Why `kind` does not exist in this architecture, or None if it does."""
    name = getattr(cfg, "model_name", "this model")
    has_mlp = not cfg.attn_only
    if kind in (SiteKind.mlp_in, SiteKind.mlp_out, SiteKind.mlp_hidden, SiteKind.resid_mid) and not has_mlp:
        return f"{name} is attention-only: it has no MLP. Use resid_pre, attn_out or resid_post."
    if kind == SiteKind.resid_mid and cfg.parallel_attn_mlp:
        return (
            f"{name} runs attention and MLP in parallel (both read resid_pre), so there is no resid_mid. "
            "Use resid_pre (what both read), mlp_in (the MLP's normalized input) or resid_post."
        )
    if kind == SiteKind.mlp_hidden and getattr(cfg, "num_experts", None):
        return f"{name} is a mixture of experts: there is no single MLP hidden layer. Use mlp_in or mlp_out."
    return None


def available_kinds(cfg: Any) -> list[SiteKind]:
    return [k for k in SiteKind if unavailable_reason(cfg, k) is None]


def parse_layers(spec: str, n_layers: int, model_name: str = "the model") -> list[int]:
    """'all', a slice 'start:stop[:step]' (stop exclusive), or a list '3,7,11'. Negatives count from the end."""
    valid = f"{model_name} has {n_layers} layers: valid layers are 0..{n_layers - 1}"
    spec = spec.strip()
    try:
        if spec == "all":
            layers = list(range(n_layers))
        elif ":" in spec:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            for p in parts[:2]:
                if p is not None and not -n_layers <= p <= n_layers:
                    raise LayerflowError(f"Layer range '{spec}' is out of range: {valid}.")
            layers = list(range(n_layers))[slice(*parts)]
        else:
            layers = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise LayerflowError(f"Bad layer spec '{spec}': use 'all', a slice like '0:30:2', or a list like '3,7,11'.") from None
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise LayerflowError(f"Layer {layer} is out of range: {valid}.")
    layers = sorted({layer % n_layers for layer in layers})
    if not layers:
        raise LayerflowError(f"Layer spec '{spec}' selects no layers: {valid}.")
    return layers


def resolve(model: Any, layers: list[int], kinds: list[SiteKind]) -> list[Site]:
    """Check that every (layer, kind) exists in `model` and return its sites, layer-major, each
    with the model's name and depth and the activation's width."""
    cfg = model.cfg
    for kind in kinds:
        if reason := unavailable_reason(cfg, kind):
            raise LayerflowError(f"Site kind '{kind.value}' is impossible here: {reason}")
    for layer in layers:
        if not 0 <= layer < cfg.n_layers:
            raise LayerflowError(f"Layer {layer} is out of range: valid layers are 0..{cfg.n_layers - 1}.")
    return [Site(layer, kind, cfg.model_name, cfg.n_layers, d=site_width(cfg, kind)) for layer in layers for kind in kinds]


def site_width(cfg: Any, kind: SiteKind | str) -> int:
    """The width of a site kind's activation: d_mlp inside the MLP, d_model elsewhere."""
    return cfg.d_mlp if kind == SiteKind.mlp_hidden else cfg.d_model


# Hooks TransformerLens only calls when a config flag is on (otherwise they exist but never fire).
_SILENT_HOOKS = {
    "hook_mlp_in": "set_use_hook_mlp_in",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "attn.hook_result": "set_use_attn_result",
    "hook_tokens": "set_use_hook_tokens",
}


def prepare_hooks(model: Any, hook_names: list[str]) -> None:
    """Make every named hook exist and fire: add `mlp.hook_in` points, switch on silent hooks."""
    if any(name.endswith("mlp.hook_in") for name in hook_names):
        install_mlp_input_hooks(model)
    for name in hook_names:
        for suffix, setter in _SILENT_HOOKS.items():
            if name.endswith(suffix):
                getattr(model, setter)(True)
    missing = [n for n in hook_names if n not in model.hook_dict]
    if missing:
        raise LayerflowError(f"Hook(s) {', '.join(missing)} do not exist in this model.")


def install_mlp_input_hooks(model: Any) -> None:
    """Add `blocks.{L}.mlp.hook_in`: a HookPoint called on the exact input of every MLP."""
    from transformer_lens.hook_points import HookPoint

    if "blocks.0.mlp.hook_in" in model.hook_dict:
        return
    for block in model.blocks:
        block.mlp.hook_in = HookPoint()
        block.mlp.register_forward_pre_hook(_call_hook_in)
    model.setup()  # re-register hook names so the new points behave like native ones


def _call_hook_in(mlp: Any, args: tuple) -> tuple:
    return (mlp.hook_in(args[0]), *args[1:])
