"""The run report (report.md + a self-contained report.html), the terminal summary, and run comparison.

The report answers the questions of the project in order: where the numbers come from (environment,
models, implementations), what was measured (one model x L table per metric, failures shown in place),
how cost grows (exponents fitted as in ``seqbench.analysis``) and where one architecture overtakes another
(crossovers claimed only beyond noise). ``compare`` treats a change as real only when it leaves both runs'
p25..p75 bands, the rule of thumb of Kalibera & Jones, "Rigorous benchmarking in reasonable time" (ISMM 2013):
compare against the variation you measured, not against zero.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seqbench.analysis import (
    KEYS,
    METRIC_LABELS,
    STATUS_LABELS,
    WORKLOAD_METRICS,
    RunError,
    crossovers,
    exponent_table,
    find_runs,
    fmt_bytes,
    fmt_count,
    fmt_metric,
    fmt_scaled,
    load_meta,
    load_run,
    model_order,
    normalize,
    ok_rows,
    pick_unit,
    pivot,
)
from seqbench.messages import fail

TIMED = ("time_median_s", "latency_per_token_s", "tokens_per_s")
HEADLINE = {"prefill": "tokens_per_s", "decode": "latency_per_token_s", "train": "tokens_per_s"}

# ---- tables as strings --------------------------------------------------------------------------------


def metric_table(df: pd.DataFrame, metric: str, workload: str, batch: int) -> tuple[pd.DataFrame, str]:
    """Model x L strings and the table's unit: times and rates share one unit (named in the returned title
    suffix), bytes get one per cell; † marks noisy timing; failed points show their status."""
    sel = df[(df["workload"] == workload) & (df["batch"] == batch)]
    values, status, noisy = pivot(sel, metric), pivot(sel, "status"), pivot(sel, "noisy")
    per_cell = metric.endswith("_bytes")
    unit, scale = pick_unit(values.to_numpy().ravel(), metric)
    out = pd.DataFrame(index=values.index, columns=[str(c) for c in values.columns], dtype=object)
    for model in values.index:
        for L in values.columns:
            st = status.loc[model, L] if L in status.columns else None
            if not isinstance(st, str):
                out.loc[model, str(L)] = "–"
            elif st != "ok":
                out.loc[model, str(L)] = STATUS_LABELS.get(st, st)
            else:
                v = values.loc[model, L]
                text = fmt_metric(v, metric) if per_cell else fmt_scaled(v, scale)
                out.loc[model, str(L)] = text + ("†" if metric in TIMED and noisy.loc[model, L] == True else "")  # noqa: E712
    return out.reset_index().rename(columns={"index": "model"}), "" if per_cell else f" [{unit}]"


def _k(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 0.005 else "0.00"  # never "-0.00"


def exponent_strings(fits: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in fits.itertuples():
        ok = r.status == "ok"
        rows.append({
            "model": r.model, "metric": r.label, "batch": r.batch,
            "exponent [95% CI]": f"{_k(r.slope)} [{_k(r.ci_low)}, {_k(r.ci_high)}]" if ok else r.status,
            "R²": f"{r.r2:.3f}" if ok and math.isfinite(r.r2) else "–",
            "fitted L": f"{r.l_min:.0f}–{r.l_max:.0f} ({r.n} pts)" if ok else f"{r.n} pts",
            "local slopes": r.local_slopes or "–", "asymptotic": ("yes" if r.asymptotic else "no") if ok else "–",
        })
    return pd.DataFrame(rows)


def crossover_strings(cross: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in cross.itertuples():
        found = r.status == "crossover"
        rows.append({
            "workload": r.workload, "batch": r.batch, "pair": f"{r.model_a} vs {r.model_b}", "result": r.status,
            "bracket": f"{r.l_below:.0f}–{r.l_above:.0f}" if found else "–",
            "≈ L": f"{r.l_cross:.0f}" if found else "–",
            "time ratio a/b": f"{r.ratio_min:.2f}–{r.ratio_max:.2f}" if pd.notna(r.ratio_min) else "–",
            "detail": r.summary,
        })
    return pd.DataFrame(rows)


def models_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for model in model_order(df):
        sub = df[df["model"] == model]
        ok = ok_rows(sub)
        impls = ", ".join(sorted({i for i in sub["impl_used"] if i})) or "–"
        flops = ok["flops_per_token"].dropna()
        rows.append({
            "model": model, "kind": sub["kind"].iloc[0], "layout": sub["layout"].iloc[0] or "–", "impl_used": impls,
            "params": fmt_count(sub["param_count"].max()),
            "non-embedding": fmt_count(sub["param_count_non_embedding"].max()),
            "param bytes": fmt_bytes(sub["param_bytes"].max()),
            "FLOPs/token": (fmt_count(flops.min()) if flops.min() == flops.max()
                            else f"{fmt_count(flops.min())}–{fmt_count(flops.max())}") if len(flops) else "–",
        })
    return pd.DataFrame(rows)


def problems_table(df: pd.DataFrame) -> pd.DataFrame:
    bad = df[(df["status"] != "ok") | df["noisy"]]
    rows = [{"model": r.model, "workload": r.workload, "batch": int(r.batch), "L": int(r.seq_len),
             "status": STATUS_LABELS.get(r.status, r.status) if r.status != "ok" else "noisy",
             "detail": (r.error or "")[:160] if r.status != "ok"
             else f"IQR/median = {r.iqr_ratio:.2f}, n = {r.n_samples:.0f}"}
            for r in bad.itertuples()]
    return pd.DataFrame(rows, columns=["model", "workload", "batch", "L", "status", "detail"])


def _metric_tables(df: pd.DataFrame, metrics_of) -> list[tuple[str, pd.DataFrame]]:
    """(title, model × L table) for each (workload, batch) and each metric ``metrics_of(workload)`` names
    that has at least one measured value in that cell."""
    out = []
    for workload, batch in _cells(df):
        cell = ok_rows(df[(df["workload"] == workload) & (df["batch"] == batch)])
        for metric in metrics_of(workload):
            if cell[metric].notna().any():
                table, unit = metric_table(df, metric, workload, batch)
                out.append((f"{workload} {METRIC_LABELS[metric]}{unit}, batch {batch}", table))
    return out


def _cells(df: pd.DataFrame, workloads=None):
    """(workload, batch) pairs present, in the canonical workload order."""
    order = [w for w in WORKLOAD_METRICS if w in set(df["workload"]) and (workloads is None or w in workloads)]
    return [(w, int(b)) for w in order for b in sorted(df[df["workload"] == w]["batch"].unique())]


# ---- report -------------------------------------------------------------------------------------------


def markdown_table(t: pd.DataFrame) -> str:
    esc = [str(c).replace("|", "\\|") for c in t.columns]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" for _ in esc) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(t: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in t.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
        ("p", "Medians. † marks a noisy point (IQR/median > 0.10). Decode rows are per generated token at a "
              "context of L tokens; cache bytes are the KV cache or recurrent state allocated for that context, "
              "summed over its tensors as the sweep recorded them."),
    ]
    for title, table in _metric_tables(df, WORKLOAD_METRICS.get):
        blocks += [("h3", title), ("table", table)]
    blocks += [
        ("h2", "Scaling exponents"),
        ("p", "Log-log OLS slope k in cost ∝ L^k on the largest lengths (≥ 4 points spanning ≥ 8×), 95% CI from "
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


def analyse_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict, pd.DataFrame, pd.DataFrame]:
    """Load a run once and fit it once: (rows, metadata, exponent fits, crossovers)."""
    df = load_run(run_dir)
    return df, load_meta(run_dir), exponent_table(df), crossovers(df)


def make_report(run_dir: str | Path, analysed: tuple | None = None) -> Path:
    """Write plots, ``report.md`` and ``report.html`` (images inline, works offline); returns the .md path.
    ``analysed`` is ``analyse_run(run_dir)`` when the caller already has it."""
    from seqbench.plots import make_plots

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
            body.append(_html_table(value))
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


def _rich(t: pd.DataFrame, title: str) -> Table:
    """A rich table; every string is escaped, since units like "[ms]" would otherwise read as markup."""
    table = Table(title=escape(title), title_justify="left", title_style="bold")
    for i, col in enumerate(t.columns):
        table.add_column(escape(str(col)), justify="left" if i == 0 or col in ("detail", "pair") else "right")
    for row in t.itertuples(index=False):
        table.add_row(*[escape(str(v)) for v in row])
    return table


def _exponent_matrix(fits: pd.DataFrame) -> pd.DataFrame:
    """Models x metrics, each cell "k ±half" with ✓ when asymptotic: the compact terminal view."""
    cells = {}
    for r in fits.itertuples():
        text = f"{_k(r.slope)} ±{(r.ci_high - r.ci_low) / 2:.2f}{' ✓' if r.asymptotic else ''}" if r.status == "ok" \
            else "too few pts"
        cells.setdefault(r.model, {})[METRIC_LABELS[r.metric]] = text
    return pd.DataFrame.from_dict(cells, orient="index").fillna("–").rename_axis("model").reset_index()


def render_summary(console: Console, df: pd.DataFrame, fits: pd.DataFrame | None = None,
                   cross: pd.DataFrame | None = None) -> None:
    """The key tables in the terminal: headline metric (and cache) per (workload, batch), exponents, crossovers.

    ``df`` may come straight from the sweep's rows (None for unmeasured values); it is normalized here.
    ``fits`` and ``cross`` are computed here unless the caller already has them.
    """
    df = normalize(df)
    for title, table in _metric_tables(df, lambda w: [HEADLINE[w]] + (["cache_bytes"] if w == "decode" else [])):
        console.print(_rich(table, title))
    fits = exponent_table(df) if fits is None else fits
    fits = fits[fits["metric"] != "tokens_per_s"]
    for (workload, batch), grp in fits.groupby(["workload", "batch"], sort=False):
        table = _rich(_exponent_matrix(grp), f"{workload} exponents k, cost ∝ L^k, batch {batch}")
        table.caption, table.caption_justify = "±: 95% CI; ✓: asymptotic", "left"
        console.print(table)
    cross = crossovers(df) if cross is None else cross
    if len(cross):
        view = crossover_strings(cross)
        claimed = view[view["result"] == "crossover"]
        console.print(_rich(claimed[["workload", "batch", "pair", "bracket", "≈ L"]], "crossovers (time)")
                      if len(claimed) else "crossovers (time): none in range for any pair", highlight=False)
    bad = df[df["status"] != "ok"]
    if len(bad):
        counts = ", ".join(f"{STATUS_LABELS.get(k, k)} {v}" for k, v in bad["status"].value_counts().items())
        console.print(f"failed or skipped points: {counts}", highlight=False)


# ---- compare ------------------------------------------------------------------------------------------


def compare_runs(run_a: str | Path, run_b: str | Path, threshold: float = 1.10,
                 min_ratio: float = 1.05) -> tuple[pd.DataFrame, bool]:
    """Per-point time ratio B/A for the points both runs hold, and whether B has a flagged slowdown.

    A change is real when the two p25..p75 bands do not overlap and the medians differ by more than
    ``min_ratio``; it is flagged when B is slower by more than ``threshold``, or when a point A measured
    fails in B (a new OOM or timeout is a regression too).
    """
    a, b = load_run(run_a), load_run(run_b)
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


# ---- commands (registered in cli.py) ------------------------------------------------------------------


def plot_cmd(path: Annotated[Path, typer.Argument(help="a run folder, or a folder of runs (e.g. results/)")]) -> None:
    """Write plots and report.md/report.html for a run (or every run in a folder) and print the key tables."""
    try:
        runs = find_runs(path)
    except RunError as e:
        fail(str(e))
    out, err = Console(), Console(stderr=True)
    written = 0
    for run in runs:
        try:
            analysed = analyse_run(run)
            report = make_report(run, analysed)
        except RunError as e:
            err.print(f"[yellow]skipped[/] {e}", highlight=False)
            continue
        written += 1
        out.rule(run.name)
        df, _, fits, cross = analysed
        render_summary(out, df, fits, cross)
        err.print(f"report: {report} and {report.with_suffix('.html')}; figures in {run / 'plots'}", highlight=False)
    if not written:
        fail(f"{path}: no run with points to plot")


def compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="the baseline run folder")],
    run_b: Annotated[Path, typer.Argument(help="the new run folder")],
    threshold: Annotated[float, typer.Option(help="fail when a point is slower than this ratio beyond noise")] = 1.10,
) -> None:
    """Per-point time ratios of RUN_B over RUN_A; exit 1 when a slowdown beyond noise exceeds --threshold."""
    try:
        table, flagged = compare_runs(run_a, run_b, threshold)
    except RunError as e:
        fail(str(e))
    out = Console()
    if table.empty:
        fail(f"{run_a} and {run_b} share no grid points")
    for note in table.attrs.get("mismatch", []):
        out.print(f"[yellow]warning:[/] runs differ in {note}", highlight=False)
    shown = table[~table["change"].isin(["within noise", "failed in both"])]
    view = pd.DataFrame({
        "model": shown["model"], "workload": shown["workload"], "batch": shown["batch"], "L": shown["seq_len"],
        "A": shown["time_a_s"].map(lambda v: fmt_metric(v, "_s")),
        "B": shown["time_b_s"].map(lambda v: fmt_metric(v, "_s")),
        "B/A": shown["ratio"].map(lambda v: f"{v:.2f}×" if math.isfinite(v) else "–"),
        "change": shown["change"] + shown["flagged"].map({True: " (flagged)", False: ""}),
    })
    if len(view):
        out.print(_rich(view, f"time changes beyond noise, B = {Path(run_b).name} vs A = {Path(run_a).name}"))
    ok = table["ratio"].dropna()
    counts = table["change"].value_counts().to_dict()
    gm = math.exp(ok.map(math.log).mean()) if len(ok) else math.nan
    out.print(f"{len(table)} shared points; geometric-mean time ratio B/A {gm:.3f}; "
              + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    if flagged:
        out.print(f"[bold red]{int(table['flagged'].sum())} point(s) slower than {threshold:.2f}× beyond noise "
                  "or newly failing[/]")
        raise typer.Exit(1)
