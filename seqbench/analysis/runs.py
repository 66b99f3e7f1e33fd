"""Run folders as data frames: find runs, load their rows and metadata, and pivot them to model x length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

KEYS = ["model", "workload", "batch", "seq_len"]
NUMERIC = [
    "batch", "seq_len", "new_tokens", "threads", "n_samples", "first_call_s", "time_median_s", "time_p25_s",
    "time_p75_s", "time_min_s", "iqr_ratio", "tokens_per_s", "latency_per_token_s", "cache_bytes", "peak_mem_bytes",
    "param_count", "param_bytes", "flops_per_token", "achieved_flops_per_s", "achieved_bytes_per_s",
    "param_count_non_embedding", "frac_peak_flops", "frac_peak_bytes", "latency_p90_s", "peak_rss_bytes",
    "remeasure_rounds",
    "n_pairs", "accuracy", "train_steps", "train_s", "final_loss",  # recall probes
]
TEXT = ["run_id", "model", "kind", "layout", "impl_used", "device", "dtype", "workload", "status", "error",
        "cache_dtype", "accuracy_by_len"]
# Which columns are scaling metrics for each workload (decode time_* equals the per-token latency).
WORKLOAD_METRICS = {
    "prefill": ("time_median_s", "tokens_per_s", "peak_mem_bytes"),
    "decode": ("latency_per_token_s", "cache_bytes", "peak_mem_bytes"),
    "train": ("time_median_s", "tokens_per_s", "peak_mem_bytes"),
}
METRIC_LABELS = {
    "time_median_s": "time", "tokens_per_s": "tokens/s", "latency_per_token_s": "latency/token",
    "cache_bytes": "cache bytes", "peak_mem_bytes": "peak memory",
}
STATUS_LABELS = {
    "oom": "OOM", "oom_killed": "OOM (killed)", "timeout": "timeout", "error": "error",
    "skipped_after_oom": "skipped (OOM)", "skipped_after_timeout": "skipped (timeout)",
}


class RunError(Exception):
    """A run folder that cannot be read, phrased for the user."""


# ---- loading ------------------------------------------------------------------------------------------


def _is_run(path: Path) -> bool:
    return (path / "points.jsonl").is_file() or (path / "results.csv").is_file()


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself if it is a run folder, else its run sub-folders (e.g. ``results/``), oldest name first."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such folder")
    if _is_run(path):
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run(p))
    if not runs:
        raise RunError(f"{path}: no run here (expected points.jsonl or results.csv, or sub-folders holding them)")
    return runs


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write; every finished point is on its own line
    return rows


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One row per grid point, numeric columns as floats (NaN when unmeasured), in run order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such folder")
    if (run_dir / "points.jsonl").is_file():
        df = pd.DataFrame(_read_jsonl(run_dir / "points.jsonl"))
    elif (run_dir / "results.csv").is_file():
        df = pd.read_csv(run_dir / "results.csv")
    else:
        raise RunError(f"{run_dir}: not a run folder (no points.jsonl or results.csv)")
    if df.empty:
        raise RunError(f"{run_dir}: the run has no points yet")
    df = normalize(df)
    df.attrs["run_dir"] = str(run_dir)
    return df


def normalize(rows: pd.DataFrame | list[dict]) -> pd.DataFrame:
    """Result rows (dicts or a frame, e.g. straight from the sweep) with every column present and typed."""
    df = pd.DataFrame(rows).copy()
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float) if col in df else np.nan
    for col in TEXT:
        df[col] = df[col].fillna("").astype(str) if col in df else ""
    flag = lambda v: v.strip().lower() == "true" if isinstance(v, str) else bool(v) if pd.notna(v) else False  # noqa: E731
    df["noisy"] = df["noisy"].map(flag).astype(bool) if "noisy" in df else False
    # A resumed run may hold a point twice; the last record wins.
    return df.drop_duplicates(subset=[*KEYS, "n_pairs"], keep="last").reset_index(drop=True)


def load_meta(run_dir: str | Path) -> dict:
    """``config``, ``env`` and ``calibration`` of a run (each ``{}`` when the file is missing)."""
    import yaml

    run_dir = Path(run_dir)
    out: dict = {"config": {}, "env": {}, "calibration": {}}
    for key, name, reader in (("config", "config.yaml", yaml.safe_load), ("env", "env.json", json.loads),
                              ("calibration", "calibration.json", json.loads)):
        path = run_dir / name
        if path.is_file():
            try:
                out[key] = reader(path.read_text()) or {}
            except (ValueError, yaml.YAMLError):
                out[key] = {}
    return out


def model_order(df: pd.DataFrame) -> list[str]:
    """Models in the order the run first recorded them (config order), so colours and rows stay stable."""
    return list(dict.fromkeys(df["model"]))


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


# ---- tables -------------------------------------------------------------------------------------------


def pivot(df: pd.DataFrame, metric: str, workload: str | None = None, batch: int | None = None) -> pd.DataFrame:
    """Model x L table of ``metric`` (NaN where the point failed; "status" and "noisy" are shown as recorded).

    Rows are models in run order, or (model, batch) when the selection holds several batches.
    """
    sel = df if workload is None else df[df["workload"] == workload]
    if batch is not None:
        sel = sel[sel["batch"] == batch]
    raw = metric in ("status", "noisy")
    vals = sel.assign(value=sel[metric] if raw else sel[metric].where(sel["status"] == "ok"))
    index = ["model"] if sel["batch"].nunique() <= 1 else ["model", "batch"]
    table = vals.pivot_table(index=index, columns="seq_len", values="value", aggfunc="first", dropna=raw)
    order = [m for m in model_order(df) if m in set(sel["model"])]
    table = table.reindex(order, level=0) if len(index) > 1 else table.reindex(order)
    table.columns = [int(c) for c in table.columns]
    return table
