"""The transfer kernel's encoder activations, fused in C.

From one pre-activation matrix P = x W_enc, the transfer kernel needs several affine variants
z_v = (alpha_v P + bias_v) * scale (raw, scale-only, matched), each reduced to its active
latents. In torch that is, per variant, a pass writing z_v, a pass scaling it and a top-k (or a
comparison and `nonzero`) over [tokens, d_sae]: on a CPU those passes cost more than the
matmul itself. `fused_encode.c` reads each row of P once for all variants and keeps only the
selected latents; the result equals torch's up to ties at the k-th value (tests check).

The C source is compiled on first use by the system's C compiler into
$LAYERFLOW_CACHE/kernels (`cache.cache_dir`), keyed by the source, the flags and the CPU. It is
built with OpenMP when the compiler can: loaded after torch, it then shares torch's OpenMP
runtime (libgomp) and threads, with no oversubscription. Without OpenMP it runs on row ranges
in a thread pool (ctypes releases the GIL). Without a compiler, or with LAYERFLOW_FUSED_ENCODE=0,
`available()` is False and callers use torch ops instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int64
from torch import Tensor

from layerflow.cache import cache_dir, cache_entry

SOURCE = Path(__file__).with_name("fused_encode.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
MIN_ROWS_PER_THREAD = 64
log = logging.getLogger(__name__)
unavailable_reason: str | None = None  # why `available()` is False, for benchmarks and logs


def available() -> bool:
    return not _disabled and _library() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Callers use torch ops instead of the C kernel inside this block (to compare the two)."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


_disabled = False


def accepts(P: Tensor) -> bool:
    """Whether the kernel can take this pre-activation matrix (else use torch ops)."""
    return _is_kernel_input(P) and available()


def _is_kernel_input(P: Tensor) -> bool:
    return P.device.type == "cpu" and P.dtype == torch.float32 and P.stride(-1) == 1


def topk(
    P: Float[Tensor, "tokens d_sae"], alphas: Sequence[float], biases: Float[Tensor, "variants d_sae"],
    scale: Float[Tensor, " d_sae"] | None, k: int,
) -> tuple[Float[Tensor, "variants tokens k"], Int64[Tensor, "variants tokens k"]]:
    """For each variant v: relu of the k largest (alpha_v P + biases[v]) * scale per row, and their
    columns (unordered). Equals torch.topk of the same tensor, values after a ReLU."""
    lib = _require()
    T, F = P.shape
    if not 0 < k <= F:
        raise ValueError(f"k must be in 1..{F}, got {k}")
    P, biases, scale, alpha = _prepare(P, alphas, biases, scale)
    m = len(alpha)
    values = torch.empty(m, T, k)
    indices = torch.empty(m, T, k, dtype=torch.int64)
    _over_rows(_row_ranges(T), lambda begin, end: lib.topk_variants(
        P.data_ptr(), P.stride(0), T, F, begin, end, m, alpha.data_ptr(), biases.data_ptr(), scale.data_ptr(), k,
        values.data_ptr(), indices.data_ptr()))
    return values, indices


def threshold(
    P: Float[Tensor, "tokens d_sae"], alphas: Sequence[float], biases: Float[Tensor, "variants d_sae"],
    scale: Float[Tensor, " d_sae"] | None, cut: Float[Tensor, " d_sae"] | None,
) -> list[tuple[Int64[Tensor, " nnz"], Int64[Tensor, " nnz"], Float[Tensor, " nnz"]]]:
    """For each variant: (offsets [tokens + 1], columns, values) of z = (alpha_v P + biases[v]) * scale
    where z > cut (0 when `cut` is None: a ReLU); token t's entries are [offsets[t]:offsets[t + 1]],
    columns ascending."""
    lib = _require()
    T, F = P.shape
    P, biases, scale, alpha = _prepare(P, alphas, biases, scale)
    cut = torch.zeros(F) if cut is None else cut.detach().float().contiguous()
    m = len(alpha)
    counts = torch.empty(m, T, dtype=torch.int64)
    ranges = _row_ranges(T)
    while True:
        cap = _threshold_cap.get(F, min(F, 256))
        values, indices = _workspace(m * T * cap)
        widest = _over_rows(ranges, lambda begin, end: lib.threshold_variants(
            P.data_ptr(), P.stride(0), T, F, begin, end, m, alpha.data_ptr(), biases.data_ptr(), scale.data_ptr(),
            cut.data_ptr(), cap, values.data_ptr(), indices.data_ptr(), counts.data_ptr()))
        if widest <= cap:
            break
        _threshold_cap[F] = min(F, 1 << (widest - 1).bit_length())  # a row had more active latents than ever before
    # each row range packed its pairs at the start of its first row's slot
    offsets = torch.nn.functional.pad(counts.cumsum(1), (1, 0))
    out = []
    for v in range(m):
        starts = [(v * T + begin) * cap for begin, _ in ranges]
        sizes = [int(offsets[v, end] - offsets[v, begin]) for begin, end in ranges]
        out.append((offsets[v], *(torch.cat([t[start:start + size] for start, size in zip(starts, sizes)])
                                  for t in (indices, values))))
    return out


_threshold_cap: dict[int, int] = {}


def _workspace(size: int) -> tuple[Tensor, Tensor]:
    """Output buffers for `threshold`, reused by each calling thread (results are copied out of
    them): fresh ones each call would cost a page fault per 4 KiB."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].numel() < size:
        buffers = _local.buffers = (torch.empty(size), torch.empty(size, dtype=torch.int64))
    return buffers


_local = threading.local()


def _prepare(P, alphas, biases, scale):
    if not _is_kernel_input(P):
        raise ValueError("P must be a float32 CPU tensor with contiguous rows")
    F = P.shape[1]
    biases = biases.detach().float().contiguous()
    if biases.shape != (len(alphas), F):
        raise ValueError(f"biases must have shape ({len(alphas)}, {F}), got {tuple(biases.shape)}")
    scale = torch.ones(F) if scale is None else scale.detach().float().contiguous()
    return P, biases, scale, torch.tensor([float(a) for a in alphas], dtype=torch.float32)


def _row_ranges(T: int) -> list[tuple[int, int]]:
    """All rows when the kernel splits them itself (OpenMP); else about equal row ranges, one per
    torch thread (at least MIN_ROWS_PER_THREAD rows each), for the thread pool."""
    if _library().openmp:
        return [(0, T)]
    n = max(1, min(torch.get_num_threads(), T // MIN_ROWS_PER_THREAD))
    bounds = [T * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _over_rows(ranges: list[tuple[int, int]], run) -> int:
    """max of run(begin, end) over the row ranges, run in parallel."""
    if len(ranges) == 1:
        results = [run(*ranges[0])]
    else:
        results = list(_pool(len(ranges)).map(run, *zip(*ranges)))
    if any(r < 0 for r in results):
        raise MemoryError("fused_encode: the C kernel could not allocate its work buffers")
    return max(results)


@functools.cache
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="layerflow-fused-encode")


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"The fused encoder kernel is not available: {unavailable_reason}")
    return lib


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def _library() -> ctypes.CDLL | None:
    global unavailable_reason
    if os.environ.get("LAYERFLOW_FUSED_ENCODE", "1") == "0":
        unavailable_reason = "turned off by LAYERFLOW_FUSED_ENCODE=0"
        return None
    compiler = find_compiler()
    if compiler is None:
        unavailable_reason = "no C compiler (cc, gcc or $CC) on PATH"
        return None
    errors = []
    for openmp in (True, False):  # OpenMP shares torch's runtime and threads; without it, a thread pool
        try:
            return load(compiler, openmp)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            errors.append(f"{error} {detail.decode(errors='replace')[-500:]}")
    unavailable_reason = f"compiling {SOURCE.name} failed: " + " | ".join(errors)
    log.info(unavailable_reason)
    return None


def load(compiler: str, openmp: bool) -> ctypes.CDLL:
    """The kernel library built with or without OpenMP (tests load both)."""
    lib = ctypes.CDLL(str(_compiled(compiler, openmp)))
    lib.openmp = openmp
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.topk_variants.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    lib.topk_variants.restype = i64
    lib.threshold_variants.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr]
    lib.threshold_variants.restype = i64
    return lib


def _compiled(compiler: str, openmp: bool) -> Path:
    """The shared library for this source, compiler, flags and CPU (-march=native), built once."""
    flags = FLAGS + (("-fopenmp",) if openmp else ())
    identity = "\n".join([compiler, *flags, platform.machine(), _cpu_identity()]).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + identity).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"fused_encode-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with cache_entry(target) as partial:
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial), "-lm"], check=True, capture_output=True)
    return target


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(wanted)))
