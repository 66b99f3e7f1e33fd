"""Numbers in human units, shared by the run report, the terminal and the calculator."""

from __future__ import annotations

import numpy as np

# ---- human units --------------------------------------------------------------------------------------

UNITS = {
    "s": (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)),
    "tok/s": (("M tok/s", 1e6), ("k tok/s", 1e3), ("tok/s", 1.0)),
    "count": (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)),
    "bytes": (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1.0)),
}


def _family(metric: str) -> str:
    if metric.endswith("_bytes"):
        return "bytes"
    if metric == "tokens_per_s":
        return "tok/s"
    return "s" if metric.endswith("_s") and not metric.endswith("_per_s") else "count"


def pick_unit(values, metric: str) -> tuple[str, float]:
    """One unit for a set of values of ``metric`` (by their median), e.g. ("ms", 1e-3)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    ref = float(np.median(v)) if len(v) else 1.0
    units = UNITS[_family(metric)]
    return next(((u, s) for u, s in units if ref >= s), units[-1])


def fmt_scaled(x: float, scale: float = 1.0) -> str:
    if not np.isfinite(x):
        return "–"
    v = x / scale
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_metric(x: float, metric: str) -> str:
    """A value of a result column in human units, chosen by the unit in the column's name."""
    unit, scale = pick_unit([abs(x)], metric)
    return f"{fmt_scaled(x, scale)} {unit}".rstrip() if np.isfinite(x) else "–"


def fmt_bytes(x: float) -> str:
    return fmt_metric(x, "_bytes")


def fmt_count(x: float, unit: str = "") -> str:
    """E.g. ``fmt_count(8e10, "FLOP/s") == "80 GFLOP/s"``."""
    prefix, scale = pick_unit([abs(x)], "count")
    return f"{fmt_scaled(x, scale)} {prefix}{unit}".rstrip() if np.isfinite(x) else "–"
