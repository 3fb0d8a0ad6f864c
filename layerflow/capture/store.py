"""Reading a capture store written by `capture.writer`: its manifest, splits, shards and activations."""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors import safe_open

from layerflow.errors import LayerflowError
from layerflow.files import CAPTURE_MANIFEST, SHARD_DIR, TOKENS_KEY, CaptureManifest

SPLITS = ("train", "heldout")


class ActivationStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / CAPTURE_MANIFEST
        if not manifest.exists():
            raise LayerflowError(f"'{self.root}' is not a finished capture (no {CAPTURE_MANIFEST}). "
                                 "Run `layerflow capture` (it resumes an interrupted one).")
        self.manifest = CaptureManifest.read(self.root)

    @property
    def hook_names(self) -> list[str]:
        return [s.hook_name for s in self.manifest.sites]

    def shards(self, split: str) -> list[Path]:
        if split not in SPLITS:
            raise LayerflowError(f"Unknown split '{split}'. Valid: {', '.join(SPLITS)}.")
        return [self.root / SHARD_DIR / s.file for s in self.manifest.shards if s.split == split]

    def activations(self, hook_name: str, split: str = "train") -> Float[torch.Tensor, "tokens d"]:
        """All activations of one hook in a split, in token order (loads them into RAM)."""
        if hook_name not in self.hook_names:
            raise LayerflowError(f"Hook '{hook_name}' was not captured. Captured: {', '.join(self.hook_names)}.")
        return torch.cat([read_tensor(p, hook_name) for p in self.shards(split)])

    def tokens(self, split: str = "train") -> Int[torch.Tensor, "seqs context"]:
        return torch.cat([read_tensor(p, TOKENS_KEY).long() for p in self.shards(split)])

    def heldout(self, hooks: list[str], max_tokens: int | None = None,
                exclude_special_tokens: bool = True) -> dict[str, Float[torch.Tensor, "tokens d"]]:
        """Held-out activations of `hooks` on the same tokens (special positions left out), float32."""
        for hook in hooks:
            if hook not in self.hook_names:
                raise LayerflowError(f"Hook '{hook}' was not captured in '{self.root}'. "
                                     f"Captured: {', '.join(self.hook_names)}.")
        if not self.shards("heldout"):
            raise LayerflowError(f"The capture at '{self.root}' has no held-out split: capture with --holdout > 0.")
        rows = self.heldout_rows(max_tokens, exclude_special_tokens)
        return {hook: self.activations(hook, "heldout")[rows].float() for hook in hooks}

    def heldout_sequences(self, max_tokens: int | None = None,
                          exclude_special_tokens: bool = True) -> Int[torch.Tensor, " tokens"]:
        """The sequence each row of `heldout(...)` (same arguments) comes from."""
        width = self.tokens("heldout").shape[1]
        return self.heldout_rows(max_tokens, exclude_special_tokens) // width

    def heldout_rows(self, max_tokens: int | None = None, exclude_special_tokens: bool = True) -> Int[torch.Tensor, " rows"]:
        """The held-out positions (rows of the flattened split) `heldout` reads: whole sequences spread
        evenly over the split, not its first block, so the sample spans every document the split holds.
        The last sequence taken may be cut to make `max_tokens`."""
        tokens = self.tokens("heldout")
        n_seqs, width = tokens.shape
        keep = ~self.special_mask("heldout") if exclude_special_tokens else torch.ones(n_seqs * width, dtype=torch.bool)
        per_seq = keep.reshape(n_seqs, width).sum(1)
        if max_tokens is None or int(per_seq.sum()) <= max_tokens:
            chosen = torch.arange(n_seqs)
        else:
            m = max(1, int(max_tokens / per_seq.float().mean()))
            while True:  # the fewest evenly spaced sequences that hold max_tokens
                chosen = torch.linspace(0, n_seqs - 1, m).round().long().unique()
                if int(per_seq[chosen].sum()) >= max_tokens or m >= n_seqs:
                    break
                m += 1
        rows = (chosen[:, None] * width + torch.arange(width)).reshape(-1)
        return rows[keep[rows]][:max_tokens]

    def special_mask(self, split: str = "train") -> torch.Tensor:
        """True at positions holding BOS or another special token, flattened like `activations`."""
        specials = torch.tensor(self.manifest.special_token_ids, dtype=torch.long)
        return torch.isin(self.tokens(split).reshape(-1), specials)


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a shard file."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)
