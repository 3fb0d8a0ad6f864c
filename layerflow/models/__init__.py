"""Which model, which activation: the model zoo, loading, and the typed sites of each architecture.

    zoo.py     the models layerflow knows, their shapes and where their weights come from (pure data)
    load.py    load_model: offline GGUF weights, the Hugging Face hub, random-init twins ->
               a TransformerLens HookedTransformer, with no weight processing
    sites.py   Site: one activation at one layer, resolved to a TransformerLens hook for each
               architecture (parallel blocks, post-norms, attention-only, mixtures of experts)

TransformerLens stays inside this package. `import layerflow.models` is light (the zoo and the
sites need neither torch nor TransformerLens); loading is `layerflow.models.load`.
"""

from layerflow.models.sites import KIND_DESCRIPTIONS, Site, SiteKind, parse_hook_name, parse_kind, parse_layers
from layerflow.models.zoo import DEFAULT_MODEL, ZOO, ModelSpec, get_spec

__all__ = ["DEFAULT_MODEL", "KIND_DESCRIPTIONS", "ZOO", "ModelSpec", "Site", "SiteKind", "get_spec", "parse_hook_name",
           "parse_kind", "parse_layers"]
