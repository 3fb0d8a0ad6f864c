"""Transfer: how well a dictionary trained at one site explains another site, of the same model or another.

    calibration.py   how a dictionary meets another site: each site's train-split mean and spread
    within.py        the within-model matrix: one pair loop for SAEs and transcoders (mean-and-spread
                     matched explained variance, persistence baselines, the notes' metrics, feature matching)
    coder.py         a dictionary as affine maps: one encoder matmul for several encodings of a pair
    fused_encode.py  the C kernel that selects those encodings (+ fused_encode.c), torch where absent
    matrix.py        typed results: one pair's metrics (each with its definition) and the matrix on disk
    matching.py      one-to-one feature matching by decoder direction and by activation, with nulls
    references.py    floors and ceilings beside every figure: rotated dictionaries, second-seed SAEs
    summary.py       universality, hubs, strong pairs, distance decay, divergence, bands
    align.py         two models' activations at the same words of the same text
    cross_model.py   model A's dictionaries on model B's sites through an affine stitch; debiased CKA,
                     matched features, paired SVCCA, permutations of whole documents
    runs.py          from run folders to matrices on disk: transfer_run, cross_model_runs
"""

from layerflow.transfer.align import AlignedActivations, align_words, capture_aligned
from layerflow.transfer.calibration import Calibration, SiteMatch
from layerflow.transfer.coder import LinearCoder, SparseLatents, dense_latents
from layerflow.transfer.cross_model import compare_same_depth, cross_model_matrix, same_depth_pairs
from layerflow.transfer.matrix import CrossModelPair, TransferMatrix, WithinModelPair, metric_docs, metric_names
from layerflow.transfer.runs import cross_model_runs, sites_of_store, store_calibration, transfer_run, write_transfer
from layerflow.transfer.summary import BANDS, TransferSummary, band, summarize, summarize_matrix
from layerflow.transfer.within import TransferOptions, transcoder_matrix, within_model_matrix

__all__ = ["AlignedActivations", "BANDS", "Calibration", "CrossModelPair", "LinearCoder", "SparseLatents", "TransferMatrix",
           "TransferOptions", "TransferSummary", "WithinModelPair", "align_words", "band", "capture_aligned",
           "compare_same_depth", "cross_model_matrix", "cross_model_runs", "dense_latents", "metric_docs",
           "metric_names", "same_depth_pairs", "SiteMatch", "sites_of_store", "store_calibration", "summarize", "summarize_matrix", "transcoder_matrix", "transfer_run",
           "within_model_matrix", "write_transfer"]
