"""Scaling exponents and crossovers from result rows.

Scaling exponents follow the usual empirical-complexity recipe (Goldsmith, Aiken & Wilkerson,
"Measuring empirical computational complexity", FSE 2007): fit ``log cost = k log L + c`` by OLS, but only
on the lengths from a fit start on (default: the top three octaves), because lower-order terms dominate
small inputs. For attention, prefill
time is ``a L + b L^2`` (Vaswani et al. 2017; Dao et al., FlashAttention 2022) and the global slope sits
between 1 and 2; the local slopes between adjacent lengths show whether the largest lengths have reached
the asymptotic regime. SSMs (S4: Gu et al. 2022; Mamba: Gu & Dao 2023; Mamba-2: Dao & Gu 2024) are linear
in prefill and constant per decoded token, so the fits double as a check of those claims on real hardware.

The 95% confidence interval uses the Student t quantile with n - 2 degrees of freedom, computed from the
closed-form t CDF for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4) so scipy is not needed.
A crossover between two models is claimed only where their time ratio leaves the noise band on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations, pairwise
from statistics import NormalDist

import numpy as np
import pandas as pd

from seqbench.analysis.runs import METRIC_LABELS, WORKLOAD_METRICS, model_order, ok_rows

# ---- exponent fits ------------------------------------------------------------------------------------


def _t_two_sided_prob(theta: float, dof: int) -> float:
    """P(|T| <= sqrt(dof) tan(theta)) for Student t with integer ``dof`` (A&S 26.7.3 / 26.7.4)."""
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c * c * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if dof == 1:
        return 2 * theta / math.pi
    term, total = c, c
    for k in range(1, (dof - 1) // 2):
        term *= c * c * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student t critical value: P(|T| <= q) = level (e.g. 0.95, dof=2 -> 4.303)."""
    if dof < 1:
        raise ValueError("need at least one degree of freedom")
    if dof > 2000:  # normal quantile with the first Cornish-Fisher correction
        z = NormalDist().inv_cdf((1 + level) / 2)
        return z + (z**3 + z) / (4 * dof)
    lo, hi = 0.0, math.pi / 2
    for _ in range(100):  # bisection on theta = atan(t / sqrt(dof)); the probability is monotone in theta
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_prob(mid, dof) < level else (lo, mid)
    return math.sqrt(dof) * math.tan((lo + hi) / 2)


@dataclass
class ExponentFit:
    """A log-log slope with its uncertainty; ``status`` is "ok" or "too few points"."""

    status: str
    slope: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    stderr: float = math.nan
    r2: float = math.nan
    intercept: float = math.nan
    n_points: int = 0
    l_min: float = math.nan
    l_max: float = math.nan
    local_slopes: list[tuple[float, float, float]] = field(default_factory=list)  # (l0, l1, slope)
    asymptotic: bool = False

    def local_str(self) -> str:
        return " ".join(f"{s:+.2f}" for _, _, s in self.local_slopes)


FIT_OCTAVES = 3  # default fit start: the top three octaves of the measured lengths, L >= max L / 2**3


def fit_start(lengths: Sequence[float], fit_from: float | None = None) -> float:
    """The smallest length a fit uses: ``fit_from`` if given, else the top FIT_OCTAVES octaves."""
    return fit_from if fit_from is not None else max(lengths) / 2**FIT_OCTAVES


def fit_exponent(
    lengths: Sequence[float], values: Sequence[float], fit_from: float | None = None, min_points: int = 4,
    agree_tol: float = 0.1, level: float = 0.95,
) -> ExponentFit:
    """Log-log OLS slope of ``values`` against ``lengths``, on every length >= the fit start.

    The fit start is ``fit_from`` (0: every point, the global slope), by default the top three octaves of the
    measured lengths: enough lengths for a CI with several degrees of freedom, few enough that lower-order
    terms have faded. ``asymptotic`` is set only when all local slopes inside the fitted range agree within
    ``agree_tol``. Non-positive or missing values are dropped; repeated lengths are averaged in log space.
    """
    x = np.asarray(lengths, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    frame = pd.DataFrame({"x": x[keep], "ly": np.log(y[keep])}).groupby("x", as_index=False).mean()
    xs, ly = frame["x"].to_numpy(), frame["ly"].to_numpy()  # sorted by length
    lx = np.log(xs)
    local = [(float(xs[i]), float(xs[i + 1]), float((ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])))
             for i in range(len(lx) - 1)]
    start = int(np.searchsorted(xs, fit_start(xs, fit_from) * (1 - 1e-9))) if len(xs) else 0
    if len(xs) - start < min_points:
        return ExponentFit("too few points", n_points=len(xs) - start, local_slopes=local)
    fx, fy = lx[start:], ly[start:]
    n = len(fx)
    dx, dy = fx - fx.mean(), fy - fy.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ dy) / sxx
    intercept = float(fy.mean() - slope * fx.mean())
    resid = fy - (intercept + slope * fx)
    ss_res, ss_tot = float(resid @ resid), float(dy @ dy)
    stderr = math.sqrt(ss_res / (n - 2) / sxx)
    half = t_quantile(level, n - 2) * stderr
    scale = max(ss_tot, float(fy @ fy), 1.0) * 1e-20
    r2 = 1.0 - ss_res / ss_tot if ss_tot > scale else (1.0 if ss_res <= scale else math.nan)
    window = [s for _, _, s in local[start:]]
    return ExponentFit(
        "ok", slope, slope - half, slope + half, stderr, r2, intercept, n, float(xs[start]), float(xs[-1]), local,
        bool(max(window) - min(window) <= agree_tol),
    )


def exponent_table(df: pd.DataFrame, fit_from: float | None = None, **fit_kwargs) -> pd.DataFrame:
    """One row per (model, workload, batch, metric) with the fitted exponent of the metric against L.
    ``attrs["fit_from"]`` keeps the fit start asked for (None: the top three octaves of each series)."""
    rows = []
    ok = ok_rows(df)
    order = {m: i for i, m in enumerate(model_order(df))}
    for (model, workload, batch), grp in ok.groupby(["model", "workload", "batch"], sort=False):
        for metric in WORKLOAD_METRICS.get(workload, ()):
            if grp[metric].notna().sum() == 0:
                continue
            fit = fit_exponent(grp["seq_len"], grp[metric], fit_from, **fit_kwargs)
            rows.append({
                "model": model, "kind": grp["kind"].iloc[0], "workload": workload, "batch": int(batch),
                "metric": metric, "label": f"{workload} {METRIC_LABELS[metric]}", "status": fit.status,
                "slope": fit.slope, "ci_low": fit.ci_low, "ci_high": fit.ci_high, "r2": fit.r2, "n": fit.n_points,
                "l_min": fit.l_min, "l_max": fit.l_max, "local_slopes": fit.local_str(), "asymptotic": fit.asymptotic,
                "_order": order[model],
            })
    cols = ["model", "kind", "workload", "batch", "metric", "label", "status", "slope", "ci_low", "ci_high", "r2",
            "n", "l_min", "l_max", "local_slopes", "asymptotic"]
    if not rows:
        out = pd.DataFrame(columns=cols)
    else:
        out = pd.DataFrame(rows)
        wl = {w: i for i, w in enumerate(WORKLOAD_METRICS)}
        out["_w"] = out["workload"].map(wl)
        out["_m"] = out.apply(lambda r: WORKLOAD_METRICS[r.workload].index(r.metric), 1)
        out = out.sort_values(["_w", "batch", "_m", "_order"])[cols].reset_index(drop=True)
    out.attrs["fit_from"] = fit_from
    return out


# ---- crossovers ---------------------------------------------------------------------------------------


def _side(a: pd.Series, b: pd.Series, margin: float) -> int:
    """+1 when a is slower than b beyond both noise bands (and by > margin), -1 when faster, 0 when tied."""
    if a["time_p25_s"] > b["time_p75_s"] and a["time_median_s"] > b["time_median_s"] * (1 + margin):
        return 1
    if a["time_p75_s"] < b["time_p25_s"] and a["time_median_s"] * (1 + margin) < b["time_median_s"]:
        return -1
    return 0


def crossovers(df: pd.DataFrame, margin: float = 0.02) -> pd.DataFrame:
    """Where one model's time overtakes another's, for every pair of models per (workload, batch).

    A point is decided only when the p25..p75 bands of the two models do not overlap and the medians differ
    by more than ``margin``; a crossover is two decided points of opposite sign (ties may lie between them).
    The crossing length is interpolated in log-log space where the median ratio changes sides of 1.
    """
    rows = []
    ok = ok_rows(df).copy()
    for col in ("time_p25_s", "time_p75_s"):
        ok[col] = ok[col].fillna(ok["time_median_s"])
    models = model_order(df)
    for (workload, batch), grp in ok.groupby(["workload", "batch"], sort=False):
        for a, b in combinations([m for m in models if m in set(grp["model"])], 2):
            ta = grp[grp["model"] == a].set_index("seq_len")
            tb = grp[grp["model"] == b].set_index("seq_len")
            shared = sorted(int(L) for L in set(ta.index) & set(tb.index))
            base = {"workload": workload, "batch": int(batch), "model_a": a, "model_b": b}
            if len(shared) < 2:
                rows.append({**base, "status": "too few shared lengths", "summary": "too few shared lengths"})
                continue
            ratio = np.array([ta.loc[L, "time_median_s"] / tb.loc[L, "time_median_s"] for L in shared])
            sides = [_side(ta.loc[L], tb.loc[L], margin) for L in shared]
            span = f"{shared[0]}–{shared[-1]}"
            base |= {"ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()), "lengths": span}
            decided = [(i, s) for i, s in enumerate(sides) if s != 0]
            found = False
            for (i, si), (j, sj) in pairwise(decided):
                if si == sj:
                    continue
                k = next(k for k in range(i, j) if (ratio[k] - 1) * (ratio[k + 1] - 1) <= 0)
                lr0, lr1 = math.log(ratio[k]), math.log(ratio[k + 1])
                frac = lr0 / (lr0 - lr1) if lr0 != lr1 else 0.5
                cross = math.exp(math.log(shared[k]) + frac * (math.log(shared[k + 1]) - math.log(shared[k])))
                before, after = (b, a) if si > 0 else (a, b)
                rows.append({**base, "status": "crossover", "l_below": shared[i], "l_above": shared[j],
                             "l_cross": cross, "faster_before": before, "faster_after": after,
                             "summary": f"{after} faster from ~{cross:.0f} (between {shared[i]} and {shared[j]}); "
                                        f"{before} faster below"})
                found = True
            if not found:
                signs = {s for _, s in decided}
                if signs == {1}:
                    text = f"{b} faster at every decided length"
                elif signs == {-1}:
                    text = f"{a} faster at every decided length"
                else:
                    text = "tied within noise"
                if decided and len(decided) < len(shared):
                    text += f" ({len(shared) - len(decided)} of {len(shared)} lengths tied within noise)"
                rows.append({**base, "status": "none in range", "summary": f"none in {span}: {text}"})
    cols = ["workload", "batch", "model_a", "model_b", "status", "l_below", "l_above", "l_cross", "faster_before",
            "faster_after", "ratio_min", "ratio_max", "lengths", "summary"]
    return pd.DataFrame(rows).reindex(columns=cols)
