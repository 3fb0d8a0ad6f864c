"""The user cache: what layerflow can rebuild and keeps between runs (dequantized weights, token
streams of the text sources, compiled kernels), under $LAYERFLOW_CACHE or the user cache dir.

Every process of the user shares it, so a cache entry is written to a temporary name that carries
the process id and renamed into place: two processes filling the same entry never mix their bytes.
`replace_on_success` is that write-then-rename, which run folders use too (`files.atomic`).
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


def cache_entry(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """This process's temporary path for the cache entry `path` (see `replace_on_success`)."""
    path = Path(path)
    return replace_on_success(path, path.with_name(f"{path.name}.tmp{os.getpid()}"))


@contextlib.contextmanager
def replace_on_success(path: Path, tmp: Path) -> Iterator[Path]:
    """Yield `tmp` to write a file or a folder to; when the block succeeds it replaces `path` (an
    old folder is removed first), when it fails it is removed. A stale `tmp` is cleared first."""
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
