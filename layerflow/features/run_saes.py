"""One model of a `layerflow run` with its SAEs: what `trace` and `intervene` start from.

`RunSAEs.open(run, model)` checks what can be checked from the files alone (the model is in the
run, its SAE folders are for this model, layers and feature ids are valid) before anything
heavy is loaded, so bad input fails in a second; `.load()` then loads the model, the SAEs and
the capture store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Int

from layerflow.capture.store import ActivationStore
from layerflow.dictionaries.io import load_saes, read_config, sae_folders
from layerflow.dictionaries.kinds import encode, output_hook
from layerflow.dictionaries.top_activations import token_text
from layerflow.errors import LayerflowError, did_you_mean
from layerflow.features.describe import FeatureDescription, FeatureStats, describe, feature_stats, promoted_tokens
from layerflow.files import ACTIVATIONS_DIR, SAE_DIR
from layerflow.models.load import LoadedModel, load_model
from layerflow.models.sites import parse_hook_name, prepare_hooks
from layerflow.results import ModelResults, RunResults

Loader = Callable[[str], LoadedModel]  # zoo name -> the loaded model


def open_run(run: str | Path | RunResults) -> RunResults:
    return run if isinstance(run, RunResults) else RunResults.load(run)


def model_names(results: RunResults, wanted: list[str] | None) -> list[str]:
    """The run's models (in config order), or the `wanted` ones, each checked to be in the run."""
    have = list(results.models)
    if not have:
        raise LayerflowError(f"The run at '{results.root}' has no captured model yet: run `layerflow run` first.")
    for name in wanted or []:
        if name not in results.models:
            raise LayerflowError(f"The run at '{results.root}' is of {', '.join(have)}, not '{name}'. "
                                 f"{did_you_mean(name, have)}")
    return list(wanted) if wanted else have


@dataclass
class RunSAEs:
    results: RunResults
    model: ModelResults
    folders: dict[str, Path]  # hook (where the SAE's latents are read) -> SAE folder, in layer order
    configs: dict[str, dict]  # hook -> cfg.json
    loaded: LoadedModel | None = None  # after load()
    saes: dict[str, Any] = field(default_factory=dict)  # hook -> SAELens SAE, after load()
    store: ActivationStore | None = None  # the run's capture, after load()
    heldout_token_ids: torch.Tensor | None = None  # [seqs, ctx], after load() (feature contexts point into them)

    @classmethod
    def open(cls, run: str | Path | RunResults, model: str | None = None) -> "RunSAEs":
        results = open_run(run)
        names = model_names(results, [model] if model else None)
        if model is None and len(names) > 1:
            raise LayerflowError(f"The run at '{results.root}' holds several models ({', '.join(names)}): "
                                 "choose one with --model.")
        name = names[0]
        folder = results.root / SAE_DIR / name
        configs, folders = {}, {}
        for sae_folder in sae_folders(folder):
            cfg = read_config(sae_folder)
            meta = cfg.get("metadata", {})
            trained_on = meta.get("layerflow_model")
            if trained_on is not None and trained_on != name:
                raise LayerflowError(f"The SAE in '{sae_folder}' was trained on '{trained_on}', but it sits in the "
                                     f"run's folder for '{name}'. Use the run directory that model '{trained_on}' belongs to.")
            hook = meta.get("hook_name") or sae_folder.name
            configs[hook], folders[hook] = cfg, sae_folder
        if not folders:
            raise LayerflowError(f"The run at '{results.root}' has no SAEs for '{name}' yet: run its train stage.")
        order = {h: i for i, h in enumerate(results.models[name].hooks)}
        hooks = sorted(folders, key=lambda h: order.get(h, len(order)))
        return cls(results, results.models[name], {h: folders[h] for h in hooks}, {h: configs[h] for h in hooks})

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def hooks(self) -> list[str]:
        return list(self.folders)

    def layer(self, hook: str) -> int:
        return parse_hook_name(hook)[0]

    def d_sae(self, hook: str) -> int:
        return int(self.configs[hook]["d_sae"])

    def output_hook(self, hook: str) -> str:
        """Where decoding writes: the output site of a transcoder, the same site for an SAE (after `load`)."""
        return output_hook(self.saes[hook], hook)

    def hook_at(self, layer: int | str) -> str:
        """The SAE hook at a layer (an int, or a hook name); a clear error when the run has none there."""
        if isinstance(layer, str) and not layer.lstrip("-").isdigit():
            if layer not in self.folders:
                raise LayerflowError(f"No SAE for '{layer}' in the run at '{self.results.root}' ({self.name}). "
                                     f"{did_you_mean(layer, self.hooks)}")
            return layer
        layer = int(layer)
        n_layers = self.model.n_layers
        if not -n_layers <= layer < n_layers:
            raise LayerflowError(f"Layer {layer} is out of range: {self.name} has {n_layers} layers (0..{n_layers - 1}).")
        layer %= n_layers
        at = [h for h in self.hooks if self.layer(h) == layer]
        if not at:
            with_saes = ", ".join(str(self.layer(h)) for h in self.hooks)
            raise LayerflowError(f"Layer {layer} has no SAE in the run at '{self.results.root}' ({self.name}). "
                                 f"Layers with SAEs: {with_saes}.")
        if len(at) > 1:
            raise LayerflowError(f"Layer {layer} has several SAEs ({', '.join(at)}): name the hook instead of the layer.")
        return at[0]

    def check_feature(self, hook: str, feature: int) -> int:
        d_sae = self.d_sae(hook)
        if not 0 <= feature < d_sae:
            raise LayerflowError(f"Feature {feature} is out of range for {hook}: valid ids are 0..{d_sae - 1}.")
        return feature

    def load(self, load: Loader | None = None) -> "RunSAEs":
        if self.loaded is None:
            self.loaded = (load or load_model)(self.name)
            if self.loaded.name != self.name:
                raise LayerflowError(f"The run at '{self.results.root}' is of '{self.name}', "
                                     f"but the model loaded is '{self.loaded.name}'.")
            self.saes = load_saes(self.results.root / SAE_DIR / self.name, self.hooks)
            for sae in self.saes.values():
                sae.eval()
            prepare_hooks(self.loaded.model, sorted({h for h in self.hooks} | {self.output_hook(h) for h in self.hooks}))
            self.store = ActivationStore(self.results.root / ACTIVATIONS_DIR / self.name)
            self.heldout_token_ids = self.store.tokens("heldout")
        return self

    @property
    def tl_model(self) -> Any:
        return self.loaded.model

    @property
    def special_ids(self) -> list[int]:
        return list(self.model.capture.special_token_ids)

    def tokenize(self, prompt: str | list[int] | torch.Tensor) -> Int[torch.Tensor, "1 pos"]:
        """The prompt as [1, pos] token ids (BOS prepended as in the capture); token ids are used as given."""
        model = self.tl_model
        if isinstance(prompt, str):
            if not prompt.strip():
                raise LayerflowError("The prompt is empty: give some text, e.g. --prompt 'The capital of France is'.")
            if model.tokenizer is None:
                raise LayerflowError(f"{self.name} has no tokenizer: pass the prompt as token ids.")
            tokens = model.to_tokens(prompt, prepend_bos=self.model.capture.prepend_bos, truncate=False)
        else:
            tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
            if tokens.numel() == 0:
                raise LayerflowError("The prompt is empty: give at least one token.")
        n_ctx = model.cfg.n_ctx
        if tokens.shape[1] > n_ctx:
            raise LayerflowError(f"The prompt is {tokens.shape[1]} tokens long, longer than {self.name}'s context of "
                                 f"{n_ctx} tokens: shorten it.")
        return tokens.to(model.cfg.device)

    def token_positions(self, tokens: Int[torch.Tensor, "1 pos"], token: int | str, texts: list[str]) -> list[int]:
        """The positions a trace or an intervention reads: `token` (negative from the end), or "all"
        non-special ones; `texts` are the tokens as text, for the messages."""
        n = tokens.shape[1]
        special = torch.isin(tokens[0].cpu(), torch.tensor(self.special_ids, dtype=torch.long)).tolist()
        if token == "all":
            positions = [p for p in range(n) if not special[p]]
            if not positions:
                raise LayerflowError("The prompt holds only special tokens: nothing to trace.")
            return positions
        if not -n <= token < n:
            raise LayerflowError(f"Token position {token} is out of range: the prompt has {n} tokens (0..{n - 1}, or -{n}..-1).")
        position = token % n
        if special[position]:
            raise LayerflowError(f"Token {position} is the special token {texts[position]!r}; the SAEs were trained without "
                                 "special tokens. Choose another position.")
        return [position]

    def token_texts(self, tokens: Int[torch.Tensor, "1 pos"]) -> list[str]:
        return [token_text(self.tl_model.tokenizer, t) for t in tokens[0].tolist()]

    def feature_stats(self, hooks: list[str] | None = None) -> dict[str, FeatureStats]:
        hooks = hooks or self.hooks
        return feature_stats(self.results.root, self.name, {h: self.saes[h] for h in hooks}, self.store,
                             sae_folders={h: self.folders[h] for h in hooks})

    def describe(self, hook: str, features: list[int], stats: FeatureStats) -> dict[int, FeatureDescription]:
        promoted = promoted_tokens(self.saes[hook], self.tl_model, features)
        return describe(stats, features, self.heldout_token_ids, self.tl_model.tokenizer, promoted)

    @torch.no_grad()
    def encode(self, hook: str, acts: torch.Tensor) -> torch.Tensor:
        return encode(self.saes[hook], acts).float()
