"""SAEs on disk in SAELens' own format: a folder that `sae_lens.SAE.load_from_disk` loads.

    <folder>/cfg.json                  SAELens inference config, `metadata` filled in
    <folder>/sae_weights.safetensors   weights with the activation scale folded in
    <folder>/sparsity.safetensors      log10 firing frequency per latent ("sparsity")

Folders are written to a temporary name and renamed, so a crash never leaves half an SAE.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME

# kinds imports dictionaries.transcoders, which registers layerflow's transcoders with SAELens: load_from_disk finds them
from layerflow.dictionaries.kinds import input_hook, is_training_transcoder
from layerflow.errors import LayerflowError
from layerflow.files import SAE_DIR, CaptureManifest, atomic


def sae_metadata(manifest: CaptureManifest, hook_name: str, exclude_special_tokens: bool = True) -> dict[str, Any]:
    """What SAELens (and a reader) needs to use an SAE trained on a layerflow capture."""
    model = manifest.model
    return {
        "hook_name": hook_name,
        "model_name": model["official_name"],
        "context_size": manifest.context_size,
        "prepend_bos": manifest.prepend_bos,
        "model_from_pretrained_kwargs": model["from_pretrained_kwargs"],
        "exclude_special_tokens": manifest.special_token_ids if exclude_special_tokens else False,
        "layerflow_model": model["name"],
        "layerflow_weights_source": model["weights_source"],
    }


def save_sae(
    sae: Any,
    folder: str | Path,
    metadata: dict[str, Any],
    log_feature_sparsity: torch.Tensor,
    scaling_factor: float | None = None,
    target_scaling_factor: float | None = None,
) -> Path:
    """Save a SAELens TrainingSAE (or a `layerflow.dictionaries.transcoders` training transcoder) for inference,
    folding the activation scale into its weights.

    `scaling_factor` is what the trainer multiplied activations by (e.g. SAELens'
    `expected_average_only_in`); after folding, the saved SAE reads raw activations. A transcoder's
    target had its own factor, `target_scaling_factor`; the saved one predicts raw targets.
    The SAE passed in is left untouched, so training can go on after a checkpoint.
    """
    folder = Path(folder)
    transcoder = is_training_transcoder(sae)
    if transcoder:  # a transcoder: both scales fold into a SAELens inference class
        sae = sae.to_inference(scaling_factor or 1.0, target_scaling_factor or 1.0)
    else:
        sae = copy.deepcopy(sae)
        if scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(scaling_factor)
    for key, value in metadata.items():
        setattr(sae.cfg.metadata, key, value)
    with atomic(folder) as tmp:
        sae.save_model(tmp) if transcoder else sae.save_inference_model(tmp)
        save_file({"sparsity": log_feature_sparsity.detach().float().cpu().contiguous()}, tmp / SPARSITY_FILENAME)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """A saved dictionary's cfg.json (SAELens' inference config and metadata), without its weights."""
    return json.loads((Path(folder) / SAE_CFG_FILENAME).read_text())


def weights_file(folder: str | Path) -> Path:
    return Path(folder) / SAE_WEIGHTS_FILENAME


def sae_folders(path: str | Path) -> list[Path]:
    """The SAELens folders (holding a cfg.json) under `path`, sorted; none when it is not a folder."""
    path = Path(path)
    return sorted(p.parent for p in path.rglob(SAE_CFG_FILENAME)) if path.is_dir() else []


def find_sae_folders(path: str | Path) -> list[Path]:
    """SAELens SAE folders (holding cfg.json) of a training run (its saes/) or under any folder."""
    path = Path(path)
    folders = sae_folders(path / SAE_DIR if (path / SAE_DIR).is_dir() else path)
    if not folders:
        raise LayerflowError(f"No SAE folders (with cfg.json) under '{path}'. Pass a training run directory "
                             "or a folder of SAELens SAEs.")
    return folders


def load_saes(path: str | Path, hooks: list[str] | None = None) -> dict[str, Any]:
    """{hook_name: SAE} for every SAE folder under `path` (or just `hooks`, in that order), loaded
    with `sae_lens.SAE.load_from_disk`."""
    saes = {}
    for folder in find_sae_folders(path):
        with warnings.catch_warnings():  # advice to load the model with these kwargs: layerflow already does
            warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
            sae = SAE.load_from_disk(folder)
        hook = input_hook(sae, folder.name)
        if hook in saes:
            raise LayerflowError(f"Two SAE folders under '{path}' are for the same hook '{hook}': keep one.")
        saes[hook] = sae
    if hooks is None:
        return saes
    missing = [h for h in hooks if h not in saes]
    if missing:
        raise LayerflowError(f"No SAE for {', '.join(missing)} under '{path}'. SAEs: {', '.join(saes)}.")
    return {h: saes[h] for h in hooks}
