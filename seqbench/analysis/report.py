"""The run report: report.md and a self-contained report.html (figures inline), in the order of the project's
questions: where the numbers come from (environment, models, implementations), what was measured (one model
x L table per metric, failures shown in place), how cost grows (exponents) and where one architecture
overtakes another (crossovers claimed only beyond noise).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

from seqbench.analysis.fits import crossovers, exponent_table
from seqbench.analysis.recall import recall_sections, split_rows
from seqbench.analysis.runs import WORKLOAD_METRICS, load_meta, load_run
from seqbench.analysis.tables import (
    NOISY_MARK,
    crossover_strings,
    exponent_strings,
    html_table,
    markdown_table,
    metric_tables,
    models_table,
    problems_table,
)
from seqbench.formatting import fmt_count

CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}td,th{border:1px solid #ccc;"
       "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
       "img{max-width:100%;border:1px solid #eee;margin:.5em 0}figcaption{color:#555;font-size:.85em}")


def _blocks(run_dir: Path, df: pd.DataFrame, meta: dict, figures: list[Path], fits: pd.DataFrame,
            cross: pd.DataFrame) -> list[tuple]:
    env, cal, cfg = meta["env"], meta["calibration"], meta["config"]
    kernels = env.get("kernels") or {}
    env_rows = [(k, env.get(k)) for k in ("python", "torch", "cuda", "device", "device_name", "cpu_model", "cores",
                                          "threads", "dtype", "seed") if k in env]
    env_rows.append(("git", f"{env.get('git_commit', '?')}{' (dirty)' if env.get('git_dirty') else ''}"))
    env_rows.append(("optional kernels", ", ".join(f"{k} {v or '–'}" for k, v in kernels.items()) or "–"))
    if cal:
        env_rows.append(("calibrated peaks", f"{fmt_count(cal.get('peak_flops_per_s', math.nan), 'FLOP/s')}, "
                                             f"{fmt_count(cal.get('peak_bytes_per_s', math.nan), 'B/s')}"))
    sweep = cfg.get("sweep") or {}
    if sweep:
        env_rows.append(("sweep", f"L {sweep.get('seq_lens')}, batch {sweep.get('batch')}, "
                                  f"workloads {sweep.get('workloads')}, new_tokens {sweep.get('new_tokens')}"))
    name = cfg.get("name") or run_dir.name
    n_ok = int((df["status"] == "ok").sum())
    blocks: list[tuple] = [
        ("h1", f"seqbench report: {name}"),
        ("p", f"Run folder {run_dir.name}: {len(df)} grid points, {n_ok} measured, {len(df) - n_ok} failed or "
              "skipped (shown in place, never dropped)."),
        ("h2", "Environment"), ("table", pd.DataFrame(env_rows, columns=["key", "value"])),
        ("h2", "Models"), ("table", models_table(df)),
        ("h2", "Measurements (model × L)"),
        ("p", f"Medians. {NOISY_MARK} marks a noisy point (IQR/median > 0.10). Decode rows are per generated "
              "token at a context of L tokens; cache bytes are the KV cache or recurrent state allocated for that "
              "context, summed over its tensors as the sweep recorded them."),
    ]
    cost, probes = split_rows(df)
    for title, table in metric_tables(cost, WORKLOAD_METRICS.get):
        blocks += [("h3", title), ("table", table)]
    if len(probes):
        blocks += [("h2", "Recall probes (trained in the run)"),
                   ("p", "Each probe point trains a fresh model from the seed on MQAR sequences (Zoology §3) and "
                         "scores it on held-out sequences (docs/design.md, Recall probes).")]
        for title, text, table in recall_sections(probes):
            blocks += [("h3", title.removeprefix("recall: ")), ("p", text), ("table", table)]
    blocks += [
        ("h2", "Scaling exponents"),
        ("p", "Log-log OLS slope k in cost ∝ L^k on every measured length from the fit start, "
              f"{fit_start_label(fits)} (`seqbench plot --fit-from L` moves it; at least 4 lengths), 95% CI from "
              "the t distribution. Local slopes are between adjacent measured lengths; 'asymptotic' means the "
              "local slopes inside the fitted range agree within 0.1, otherwise the slope is still drifting (the "
              "fit bounds the asymptote from one side) or the data are too noisy to tell; the CI says which."),
        ("table", exponent_strings(fits)),
        ("h2", "Crossovers"),
        ("p", "A crossover is claimed only where the median time ratio changes sides of 1 with both models' "
              "p25–p75 bands separated on each side; the bracket gives the measured lengths around it and ≈ L "
              "the log-log interpolation."),
        ("table", crossover_strings(cross)),
        ("h2", "Noisy and failed points"),
    ]
    problems = problems_table(df)
    blocks.append(("table", problems) if len(problems) else ("p", "None."))
    blocks.append(("h2", "Figures"))
    blocks += [("img", p) for p in figures if p.suffix == ".png"]
    return blocks


def fit_start_label(fits: pd.DataFrame) -> str:
    fit_from = fits.attrs.get("fit_from")
    return "the top three octaves of each series (L ≥ max L / 8)" if fit_from is None else f"L ≥ {fit_from:g}"


def analyse_run(run_dir: str | Path, fit_from: float | None = None) -> tuple[pd.DataFrame, dict, pd.DataFrame,
                                                                              pd.DataFrame]:
    """Load a run once and fit it once (from ``fit_from``, by default the top three octaves):
    (rows, metadata, exponent fits, crossovers)."""
    df = load_run(run_dir)
    cost, _ = split_rows(df)
    return df, load_meta(run_dir), exponent_table(cost, fit_from), crossovers(cost)


def make_report(run_dir: str | Path, analysed: tuple | None = None) -> Path:
    """Write plots, ``report.md`` and ``report.html`` (images inline, works offline); returns the .md path.
    ``analysed`` is ``analyse_run(run_dir)`` when the caller already has it."""
    from seqbench.analysis.plots import make_plots

    run_dir = Path(run_dir)
    df, meta, fits, cross = analysed or analyse_run(run_dir)
    figures = make_plots(run_dir, df, meta, fits=fits)
    md, body = [], []
    for kind, value in _blocks(run_dir, df, meta, figures, fits, cross):
        if kind in ("h1", "h2", "h3"):
            md.append("#" * int(kind[1]) + " " + value)
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            md.append(value)
            body.append(f"<p>{html.escape(value)}</p>")
        elif kind == "table":
            md.append(markdown_table(value))
            body.append(html_table(value))
        else:
            md.append(f"![{value.stem}]({value.relative_to(run_dir).as_posix()})")
            data = base64.b64encode(value.read_bytes()).decode()
            body.append(f'<figure><img alt="{value.stem}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{value.stem} (SVG: {value.with_suffix('.svg').name})</figcaption></figure>")
    (run_dir / "report.md").write_text("\n\n".join(md) + "\n")
    title = html.escape(f"seqbench report: {run_dir.name}")
    (run_dir / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                                         f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return run_dir / "report.md"
