"""Activations on disk: many layers in one forward pass, streamed to shards, read back in batches.

    writer.py   capture(): one pass per batch fills every site's shard buffers; a thread saves
                full shards; the manifest is written last, and a rerun resumes
    store.py    ActivationStore: a finished capture's manifest, splits, shards and activations
    batches.py  shuffled multi-site training batches (from a store, or from live forwards) and
                the held-out split in order
"""

from layerflow.capture.batches import heldout_batches, mixed_batches, model_chunks, store_chunks
from layerflow.capture.store import SPLITS, ActivationStore, read_tensor
from layerflow.capture.writer import STORE_DTYPES, CaptureConfig, capture, split_sequences, write_safetensors

__all__ = ["STORE_DTYPES", "SPLITS", "ActivationStore", "CaptureConfig", "capture", "heldout_batches", "mixed_batches",
           "model_chunks", "read_tensor", "split_sequences", "store_chunks", "write_safetensors"]
