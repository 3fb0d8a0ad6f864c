"""Transcoders: trained here (SAELens loads them but cannot train them), saved as SAELens loads them.

A transcoder predicts the activation at one site, x_out [d_out] (e.g. `hook_mlp_out`), from the
activation at another, x_in [d_in] (e.g. the MLP's input); d_out may differ from d_in:

    a = act(x_in W_enc + b_enc)                 latents [d_sae]; no b_dec is subtracted from x_in
    y = a W_dec + b_dec  (+ x_in W_skip^T)      the prediction; W_skip [d_out, d_in] (SAELens'
                                                layout) only with `skip=True`, initialised to zero

Training architectures (`cfg.architecture()`, registered with `sae_lens.register_sae_training_class`)
and what `to_inference()` / `save_inference_model(folder)` turn them into (what
`sae_lens.SAE.load_from_disk(folder)` then returns; `skip=True` gives the second of each pair):

    transcoder                       ReLU + L1    transcoder, skip_transcoder                  SAELens' classes
    topk_transcoder                  TopK + AuxK  topk_transcoder, topk_skip_transcoder        defined here
    batchtopk_transcoder             BatchTopK    jumprelu_transcoder, jumprelu_skip_transcoder  SAELens'
    matryoshka_batchtopk_transcoder  BatchTopK    jumprelu_transcoder, jumprelu_skip_transcoder  SAELens'

The maths follows SAELens' SAE of the same activation: MSE = E||x_out - y||^2 (summed over d_out,
averaged over tokens); ReLU adds `l1_coefficient * E sum_i a_i ||W_dec[i]||`; TopK-family latents
are chosen on pre-activations times decoder-row norms (`rescale_acts_by_decoder_norm`, default on),
so no decoder norm constraint is needed (none is applied, as in SAELens), and they add SAELens'
AuxK loss (the top d_out // 2 latents dead for more than `dead_feature_window` steps predict the
detached residual; SAELens takes d_in // 2 for an SAE, where d_in = d_out). `k_anneal_steps`
(dictionary_learning's option) starts k at min(d_in, d_sae) and lowers it linearly to k, so every
latent gets gradient early on. BatchTopK keeps the top k * batch pre-activations of the whole batch while
training and learns a threshold by SAELens' EMA of the smallest kept activation
(theta <- (1 - topk_threshold_lr) theta + topk_threshold_lr min a); in eval mode, and once saved, it
is a JumpReLU with that threshold, as SAELens saves BatchTopK SAEs.

Matryoshka: `matryoshka_widths` w_1 < ... < w_G = d_sae (cumulative, as SAELens) are nested
prefixes of the dictionary; prefix g predicts y_g = b_dec (+ skip) + a[:w_g] W_dec[:w_g] and must
predict x_out on its own. With L_g = E||x_out - y_g||^2 (L_G is the whole dictionary's MSE):

    loss_weighting="saelens"             L_G + sum_{g<G} L_g              (= sum_g L_g; SAELens'
                                         MatryoshkaBatchTopKTrainingSAE: base loss + each inner MSE)
    loss_weighting="dictionary_learning" (1/G) sum_g w_g L_g, w_g = `group_weights`, default 1/G
                                         (dictionary_learning's MatryoshkaBatchTopKTrainer:
                                         `l2_losses.mean()` of the weighted losses)

So "saelens" weighs every prefix 1 and grows with G; "dictionary_learning" with default weights is
(1/G^2) sum_g L_g: the same direction, G^2 times smaller. Adam is (nearly) blind to a loss's scale,
so the difference shows against the AuxK term and the gradient clipping of `train_step`. Custom
`group_weights` can favour coarse or fine prefixes. `use_matryoshka_aux_loss` (SAELens' option)
makes the dead latents of each group predict the residual of their own prefix.

Training: `train_step(model, optimizer, x_in, x_out)` (Adam from `make_optimizer`, gradient norm
clipped at 1 as SAELens' trainer does) calls `model(x_in, x_out)`, which returns a
`TranscoderOutput` (prediction, latents, loss and its terms). SAELens' own `SAETrainer` cannot
train these classes: its step has no x_out.

Saved folders. `cfg.metadata` carries `hook_name` (the input site) and `hook_name_out` (the output
site): SAELens keeps `hook_name_out` in the metadata, not as a config field (its loaders put it
there and `HookedSAETransformer` reads `sae.cfg.metadata.hook_name_out`). `d_out` is a config
field. Training-only settings (k of BatchTopK, widths, loss weighting, ...) go to
`metadata.training_architecture_details`, as SAELens does. `to_inference(scale_in, scale_out)` folds
the factors the training activations were multiplied by, and the decoder-row norms (TopK family),
into the weights, so the saved transcoder reads raw x_in and predicts raw x_out; decoder rows are
then unit norm (TopK family) and latents are in x_out units.

Registration happens on `import layerflow.dictionaries.transcoders` (idempotent; a name SAELens or someone
else already uses for another class is an error). `import layerflow` does not import this module,
so load a `topk_transcoder` folder with `import layerflow.dictionaries.transcoders` first; the JumpReLU and
ReLU folders load with SAELens alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, get_sae_class
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopK, calculate_topk_aux_acts
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from torch import Tensor, nn

from layerflow.metrics import reconstruction_metrics

# ----------------------------------------------------------------------------- inference classes


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    k: int = 100

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


@dataclass
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder"


class TopKTranscoder(Transcoder):
    """SAELens `Transcoder` whose latents are the top k pre-activations (then ReLU) per token."""

    cfg: TopKTranscoderConfig

    def get_activation_fn(self):
        return TopK(self.cfg.k)

    def fold_W_dec_norm(self) -> None:
        # Scaling latents by different factors changes which k are largest; saved rows are unit norm.
        if not torch.allclose(self.get_W_dec_norm(), torch.ones((), device=self.W_dec.device), atol=1e-4):
            raise NotImplementedError("Folding decoder norms would change a TopK transcoder's top-k choice.")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "TopKTranscoder":
        return cls(get_sae_class(config_dict["architecture"])[1].from_dict(config_dict))


class TopKSkipTranscoder(TopKTranscoder, SkipTranscoder):
    """TopK transcoder with SAELens' skip connection: y = decode(encode(x)) + x W_skip^T."""

    cfg: TopKSkipTranscoderConfig


# ----------------------------------------------------------------------------- training configs


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(kw_only=True)
class TrainingTranscoderConfig(TrainingSAEConfig):
    """Fields every training transcoder has (SAELens' SAEConfig fields: d_in, d_sae, dtype, ...)."""

    d_out: int
    skip: bool = False  # learn W_skip [d_out, d_in] too (initialised to zero)
    apply_b_dec_to_input: bool = False  # SAELens forbids it for transcoders (b_dec lives in d_out)
    inference_configs: ClassVar[tuple[type[SAEConfig], type[SAEConfig]]]  # (plain, skip)

    def __post_init__(self):
        _check(self.d_in > 0 and self.d_sae > 0 and self.d_out > 0,
               f"d_in, d_sae and d_out must be positive, got {self.d_in}, {self.d_sae}, {self.d_out}.")
        _check(not self.apply_b_dec_to_input, "apply_b_dec_to_input must be False for a transcoder: SAELens "
               "forbids it (b_dec has d_out entries, x_in has d_in).")
        _check(self.normalize_activations == "none", "normalize_activations must be 'none' for a transcoder: "
               "scale x_in and x_out yourself and pass the factors to to_inference(scale_in, scale_out).")
        _check(self.reshape_activations == "none", "reshape_activations must be 'none' for a transcoder.")
        super().__post_init__()

    def get_inference_config_class(self) -> type[SAEConfig]:
        return self.inference_configs[self.skip]


@dataclass(kw_only=True)
class ReLUTrainingTranscoderConfig(TrainingTranscoderConfig):
    """ReLU latents, L1 penalty weighted by decoder-row norms (SAELens' "standard" SAE)."""

    l1_coefficient: float = 1.0
    inference_configs: ClassVar = (TranscoderConfig, SkipTranscoderConfig)

    @classmethod
    def architecture(cls) -> str:
        return "transcoder"


@dataclass(kw_only=True)
class TopKTrainingTranscoderConfig(TrainingTranscoderConfig):
    k: int = 32  # latents per token
    aux_loss_coefficient: float = 1.0  # SAELens' AuxK weight (0 turns it off)
    dead_feature_window: int = 1000  # training steps without firing before a latent counts as dead
    rescale_acts_by_decoder_norm: bool = True  # choose and scale latents as if decoder rows were unit norm
    # dictionary_learning's k annealing: k falls linearly from min(d_in, d_sae) to k over this many
    # training steps, so early on every latent gets gradient and can find its feature; 0: off
    k_anneal_steps: int = 0
    inference_configs: ClassVar = (TopKTranscoderConfig, TopKSkipTranscoderConfig)

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"

    def __post_init__(self):
        _check(0 < self.k <= self.d_sae, f"k must be in (0, d_sae={self.d_sae}], got {self.k}.")
        _check(self.k_anneal_steps >= 0, f"k_anneal_steps must be >= 0, got {self.k_anneal_steps}.")
        super().__post_init__()


@dataclass(kw_only=True)
class BatchTopKTrainingTranscoderConfig(TopKTrainingTranscoderConfig):
    k: float = 32  # mean latents per token over the batch
    topk_threshold_lr: float = 0.01  # EMA rate of the JumpReLU threshold
    inference_configs: ClassVar = (JumpReLUTranscoderConfig, JumpReLUSkipTranscoderConfig)

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_transcoder"


@dataclass(kw_only=True)
class MatryoshkaBatchTopKTrainingTranscoderConfig(BatchTopKTrainingTranscoderConfig):
    matryoshka_widths: list[int] = field(default_factory=list)  # cumulative prefix widths, last = d_sae
    loss_weighting: Literal["saelens", "dictionary_learning"] = "saelens"
    group_weights: list[float] | None = None  # only for "dictionary_learning"; default 1/G each
    use_matryoshka_aux_loss: bool = False  # SAELens' option: AuxK per group, on that prefix's residual

    @classmethod
    def architecture(cls) -> str:
        return "matryoshka_batchtopk_transcoder"

    def __post_init__(self):
        w = self.matryoshka_widths
        _check(len(w) > 0 and all(isinstance(x, int) and x > 0 for x in w),
               f"matryoshka_widths must be a non-empty list of positive ints, got {w}.")
        _check(all(a < b for a, b in zip(w, w[1:])), f"matryoshka_widths must be strictly increasing, got {w}.")
        _check(w[-1] == self.d_sae, f"matryoshka_widths must end at d_sae={self.d_sae}, got {w}.")
        _check(self.loss_weighting in ("saelens", "dictionary_learning"),
               f"loss_weighting must be 'saelens' or 'dictionary_learning', got {self.loss_weighting!r}.")
        if self.group_weights is not None:
            _check(self.loss_weighting == "dictionary_learning",
                   "group_weights only apply to loss_weighting='dictionary_learning'.")
            _check(len(self.group_weights) == len(w), f"group_weights needs one weight per prefix ({len(w)}), "
                   f"got {len(self.group_weights)}.")
        super().__post_init__()


# ----------------------------------------------------------------------------- training classes


@dataclass
class TranscoderOutput:
    """What a training forward returns. Losses are scalars; `loss` is what backward() is called on."""

    prediction: Float[Tensor, "batch d_out"]
    latents: Float[Tensor, "batch d_sae"]
    loss: Tensor  # reconstruction (+ Matryoshka prefixes) + sparsity + aux
    mse: Tensor  # E||x_out - y||^2 with the whole dictionary
    prefix_mse: list[Tensor]  # one per Matryoshka prefix, coarse to fine (last = mse); [mse] otherwise
    sparsity: Tensor  # L1 penalty (ReLU), else 0
    aux: Tensor  # AuxK dead-latent loss (TopK family), else 0

    def detach(self) -> "TranscoderOutput":
        return TranscoderOutput(*(x.detach() if isinstance(x, Tensor) else [t.detach() for t in x]
                                  for x in (self.prediction, self.latents, self.loss, self.mse, self.prefix_mse,
                                            self.sparsity, self.aux)))


_NEEDS_X_OUT = "A transcoder's loss needs x_out: use forward(x_in, x_out) or layerflow.dictionaries.transcoders.train_step."


class TrainingTranscoder(TrainingSAE):
    """Base: weights, encode/decode, the training forward, prefix FVUs and the conversion for saving.

    A SAELens `TrainingSAE` (hooks, `cfg.to_dict`, registry), but SAELens' `SAETrainer` cannot train
    it (its step has no x_out): use `forward(x_in, x_out)` / `train_step`.
    """

    cfg: TrainingTranscoderConfig
    b_enc: nn.Parameter
    W_skip: nn.Parameter

    def __init__(self, cfg: TrainingTranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer("steps_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device))
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long, device=self.device))

    # --- weights and the maps

    def initialize_weights(self) -> None:
        c, kw = self.cfg, {"dtype": self.dtype, "device": self.device}
        self.W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c.d_in, c.d_sae, **kw)))  # as Transcoder
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))
        W_dec = nn.init.kaiming_uniform_(torch.empty(c.d_sae, c.d_out, **kw))
        if c.decoder_init_norm is not None:  # as TrainingSAE
            W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * c.decoder_init_norm
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(c.d_out, **kw))
        if c.skip:
            self.W_skip = nn.Parameter(torch.zeros(c.d_out, c.d_in, **kw))

    @torch.no_grad()
    def init_b_dec(self, x_out: Float[Tensor, "batch d_out"]) -> None:
        """Start b_dec at the mean target (sparsify's and layerflow's choice), not at zero."""
        self.b_dec.copy_(x_out.mean(0))

    @property
    def rescale(self) -> bool:
        return getattr(self.cfg, "rescale_acts_by_decoder_norm", False)

    @property
    def widths(self) -> list[int]:
        """Prefix widths, coarse to fine: the Matryoshka widths, else just [d_sae]."""
        return [self.cfg.d_sae]

    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        return self.hook_sae_input(sae_in.to(self.dtype))  # no b_dec: it lives in d_out

    def activate(self, hidden_pre: Tensor) -> Tensor:
        return self.activation_fn(hidden_pre)

    def encode_with_hidden_pre(self, x: Float[Tensor, "batch d_in"]) -> tuple[Tensor, Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        if self.rescale:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return self.hook_sae_acts_post(self.activate(hidden_pre)), hidden_pre

    def _W_dec(self) -> Tensor:
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True) if self.rescale else self.W_dec

    def decode(self, feature_acts: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_out"]:
        """a W_dec + b_dec, without the skip term (as SAELens' SkipTranscoder.decode)."""
        return self.hook_sae_recons(feature_acts @ self._W_dec() + self.b_dec)

    def skip_out(self, x_in: Float[Tensor, "batch d_in"]) -> Tensor | float:
        return x_in.to(self.dtype) @ self.W_skip.T if self.cfg.skip else 0.0

    def prefix_predictions(self, latents: Float[Tensor, "batch d_sae"], x_in: Float[Tensor, "batch d_in"],
                           widths: list[int] | None = None) -> list[Float[Tensor, "batch d_out"]]:
        """The prediction of each prefix of the dictionary (`widths`, default `self.widths`), coarse to fine."""
        W, y, lo, out = self._W_dec(), self.b_dec + self.skip_out(x_in), 0, []
        for hi in widths or self.widths:
            y = y + latents[:, lo:hi] @ W[lo:hi]
            out.append(y)
            lo = hi
        return out

    def predict(self, x_in: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_out"]:
        """The prediction with the current activation (call .eval() for what the saved one computes)."""
        return self.prefix_predictions(self.encode(x_in), x_in)[-1]

    # --- training

    def reconstruction_loss(self, prefix_mse: list[Tensor]) -> Tensor:
        return prefix_mse[-1]

    def sparsity_loss(self, latents: Tensor) -> Tensor:
        return latents.new_zeros(())

    def aux_loss(self, hidden_pre: Tensor, x_out: Tensor, preds: list[Tensor], dead: Tensor) -> Tensor:
        return hidden_pre.new_zeros(())

    def forward(self, x_in: Float[Tensor, "batch d_in"], x_out: Float[Tensor, "batch d_out"]) -> TranscoderOutput:
        dead = self.steps_since_fired > getattr(self.cfg, "dead_feature_window", float("inf"))
        latents, hidden_pre = self.encode_with_hidden_pre(x_in)
        if self.training:
            self._after_encode(latents)
        preds = self.prefix_predictions(latents, x_in)
        prefix_mse = [(x_out.to(self.dtype) - y).square().sum(-1).mean() for y in preds]
        sparsity = self.sparsity_loss(latents)
        aux = self.aux_loss(hidden_pre, x_out, preds, dead)
        loss = self.reconstruction_loss(prefix_mse) + sparsity + aux
        return TranscoderOutput(preds[-1], latents, loss, prefix_mse[-1], prefix_mse, sparsity, aux)

    @torch.no_grad()
    def _after_encode(self, latents: Tensor) -> None:
        self.training_steps += 1
        self.steps_since_fired += 1
        self.steps_since_fired[(latents > 0).any(0)] = 0

    @torch.no_grad()
    def prefix_fvu(self, x_in: Float[Tensor, "batch d_in"], x_out: Float[Tensor, "batch d_out"],
                   widths: list[int] | None = None) -> list[float]:
        """FVU of each prefix of the dictionary (`widths`, default `self.widths`: the Matryoshka widths,
        else [d_sae]), coarse to fine, with the inference activation (eval mode: BatchTopK uses its
        threshold), as `layerflow.metrics` defines it (ratio of averages)."""
        was_training = self.training
        self.eval()
        try:
            preds = self.prefix_predictions(self.encode(x_in), x_in, widths)
        finally:
            self.train(was_training)
        return [reconstruction_metrics(x_out.to(y.dtype), y).fvu for y in preds]

    def training_forward_pass(self, step_input):
        raise TypeError(_NEEDS_X_OUT)

    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):
        raise TypeError(_NEEDS_X_OUT)

    def get_coefficients(self) -> dict[str, float]:
        return {}

    def fold_activation_norm_scaling_factor(self, scaling_factor: float):
        raise NotImplementedError("x_in and x_out have their own scales: pass both to "
                                  "to_inference(scale_in, scale_out).")

    # --- saving

    @torch.no_grad()
    def to_inference(self, scale_in: float = 1.0, scale_out: float = 1.0) -> Transcoder:
        """The SAELens inference transcoder computing what this one computes in eval mode, with the
        activation scales folded in: it reads raw x_in (the training x_in was raw x_in * scale_in) and
        predicts raw x_out (the training target was raw x_out * scale_out).

        With m = (decoder-row norms if rescale_acts_by_decoder_norm else 1) / scale_out per latent:
        W_enc' = scale_in W_enc m, b_enc' = b_enc m, W_dec' = W_dec / (m scale_out),
        b_dec' = b_dec / scale_out, W_skip' = W_skip scale_in / scale_out, threshold' = theta / scale_out.
        """
        cfg_cls = self.cfg.get_inference_config_class()
        cfg_dict = copy.deepcopy(self.cfg.get_inference_sae_cfg_dict())
        sae_cls = get_sae_class(cfg_cls.architecture())[0]
        inference = sae_cls(cfg_cls.from_dict(cfg_dict))
        m = (self.W_dec.norm(dim=-1) if self.rescale else torch.ones_like(self.b_enc)) / scale_out
        state = {"W_enc": self.W_enc * m * scale_in, "b_enc": self.b_enc * m,
                 "W_dec": self.W_dec / (m * scale_out)[:, None], "b_dec": self.b_dec / scale_out}
        if self.cfg.skip:
            state["W_skip"] = self.W_skip * (scale_in / scale_out)
        if hasattr(self, "topk_threshold"):
            state["threshold"] = torch.full_like(self.b_enc, self.topk_threshold.item() / scale_out)
        inference.load_state_dict({k: v.contiguous() for k, v in state.items()})
        return inference

    def save_inference_model(self, path):
        """Write the SAELens folder (`to_inference().save_model(path)`); returns (weights, cfg) paths."""
        return self.to_inference().save_model(path)


class ReLUTrainingTranscoder(TrainingTranscoder):
    cfg: ReLUTrainingTranscoderConfig

    def sparsity_loss(self, latents: Tensor) -> Tensor:
        return self.cfg.l1_coefficient * (latents * self.W_dec.norm(dim=-1)).sum(-1).mean()


class TopKTrainingTranscoder(TrainingTranscoder):
    cfg: TopKTrainingTranscoderConfig

    def get_activation_fn(self):
        return TopK(self.cfg.k)

    def current_k(self) -> float:
        """k now: annealed over the first `k_anneal_steps` training steps, then `cfg.k` (and in eval mode)."""
        c = self.cfg
        if not c.k_anneal_steps or not self.training:
            return c.k
        start = max(c.k, min(c.d_in, c.d_sae))
        return start + (c.k - start) * min(self.training_steps.item() / c.k_anneal_steps, 1.0)

    def activate(self, hidden_pre: Tensor) -> Tensor:
        self.activation_fn.k = round(self.current_k())
        return self.activation_fn(hidden_pre)

    def aux_loss(self, hidden_pre: Tensor, x_out: Tensor, preds: list[Tensor], dead: Tensor) -> Tensor:
        """SAELens' AuxK: the top d_out // 2 dead latents predict the residual of the prediction."""
        if self.cfg.aux_loss_coefficient == 0 or not dead.any():
            return hidden_pre.new_zeros(())
        return self.cfg.aux_loss_coefficient * self._auxk(hidden_pre, (x_out - preds[-1]).detach(), dead, self._W_dec())

    def _auxk(self, hidden_pre: Tensor, residual: Tensor, dead: Tensor, W_dec: Tensor) -> Tensor:
        n_dead, k_aux = int(dead.sum()), self.cfg.d_out // 2
        if n_dead == 0:
            return hidden_pre.new_zeros(())
        acts = calculate_topk_aux_acts(min(k_aux, n_dead), hidden_pre, dead)
        return min(n_dead / k_aux, 1.0) * (acts @ W_dec - residual).square().sum(-1).mean()  # no bias


class BatchTopKTrainingTranscoder(TopKTrainingTranscoder):
    """Top k * batch latents over the batch while training; a JumpReLU with the learned threshold in
    eval mode and once saved."""

    cfg: BatchTopKTrainingTranscoderConfig
    topk_threshold: Tensor

    def __init__(self, cfg: BatchTopKTrainingTranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # float64 as SAELens: the EMA of small numbers drifts in float32
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=self.device))

    def get_activation_fn(self):
        return BatchTopK(self.cfg.k)

    def activate(self, hidden_pre: Tensor) -> Tensor:
        if self.training:
            self.activation_fn.k = self.current_k()
            return self.activation_fn(hidden_pre)
        return hidden_pre.relu() * (hidden_pre > self.topk_threshold)  # = SAELens' JumpReLU

    @torch.no_grad()
    def _after_encode(self, latents: Tensor) -> None:
        super()._after_encode(latents)
        positive = latents[latents > 0]
        if positive.numel():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold.copy_((1 - lr) * self.topk_threshold + lr * positive.min().double())


class MatryoshkaBatchTopKTrainingTranscoder(BatchTopKTrainingTranscoder):
    """BatchTopK whose nested prefixes (`matryoshka_widths`) must each predict x_out on their own."""

    cfg: MatryoshkaBatchTopKTrainingTranscoderConfig

    @property
    def widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths)

    def aux_loss(self, hidden_pre: Tensor, x_out: Tensor, preds: list[Tensor], dead: Tensor) -> Tensor:
        """With `use_matryoshka_aux_loss` (SAELens' option), the dead latents of each group predict the
        residual of their own prefix, so a dead coarse latent is revived onto what the coarse prefix
        misses rather than onto the whole dictionary's (fine-grained) residual."""
        if not self.cfg.use_matryoshka_aux_loss or self.cfg.aux_loss_coefficient == 0 or not dead.any():
            return super().aux_loss(hidden_pre, x_out, preds, dead)
        W, lo, total = self._W_dec(), 0, hidden_pre.new_zeros(())
        for hi, y in zip(self.widths, preds):
            total = total + self._auxk(hidden_pre[:, lo:hi], (x_out - y).detach(), dead[lo:hi], W[lo:hi])
            lo = hi
        return self.cfg.aux_loss_coefficient * total

    def reconstruction_loss(self, prefix_mse: list[Tensor]) -> Tensor:
        if self.cfg.loss_weighting == "saelens":
            return torch.stack(prefix_mse).sum()
        n = len(prefix_mse)
        weights = self.cfg.group_weights or [1.0 / n] * n
        return sum(w * loss for w, loss in zip(weights, prefix_mse)) / n


# ----------------------------------------------------------------------------- training step


def make_optimizer(model: TrainingTranscoder, lr: float = 3e-4) -> torch.optim.Adam:
    """Adam with SAELens' default betas (0.9, 0.999)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


def train_step(model: TrainingTranscoder, optimizer: torch.optim.Optimizer, x_in: Float[Tensor, "batch d_in"],
               x_out: Float[Tensor, "batch d_out"], max_grad_norm: float | None = 1.0) -> TranscoderOutput:
    """One step: forward, backward, gradient-norm clipping (at 1, as SAELens' trainer), optimizer step.
    Returns the step's output, detached."""
    model.train()
    out = model(x_in, x_out)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return out.detach()


# ----------------------------------------------------------------------------- registration

INFERENCE_CLASSES: dict[str, tuple[type, type]] = {
    "topk_transcoder": (TopKTranscoder, TopKTranscoderConfig),
    "topk_skip_transcoder": (TopKSkipTranscoder, TopKSkipTranscoderConfig),
}
TRAINING_CLASSES: dict[str, tuple[type, type]] = {
    "transcoder": (ReLUTrainingTranscoder, ReLUTrainingTranscoderConfig),
    "topk_transcoder": (TopKTrainingTranscoder, TopKTrainingTranscoderConfig),
    "batchtopk_transcoder": (BatchTopKTrainingTranscoder, BatchTopKTrainingTranscoderConfig),
    "matryoshka_batchtopk_transcoder": (MatryoshkaBatchTopKTrainingTranscoder,
                                        MatryoshkaBatchTopKTrainingTranscoderConfig),
}


def register() -> None:
    """Register the classes with SAELens. Idempotent (SAELens' own register raises on a second call);
    after `importlib.reload` the entries point at the new class objects. A name already registered
    for a class from elsewhere is an error rather than silently replaced."""
    for registry, add, classes in ((SAE_CLASS_REGISTRY, register_sae_class, INFERENCE_CLASSES),
                                   (SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class, TRAINING_CLASSES)):
        for name, (cls, cfg_cls) in classes.items():
            old = registry.get(name)
            if old is None:
                add(name, cls, cfg_cls)
            elif (old[0].__module__, old[0].__qualname__) == (cls.__module__, cls.__qualname__):
                registry[name] = (cls, cfg_cls)
            else:
                raise ValueError(f"SAELens already registers architecture {name!r} for "
                                 f"{old[0].__module__}.{old[0].__qualname__}; layerflow.dictionaries.transcoders cannot add "
                                 f"{cls.__qualname__} under that name.")


register()

__all__ = [
    "TopKTranscoder", "TopKTranscoderConfig", "TopKSkipTranscoder", "TopKSkipTranscoderConfig",
    "TrainingTranscoder", "TrainingTranscoderConfig", "TranscoderOutput",
    "ReLUTrainingTranscoder", "ReLUTrainingTranscoderConfig",
    "TopKTrainingTranscoder", "TopKTrainingTranscoderConfig",
    "BatchTopKTrainingTranscoder", "BatchTopKTrainingTranscoderConfig",
    "MatryoshkaBatchTopKTrainingTranscoder", "MatryoshkaBatchTopKTrainingTranscoderConfig",
    "make_optimizer", "train_step", "register",
]
