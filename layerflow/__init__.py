"""layerflow: how sparse-dictionary features form and transfer across the layers of a language model.

Pipeline modules, in order: zoo/models (which model, which weights) -> sites (which activation)
-> data (which tokens) -> capture (one pass, sharded store) -> store (reading it back).
"""

__version__ = "0.1.0"
