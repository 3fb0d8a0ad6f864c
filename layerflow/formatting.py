"""How figures are written for a person: one number format and one way to attach an interval, shared
by report.md and the command line (light: no torch, no matplotlib)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fmt(x: Any) -> str:
    """The one number format: integers as they are, others to 3 significant digits (from 1000 on,
    rounded to an integer); None and NaN as "n/a"."""
    if x is None or isinstance(x, bool):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1000:
        return str(round(x))
    text = f"{x:.3g}"
    return "0" if text == "-0" else text


def iv(e: Any) -> str:
    """A figure with its interval, "0.453 [0.44, 0.467]" ("0.453 (no interval)" without one). `e` is a
    dict with value, low and high (summary.json; None for missing) or an object with those attributes
    (`transfer.summary.Estimate`; NaN for missing)."""
    if e is not None and not isinstance(e, dict):
        e = {k: getattr(e, k) for k in ("value", "low", "high")}
    missing = lambda v: v is None or (isinstance(v, float) and not math.isfinite(v))  # noqa: E731
    if e is None or missing(e.get("value")):
        return "n/a"
    if missing(e.get("low")) or missing(e.get("high")):
        return f"{fmt(e['value'])} (no interval)"
    return f"{fmt(e['value'])} [{fmt(e['low'])}, {fmt(e['high'])}]"
