"""Compare two runs point by point: a change is real only when it leaves both runs' p25..p75 bands, the rule of
thumb of Kalibera & Jones, "Rigorous benchmarking in reasonable time" (ISMM 2013): compare against the
variation you measured, not against zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from seqbench.analysis.recall import split_rows
from seqbench.analysis.runs import KEYS, STATUS_LABELS, load_run
from seqbench.formatting import fmt_metric


def compare_runs(run_a: str | Path, run_b: str | Path, threshold: float = 1.10,
                 min_ratio: float = 1.05) -> tuple[pd.DataFrame, bool]:
    """Per-point time ratio B/A for the points both runs hold, and whether B has a flagged slowdown.

    A change is real when the two p25..p75 bands do not overlap and the medians differ by more than
    ``min_ratio``; it is flagged when B is slower by more than ``threshold``, or when a point A measured
    fails in B (a new OOM or timeout is a regression too).
    """
    a, b = (split_rows(load_run(run))[0] for run in (run_a, run_b))  # recall probes have no time to compare
    for df in (a, b):  # without percentiles, only the ratio minimum separates change from noise
        df["time_p25_s"] = df["time_p25_s"].fillna(df["time_median_s"])
        df["time_p75_s"] = df["time_p75_s"].fillna(df["time_median_s"])
    m = a.merge(b, on=KEYS, suffixes=("_a", "_b"))
    rows = []
    for r in m.itertuples():
        row = {"model": r.model, "workload": r.workload, "batch": int(r.batch), "seq_len": int(r.seq_len),
               "status_a": r.status_a, "status_b": r.status_b, "time_a_s": r.time_median_s_a,
               "time_b_s": r.time_median_s_b, "ratio": math.nan, "change": "", "flagged": False}
        if r.status_a == "ok" and r.status_b == "ok":
            ratio = r.time_median_s_b / r.time_median_s_a
            row["ratio"] = ratio
            if r.time_p25_s_b > r.time_p75_s_a and ratio > min_ratio:
                row["change"], row["flagged"] = "slower", ratio > threshold
            elif r.time_p75_s_b < r.time_p25_s_a and ratio < 1 / min_ratio:
                row["change"] = "faster"
            else:
                row["change"] = "within noise"
        elif r.status_a == "ok":
            row["change"], row["flagged"] = f"now {STATUS_LABELS.get(r.status_b, r.status_b)}", True
        elif r.status_b == "ok":
            row["change"] = "now ok"
        else:
            row["change"] = "failed in both"
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*KEYS, "status_a", "status_b", "time_a_s", "time_b_s", "ratio", "change",
                                        "flagged"])
    table.attrs["mismatch"] = [f"{k}: {a[k].iloc[0]} vs {b[k].iloc[0]}" for k in ("device", "dtype", "threads")
                               if str(a[k].iloc[0]) != str(b[k].iloc[0])]
    return table, bool(table["flagged"].any())


def changes_view(table: pd.DataFrame) -> pd.DataFrame:
    """The points whose time changed beyond noise (or whose status changed), as strings."""
    shown = table[~table["change"].isin(["within noise", "failed in both"])]
    return pd.DataFrame({
        "model": shown["model"], "workload": shown["workload"], "batch": shown["batch"], "L": shown["seq_len"],
        "A": shown["time_a_s"].map(lambda v: fmt_metric(v, "_s")),
        "B": shown["time_b_s"].map(lambda v: fmt_metric(v, "_s")),
        "B/A": shown["ratio"].map(lambda v: f"{v:.2f}×" if math.isfinite(v) else "–"),
        "change": shown["change"] + shown["flagged"].map({True: " (flagged)", False: ""}),
    })


def headline(table: pd.DataFrame) -> str:
    """Shared points, the geometric-mean time ratio and how many points changed which way."""
    ok = table["ratio"].dropna()
    counts = table["change"].value_counts().to_dict()
    gm = math.exp(ok.map(math.log).mean()) if len(ok) else math.nan
    return (f"{len(table)} shared points; geometric-mean time ratio B/A {gm:.3f}; "
            + ", ".join(f"{k} {v}" for k, v in counts.items()))
