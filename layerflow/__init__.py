"""layerflow: how sparse-dictionary features form and transfer across the layers of a language model.

The pipeline, one package per stage, each handing the next a folder with a manifest (files.py):

    models       which model (zoo, load) and which activation (sites.Site), through TransformerLens
    data         which tokens: text sources cut into sequences
    capture      many sites in one forward pass, streamed to shards; read back as batches
    dictionaries SAEs and transcoders: SAELens folders, and what kind each dictionary is
    train        one dictionary per site, all from the same batches
    evaluate     held-out FVU, L0, dead latents, spliced CE and KL
    transfer     site i's dictionary on site j, within a model and across models
    features     what features mean, how they chain through layers, what editing them does
    report       plots, summary.json and report.md
    pipeline     `layerflow run`: every stage from one config, resumable (experiment, results)

`import layerflow` loads nothing heavy; import a stage's package for its API, e.g.
`from layerflow.capture import CaptureConfig, capture`.
"""

__version__ = "0.1.0"
