"""Result rows as tables of strings, and the one writer that renders them as Markdown, HTML or a rich table.

summary.md, report.md/html and the terminal all show the same tables, built here: a model x L table of one
metric per (workload, batch), with failures shown in place and noisy timings marked †.
"""

from __future__ import annotations

import html
import math

import pandas as pd
from rich.markup import escape
from rich.table import Table

from seqbench.analysis.runs import METRIC_LABELS, STATUS_LABELS, WORKLOAD_METRICS, model_order, ok_rows, pivot
from seqbench.formatting import fmt_bytes, fmt_count, fmt_metric, fmt_scaled, pick_unit

TIMED = ("time_median_s", "latency_per_token_s", "tokens_per_s")
# The one metric per workload that the summary and the terminal show (decode adds its cache bytes).
HEADLINE = {"prefill": "tokens_per_s", "decode": "latency_per_token_s", "train": "tokens_per_s"}
NOISY_MARK = "†"


def headline_metrics(workload: str) -> list[str]:
    return [HEADLINE[workload]] + (["cache_bytes"] if workload == "decode" else [])


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
                out.loc[model, str(L)] = text + (NOISY_MARK if metric in TIMED and noisy.loc[model, L] == True else "")  # noqa: E712
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


def metric_tables(df: pd.DataFrame, metrics_of) -> list[tuple[str, pd.DataFrame]]:
    """(title, model × L table) for each (workload, batch) and each metric ``metrics_of(workload)`` names
    that has at least one measured value in that cell."""
    out = []
    for workload, batch in cells(df):
        cell = ok_rows(df[(df["workload"] == workload) & (df["batch"] == batch)])
        for metric in metrics_of(workload):
            if cell[metric].notna().any():
                table, unit = metric_table(df, metric, workload, batch)
                out.append((f"{workload} {METRIC_LABELS[metric]}{unit}, batch {batch}", table))
    return out


def cells(df: pd.DataFrame, workloads=None):
    """(workload, batch) pairs present, in the canonical workload order."""
    order = [w for w in WORKLOAD_METRICS if w in set(df["workload"]) and (workloads is None or w in workloads)]
    return [(w, int(b)) for w in order for b in sorted(df[df["workload"] == w]["batch"].unique())]


# ---- rendering ---------------------------------------------------------------------------------------


def markdown_table(t: pd.DataFrame) -> str:
    esc = [str(c).replace("|", "\\|") for c in t.columns]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" for _ in esc) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines)


def html_table(t: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in t.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def rich_table(t: pd.DataFrame, title: str) -> Table:
    """A rich table; every string is escaped, since units like "[ms]" would otherwise read as markup."""
    table = Table(title=escape(title), title_justify="left", title_style="bold")
    for i, col in enumerate(t.columns):
        table.add_column(escape(str(col)), justify="left" if i == 0 or col in ("detail", "pair") else "right")
    for row in t.itertuples(index=False):
        table.add_row(*[escape(str(v)) for v in row])
    return table


def exponent_matrix(fits: pd.DataFrame) -> pd.DataFrame:
    """Models x metrics, each cell "k ±half" with ✓ when asymptotic: the compact terminal view."""
    cells = {}
    for r in fits.itertuples():
        text = f"{_k(r.slope)} ±{(r.ci_high - r.ci_low) / 2:.2f}{' ✓' if r.asymptotic else ''}" if r.status == "ok" \
            else "too few pts"
        cells.setdefault(r.model, {})[METRIC_LABELS[r.metric]] = text
    return pd.DataFrame.from_dict(cells, orient="index").fillna("–").rename_axis("model").reset_index()


