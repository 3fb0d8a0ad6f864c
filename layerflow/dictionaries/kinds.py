"""What kind of dictionary is this: the one answer every stage asks.

An SAE reconstructs the site it reads. A transcoder reads one site and predicts another, named by
`cfg.metadata.hook_name_out` (an MLP's input -> its output, say), and a skip transcoder adds a
linear term x_in W_skip^T to its prediction. Evaluation, transfer, tracing and interventions all
ask this module where a dictionary reads, where its output belongs, what its latents are and what
it predicts, so they cannot disagree.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, Transcoder

from layerflow.dictionaries.transcoders import TrainingTranscoder
from layerflow.errors import LayerflowError

SAE_ARCHITECTURES = ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
# dictionaries.transcoders registers these with SAELens; "transcoder" is ReLU + L1
TRANSCODER_ARCHITECTURES = ["transcoder", "topk_transcoder", "batchtopk_transcoder", "matryoshka_batchtopk_transcoder"]
ARCHITECTURES = SAE_ARCHITECTURES + TRANSCODER_ARCHITECTURES


def is_transcoder(dictionary: SAE | str) -> bool:
    """A transcoder: SAELens' Transcoder family (layerflow's TopK ones included), any SAE whose
    metadata names an output hook, or the name of a transcoder training architecture."""
    if isinstance(dictionary, str):
        return dictionary in TRANSCODER_ARCHITECTURES
    return isinstance(dictionary, (Transcoder, TrainingTranscoder)) or bool(dictionary.cfg.metadata.hook_name_out)


def is_training_transcoder(dictionary: Any) -> bool:
    """A transcoder still in training form (`dictionaries.transcoders`): saved through `to_inference`."""
    return isinstance(dictionary, TrainingTranscoder)


def input_hook(dictionary: SAE, default: str | None = None) -> str:
    """The hook the dictionary reads (`cfg.metadata.hook_name`, else `default`)."""
    hook = dictionary.cfg.metadata.hook_name or default
    if not hook:
        raise LayerflowError("The dictionary has no cfg.metadata.hook_name: cannot tell which site it reads.")
    return hook


def output_hook(dictionary: SAE, default: str | None = None) -> str:
    """Where the dictionary's output is compared and written: a transcoder's `hook_name_out`, else
    the site it reads (`input_hook(dictionary, default)`)."""
    if not is_transcoder(dictionary):
        return input_hook(dictionary, default)
    hook = dictionary.cfg.metadata.hook_name_out
    if not hook:
        raise LayerflowError(f"The transcoder for '{dictionary.cfg.metadata.hook_name or default}' has no "
                             "cfg.metadata.hook_name_out: cannot tell which site it predicts. Set it in its cfg.json "
                             "metadata.")
    return hook


def encode(dictionary: Any, x: Float[torch.Tensor, "tokens d_in"]) -> Float[torch.Tensor, "tokens d_sae"]:
    """The dense latents of `x`, on the dictionary's device and in its dtype."""
    latents = dictionary.encode(x.to(dictionary.device, dictionary.dtype))
    return latents.to_dense() if latents.is_sparse else latents


def predict(dictionary: Any, x_in: Float[torch.Tensor, "tokens d_in"],
            latents: Float[torch.Tensor, "tokens d_sae"] | None = None) -> Float[torch.Tensor, "tokens d_out"]:
    """What `dictionary(x_in)` returns: decode(latents), plus a skip transcoder's x_in W_skip^T.
    `latents` default to `encode(dictionary, x_in)`."""
    latents = encode(dictionary, x_in) if latents is None else latents
    out = dictionary.decode(latents)
    if getattr(dictionary, "W_skip", None) is not None:
        out = out + x_in.to(dictionary.dtype) @ dictionary.W_skip.T
    return out


def training_architecture(config: dict[str, Any]) -> str:
    """The architecture a saved dictionary was trained as, from its cfg.json (a BatchTopK SAE, for one,
    is saved as a JumpReLU SAE and keeps "batchtopk" in its metadata)."""
    return config.get("metadata", {}).get("training_architecture") or config["architecture"]


def matryoshka_widths(dictionary: SAE) -> list[int] | None:
    """Nested prefix widths of a Matryoshka SAE or transcoder, from its saved training details."""
    details = getattr(dictionary.cfg.metadata, "training_architecture_details", None) or {}
    widths = details.get("matryoshka_widths")
    return list(widths) if widths else None
