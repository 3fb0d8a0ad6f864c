"""One-pass multi-layer capture, streamed to a sharded safetensors store (resumable).

One forward pass per batch captures every requested site: hooks copy activations into
preallocated shard buffers, and the pass stops after the deepest captured layer
(`stop_at_layer`), so the unembedding is never computed. A writer thread saves full shards
while the model computes the next one; two buffer sets bound RAM whatever the token count.

Layout of a capture directory:

    plan.json                       what is being captured (written first; resume checks it)
    shards/train-00000.safetensors  one tensor per hook name [tokens, d] + "tokens" [seqs, ctx]
    shards/train-00000.json         the shard's checksum and statistics (written after it)
    capture.json                    the manifest (written last: its presence means "complete")
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import xxhash

from layerflow import __version__, defaults
from layerflow.capture.store import read_tensor
from layerflow.data.tokens import TokenPlan, describe_source, make_sequences, source_fingerprint, special_token_ids
from layerflow.errors import LayerflowError
from layerflow.files import (CAPTURE, PLAN_FILE, SHARD_DIR, SHARD_DTYPES, TOKENS_KEY, CaptureManifest, ShardRecord, atomic,
                             atomic_write_text, file_checksum, prepare_out_dir, write_json)
from layerflow.models.load import LoadedModel, load_model
from layerflow.models.sites import Site, SiteKind, prepare_hooks, resolve

SCHEMA_VERSION = 1
STORE_DTYPES = {name: getattr(torch, name) for name in SHARD_DTYPES}
SHARD_BYTES = 64 * 2**20  # target size of one shard


@dataclass
class CaptureConfig:
    model: str
    layers: list[int]
    kinds: list[SiteKind] = field(default_factory=lambda: [SiteKind(k) for k in defaults.SITE_KINDS])
    n_tokens: int = defaults.CAPTURE_TOKENS  # total, train + held-out
    context_size: int = defaults.CONTEXT_SIZE
    prepend_bos: bool = defaults.PREPEND_BOS
    source: str = defaults.SOURCE
    holdout_fraction: float = defaults.HOLDOUT_FRACTION
    dtype: str = defaults.STORE_DTYPE  # storage dtype
    batch_size: int = defaults.FORWARD_BATCH  # sequences per forward pass
    shard_seqs: int | None = None  # sequences per shard; None: about SHARD_BYTES per shard
    seed: int = defaults.SEED
    device: str = defaults.DEVICE
    splits: tuple[str, ...] = ("train", "heldout")  # online training stores only "heldout"


class _Shard(NamedTuple):
    name: str  # "<split>-NNNNN"
    split: str
    first: int  # first sequence
    count: int  # sequences


@dataclass
class _Job:
    """What a capture makes, fixed before any token is read: its `plan` is what a rerun compares."""

    sites: list[Site]
    tokens: TokenPlan
    dtype: torch.dtype
    shard_seqs: int
    plan: dict[str, Any]

    @property
    def stop_at(self) -> int:
        return max(s.layer for s in self.sites) + 1  # the forward pass stops after the deepest site


def capture(
    cfg: CaptureConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    loaded: LoadedModel | None = None,
) -> CaptureManifest:
    """Capture `cfg.layers` x `cfg.kinds` into `out_dir`; resume an interrupted capture there."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check(cfg)
    loaded = loaded or load_model(cfg.model, device=cfg.device)
    job = _plan(cfg, loaded)
    state = prepare_out_dir(out_dir, CAPTURE, job.plan, overwrite)
    if state == "complete":
        return CaptureManifest.read(out_dir)
    tokens, n_train, n_heldout = split_sequences(cfg, job.tokens, loaded)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out_dir / PLAN_FILE, job.plan, indent=2)
    shards = [s for s in _shard_plan(n_train, n_heldout, job.shard_seqs) if s.split in cfg.splits]
    records = _finished_shards(out_dir, shards, tokens) if state == "resume" else {}
    report = _Progress(progress, sum(s.count for s in shards) * cfg.context_size, sum(r.n_tokens for r in records.values()))
    specials = special_token_ids(loaded.tokenizer, job.tokens)
    writer = _ShardWriter(out_dir / SHARD_DIR, {s.hook_name: s.d for s in job.sites}, job.shard_seqs * cfg.context_size,
                          job.dtype, torch.tensor(specials, dtype=torch.long), cfg.device)
    model = loaded.model
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=[(s.hook_name, writer.hook) for s in job.sites]):
            for shard in (s for s in shards if s.name not in records):
                shard_tokens = tokens[shard.first:shard.first + shard.count]
                writer.begin(shard.name, shard.split, shard.first, shard_tokens)
                for batch in shard_tokens.split(cfg.batch_size):
                    model(batch.to(cfg.device), stop_at_layer=job.stop_at)
                    writer.advance(batch.numel())
                    report.advance(batch.numel())
                writer.finish_shard()
    finally:
        records.update((r.file.removesuffix(".safetensors"), r) for r in writer.close())
    manifest = _manifest(cfg, loaded, job, specials, (n_train, n_heldout), [records[s.name] for s in shards], started)
    manifest.write(out_dir)
    return manifest


def _check(cfg: CaptureConfig) -> None:
    if cfg.dtype not in STORE_DTYPES:
        raise LayerflowError(f"Unknown storage dtype '{cfg.dtype}'. Valid: {', '.join(STORE_DTYPES)}.")
    if not 0 <= cfg.holdout_fraction < 1:
        raise LayerflowError(f"Held-out fraction {cfg.holdout_fraction} must be in [0, 1).")
    if cfg.batch_size < 1:
        raise LayerflowError(f"Batch size {cfg.batch_size} must be at least 1.")
    if cfg.n_tokens < cfg.context_size:
        raise LayerflowError(f"--tokens {cfg.n_tokens} is less than one sequence (context size {cfg.context_size}).")


def _plan(cfg: CaptureConfig, loaded: LoadedModel) -> _Job:
    """The sites (resolved, their hooks made to fire), the token plan, the shard size and the plan."""
    if loaded.name != cfg.model:
        raise LayerflowError(f"The config names model '{cfg.model}' but the loaded model is '{loaded.name}'.")
    sites = resolve(loaded.model, sorted(set(cfg.layers)), cfg.kinds)
    prepare_hooks(loaded.model, [s.hook_name for s in sites])
    tokens = TokenPlan(cfg.source, cfg.context_size, cfg.prepend_bos, loaded.bos_token_id, cfg.seed)
    dtype = STORE_DTYPES[cfg.dtype]
    shard_seqs = cfg.shard_seqs or max(1, SHARD_BYTES // (cfg.context_size * sum(s.d for s in sites) * dtype.itemsize))
    plan = {
        "model": loaded.name,
        "weights_source": loaded.weights_source,
        "hooks": [s.hook_name for s in sites],
        "n_tokens": cfg.n_tokens,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "bos_token_id": tokens.bos_token_id,
        "source": cfg.source,
        "source_fingerprint": source_fingerprint(cfg.source),
        "holdout_fraction": cfg.holdout_fraction,
        "dtype": cfg.dtype,
        "shard_seqs": shard_seqs,
        "seed": cfg.seed,
        **({"splits": list(cfg.splits)} if tuple(cfg.splits) != ("train", "heldout") else {}),
    }
    return _Job(sites, tokens, dtype, shard_seqs, plan)


def split_sequences(cfg: CaptureConfig, token_plan: TokenPlan, loaded: LoadedModel) -> tuple[torch.Tensor, int, int]:
    """(all sequences, train count, held-out count): training sequences first."""
    n_seqs = math.ceil(cfg.n_tokens / cfg.context_size)
    n_heldout = math.ceil(n_seqs * cfg.holdout_fraction) if cfg.holdout_fraction > 0 else 0
    n_train = n_seqs - n_heldout
    if n_train < 1:
        raise LayerflowError(f"--tokens {cfg.n_tokens} leaves no training sequences after the held-out split.")
    return make_sequences(n_seqs, token_plan, loaded.model.tokenizer, loaded.model.cfg.d_vocab), n_train, n_heldout


def _shard_plan(n_train: int, n_heldout: int, shard_seqs: int) -> list[_Shard]:
    """Every shard, train first."""
    shards = []
    for split, start, count in (("train", 0, n_train), ("heldout", n_train, n_heldout)):
        for i, first in enumerate(range(start, start + count, shard_seqs)):
            shards.append(_Shard(f"{split}-{i:05d}", split, first, min(shard_seqs, start + count - first)))
    return shards


def _finished_shards(out_dir: Path, shards: list[_Shard], tokens: torch.Tensor) -> dict[str, ShardRecord]:
    """The shards an interrupted capture completed: file and sidecar there, checksum and tokens as planned."""
    finished = {}
    for shard in shards:
        path, sidecar = out_dir / SHARD_DIR / f"{shard.name}.safetensors", out_dir / SHARD_DIR / f"{shard.name}.json"
        if not (path.exists() and sidecar.exists()):
            continue
        record = ShardRecord(**json.loads(sidecar.read_text()))
        if file_checksum(path) == record.checksum and torch.equal(
                read_tensor(path, TOKENS_KEY).long(), tokens[shard.first:shard.first + shard.count]):
            finished[shard.name] = record
    return finished


class _Progress:
    def __init__(self, report: Callable[[int, int], None] | None, total: int, done: int):
        self.report, self.total, self.done = report, total, done
        self.advance(0)

    def advance(self, n_tokens: int) -> None:
        self.done += n_tokens
        if self.report:
            self.report(self.done, self.total)


def _manifest(cfg: CaptureConfig, loaded: LoadedModel, job: _Job, specials: list[int], split: tuple[int, int],
              shards: list[ShardRecord], started: float) -> CaptureManifest:
    n_train, n_heldout = split
    count = sum(r.norm_count for r in shards)
    return CaptureManifest(
        schema_version=SCHEMA_VERSION,
        layerflow_version=__version__,
        model={
            "name": loaded.name,
            "official_name": loaded.spec.official_name,
            "family": loaded.spec.family,
            "weights_source": loaded.weights_source,
            "from_pretrained_kwargs": loaded.from_pretrained_kwargs,
            "n_layers": loaded.model.cfg.n_layers,
        },
        sites=job.sites,
        layers=sorted(set(cfg.layers)),
        d_model=loaded.model.cfg.d_model,
        dtype=cfg.dtype,
        context_size=cfg.context_size,
        prepend_bos=cfg.prepend_bos,
        bos_token_id=job.tokens.bos_token_id,
        special_token_ids=specials,
        text_source={"source": cfg.source, "description": describe_source(cfg.source),
                     "fingerprint": job.plan["source_fingerprint"], "seed": cfg.seed},
        split={"train_seqs": n_train, "heldout_seqs": n_heldout,
               "train_tokens": n_train * cfg.context_size, "heldout_tokens": n_heldout * cfg.context_size},
        n_tokens=sum(r.n_tokens for r in shards),
        shards=shards,
        mean_norm={s.hook_name: sum(r.norm_sums[s.hook_name] for r in shards) / max(count, 1) for s in job.sites},
        seconds=round(time.perf_counter() - started, 3),
    )


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file straight from tensor memory; return its checksum ("xxh3_128:<hex>").

    `safetensors.torch.save_file` first copies every tensor into a Python bytes object, and a
    second read for the checksum would follow. A shard is tens of MB per layer; on a small CPU
    those copies (and SHA-256, 13x slower than XXH3 here) take cores away from the forward pass.
    """
    header: dict[str, Any] = {}
    offset = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    digest = xxhash.xxh3_128()
    with open(path, "wb") as f:
        for chunk in (len(encoded).to_bytes(8, "little"), encoded):
            f.write(chunk)
            digest.update(chunk)
        for t in tensors.values():
            data = memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
            f.write(data)
            digest.update(data)
    return f"xxh3_128:{digest.hexdigest()}"


class _ShardWriter:
    """Two buffer sets: hooks fill one while a thread saves the other.

    All torch compute (norms, checks, statistics) stays on the forward thread; the saving thread
    only does I/O and hashing. Torch ops on a second thread would start a second OpenMP team that
    fights the forward pass for the cores.
    """

    def __init__(self, shard_dir: Path, widths: dict[str, int], rows: int, dtype: torch.dtype,
                 specials: torch.Tensor, device: str):
        self.shard_dir, self.specials = shard_dir, specials
        # From a GPU, copy into pinned host memory without blocking; synchronise once per shard.
        self.pinned = torch.device(device).type == "cuda"
        self.free: queue.Queue = queue.Queue()
        for _ in range(2):  # (activations, their row norms) per hook
            self.free.put(({h: torch.empty(rows, d, dtype=dtype, pin_memory=self.pinned) for h, d in widths.items()},
                           {h: torch.empty(rows, pin_memory=self.pinned) for h in widths}))
        self.full: queue.Queue = queue.Queue()
        self.records: list[ShardRecord] = []
        self.error: BaseException | None = None
        self.buffers: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self.offset = 0
        # float16 tops out at 65504; deep residual streams (Gemma's) exceed it and would store inf.
        self.limit = torch.finfo(dtype).max if dtype == torch.float16 else None
        self.peak: dict[str, torch.Tensor] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def begin(self, name: str, split: str, first: int, tokens: torch.Tensor) -> None:
        self._raise_if_failed()
        self.buffers = self.free.get()
        self.offset = 0
        self.meta = (name, split, first, tokens)

    def hook(self, act: torch.Tensor, hook: Any) -> None:
        flat = act.reshape(-1, act.shape[-1])
        rows = slice(self.offset, self.offset + flat.shape[0])
        acts, norms = self.buffers
        acts[hook.name][rows].copy_(flat, non_blocking=self.pinned)
        norms[hook.name][rows].copy_(torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32), non_blocking=self.pinned)
        if self.limit is not None:
            peak = flat.detach().abs().amax().float()
            self.peak[hook.name] = torch.maximum(self.peak[hook.name], peak) if hook.name in self.peak else peak

    def advance(self, n_tokens: int) -> None:
        self.offset += n_tokens

    def finish_shard(self) -> None:
        if self.pinned:
            torch.cuda.synchronize()
        (name, split, first, tokens), (acts, norms), n = self.meta, self.buffers, self.offset
        keep = ~torch.isin(tokens.reshape(-1), self.specials)
        norm_sums = {}
        for h, norm in norms.items():
            # A row's norm is NaN/Inf iff the row holds a NaN/Inf (or overflows float32).
            if not torch.isfinite(norm[:n]).all():
                self.free.put(self.buffers)
                raise LayerflowError(f"Shard {name}: activations at {h} contain NaN or Inf. Nothing was saved for it.")
            norm_sums[h] = norm[:n][keep].sum().item()
        for h, peak in self.peak.items():
            if peak.item() > self.limit:
                self.free.put(self.buffers)
                raise LayerflowError(f"Activations at {h} reach {peak.item():.4g}, beyond the float16 range "
                                     f"(max {self.limit:.0f}). Capture with dtype bfloat16 or float32.")
        self.peak.clear()
        record = ShardRecord(f"{name}.safetensors", split, first, tokens.shape[0], n, "", norm_sums, int(keep.sum()))
        tensors = {**{h: a[:n] for h, a in acts.items()}, TOKENS_KEY: tokens.to(torch.int32)}
        self.full.put((record, tensors, self.buffers))
        self.buffers = None

    def close(self) -> list[ShardRecord]:
        self.full.put(None)
        self.thread.join()
        self._raise_if_failed()
        return self.records

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.full.get()) is not None:
            record, tensors, buffers = item
            try:
                if self.error is None:
                    path = self.shard_dir / record.file
                    with atomic(path) as tmp:
                        record.checksum = write_safetensors(tmp, tensors)
                    atomic_write_text(path.with_suffix(".json"), json.dumps(asdict(record)))
                    self.records.append(record)
            except BaseException as err:  # surfaced in the main thread
                self.error = err
            finally:
                self.free.put(buffers)
