"""Held-out evaluation: how well each dictionary explains its own site, and what splicing it in costs the model.

    evals.py    FVU (per Matryoshka prefix too), L0, dead/dense latents, l2 ratio, shrinkage, streamed
                over the held-out split; evals.json/csv; evaluate_run for a training run's folder
    splice.py   the patched passes: a dictionary's output in place of an activation, CE, KL and the
                CE loss score, one clean pass per batch shared by every site (SAELens' run_evals)
    gates.py    quality gates: whether the dictionaries are good enough for the conclusions drawn from them

Every metric is defined once, in `layerflow.metrics`.
"""

from layerflow.evaluate.evals import SiteEval, evaluate_run, evaluate_saes, read_eval_results, write_eval_results
from layerflow.evaluate.gates import GATES, QualityVerdict, quality_verdict
from layerflow.evaluate.splice import (CleanBatch, clean_batches, next_token_nll, patched_logp, splice_start,
                                       spliced_metrics)

__all__ = ["CleanBatch", "GATES", "QualityVerdict", "SiteEval", "clean_batches", "evaluate_run", "evaluate_saes", "next_token_nll", "patched_logp",
           "quality_verdict", "read_eval_results", "splice_start", "spliced_metrics", "write_eval_results"]
