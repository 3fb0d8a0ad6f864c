"""The defaults the library and the command line share, each written once (with the choices of the
options whose values come from a fixed list).

The config dataclasses (`CaptureConfig`, `TrainConfig`, `TransferOptions`) and the functions the
commands call take their defaults from here, and so do the command-line options, so
`layerflow <command> --help` shows what the library does. This module imports nothing: the
command line reads it before it loads torch.

The default study (`layerflow run` with no config, `experiment.ExperimentConfig()`) sizes its own
budget to finish in about 15 minutes on two CPU cores; where it departs from these values,
experiment.py says so.
"""

MODEL = "smollm2-135m"  # the embedded model: real weights that install offline
SOURCE = "default"  # the shipped corpus
SEED = 0
DEVICE = "cpu"

# capture
SITE_KINDS = ("resid_post",)
CAPTURE_TOKENS = 20_000  # train + held-out
CONTEXT_SIZE = 128  # tokens per sequence, BOS included
PREPEND_BOS = True
HOLDOUT_FRACTION = 0.1
STORE_DTYPE = "float32"
FORWARD_BATCH = 8  # sequences per forward pass

# training
PRESET = "default"  # train.schedule.PRESETS
EPOCHS = 1.0
BATCH_TOKENS = 4096  # tokens per step, the same for every site
CHECKPOINT_EVERY = 500
# Steps without firing before a latent counts as dead (and AuxK works on it). None: a fifth of the
# run's steps, between 10 and 1000 (train.config.dead_feature_window), so that a 100-step run revives
# latents too; SAELens' fixed 1000 never acts in one.
DEAD_FEATURE_WINDOW: int | None = None
DEAD_WINDOW_FRACTION = 0.2
DEAD_WINDOW_RANGE = (10, 1000)
K_ANNEAL_FRACTION = 0.0  # TopK-family SAEs: k falls from K_ANNEAL_START * k to k over this fraction of the steps
K_ANNEAL_START = 4.0
SAMPLES_EVERY = 0  # 0: no samples
TRANSCODER_TARGET = "mlp_out"

# evaluation
OOD_TOKENS = 4096  # tokens of the shipped out-of-domain text for each dictionary's out-of-domain FVU (0: none)

# transfer
TRANSFER_TOKENS = 8192  # held-out tokens per site
CALIBRATION_TOKENS = 32_768  # train tokens for each site's mean and spread (the cross-site match)
TOP_K = 50  # latents of the notes' variance ratio, Spearman and decoder similarity
MATCH_DISTANCE = 1  # feature matching for sites at most this far apart
REFERENCE_SITES = 3  # sites with a seed twin (the ceiling) and a matching floor; interpolated in depth between them
BOOTSTRAP_REPLICATES = 200  # transfer intervals: resamples of whole held-out sequences
BOOTSTRAP_BLOCK = 128  # tokens per resampling group when the sequences are not known
MIN_BOOTSTRAP_GROUPS = 10  # fewer held-out sequences (documents) than this: no intervals, and no claims
INTERVAL_LEVEL = 0.95
MIN_EFFECT = 0.05  # a hub's excess over the fitted decay, or a break in the adjacent links, must be this large too
MIN_DECODER_COSINE = 0.7  # a decoder match must also reach this cosine, whatever the null says
MIN_ACTIVATION_CORRELATION = 0.5  # and an activation match this correlation
CROSS_MODEL_WORDS = 20_000  # aligned words of text
CROSS_MODEL_DOCUMENTS = 72  # cross-model words from a stream (a dataset) are spread over about this many documents
HELDOUT_EVERY = 3  # cross-model: every 3rd document is held out (the permutation tests shuffle whole documents)
MATCH_PAIRS = ("all", "same_depth", "none")  # cross-model feature matching: every pair, each source's same-depth target, none

# features
TRACE_TOP_K = 5  # features per layer
INTERVENE_HELDOUT_TOKENS = 1024
INTERVENE_TOP_N = 5  # downstream features listed per layer
