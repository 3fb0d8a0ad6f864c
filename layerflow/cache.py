"""The user cache: what layerflow can rebuild and keeps between runs (dequantized weights, token
streams of the text sources, compiled kernels), under $LAYERFLOW_CACHE or the user cache dir.

Every process of the user shares it, so a cache entry is written to a temporary name that carries
the process id and renamed into place: two processes filling the same entry never mix their bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """$LAYERFLOW_CACHE, else <user cache dir>/layerflow."""
    if env := os.environ.get("LAYERFLOW_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layerflow"


@contextlib.contextmanager
def cache_entry(path: str | Path) -> Iterator[Path]:
    """Yield this process's temporary path for the cache entry `path` (a file or a folder); it
    replaces `path` when the block succeeds and is removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
