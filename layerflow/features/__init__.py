"""Features of a finished run: what they mean, how they chain through the layers, what editing them does.

    run_saes.py   RunSAEs: one model of a `layerflow run` with its SAEs, checked before anything heavy loads
    describe.py   each feature's top held-out contexts, firing density and promoted tokens, cached in the run
    trace.py      the reasoning tracker: a prompt's top features per layer, chained by matched features
    intervene.py  ablate, scale, clamp or steer features (the SAE's error term kept) and measure downstream
"""

from layerflow.features.describe import FeatureDescription, FeatureStats, feature_stats
from layerflow.features.intervene import FeatureEdit, InterventionResult, intervene, rank_features
from layerflow.features.run_saes import RunSAEs
from layerflow.features.trace import Trace, trace

__all__ = ["FeatureDescription", "FeatureEdit", "FeatureStats", "InterventionResult", "RunSAEs", "Trace",
           "feature_stats", "intervene", "rank_features", "trace"]
