"""The run's headline tables: summary.md (written at the end of every run, also an interrupted one) and the
terminal summary. Both show the tables ``seqbench.analysis.tables`` builds; the full analysis is the report."""

from __future__ import annotations

import pandas as pd
from rich.console import Console

from seqbench.analysis.fits import crossovers, exponent_table
from seqbench.analysis.recall import recall_sections, split_rows
from seqbench.analysis.runs import STATUS_LABELS, normalize
from seqbench.analysis.tables import (
    NOISY_MARK,
    crossover_strings,
    exponent_matrix,
    headline_metrics,
    markdown_table,
    metric_tables,
    problems_table,
    rich_table,
)


def summary_markdown(rows: pd.DataFrame | list[dict], name: str, planned: int) -> str:
    """summary.md: the headline table of every (workload, batch), then failed and noisy points."""
    out = [f"# {name}: summary", "", f"{len(rows)} of {planned} planned points measured or recorded."]
    if not len(rows):
        return "\n".join(out) + "\n"
    df = normalize(rows)
    if (df["status"] != "ok").any():
        counts = df["status"].value_counts().to_dict()
        out.append("Statuses: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    out.append(f"Medians; {NOISY_MARK} marks a noisy point (IQR / median > 0.10).")
    cost, probes = split_rows(df)
    for title, table in metric_tables(cost, headline_metrics):
        out += ["", f"## {title}", "", markdown_table(table)]
    for title, text, table in recall_sections(probes):
        out += ["", f"## {title}", "", text, "", markdown_table(table)]
    problems = problems_table(df)
    if len(problems):
        out += ["", "## failed, skipped or noisy points", "", markdown_table(problems)]
    return "\n".join(out) + "\n"


def render_summary(console: Console, df: pd.DataFrame | list[dict], fits: pd.DataFrame | None = None,
                   cross: pd.DataFrame | None = None) -> None:
    """The key tables in the terminal: headline metric (and cache) per (workload, batch), exponents, crossovers.

    ``df`` may come straight from the sweep's rows (None for unmeasured values); it is normalized here.
    ``fits`` and ``cross`` are computed here unless the caller already has them.
    """
    everything = normalize(df)
    df, probes = split_rows(everything)
    for title, table in metric_tables(df, headline_metrics):
        console.print(rich_table(table, title))
    fits = exponent_table(df) if fits is None else fits
    fits = fits[fits["metric"] != "tokens_per_s"]
    for (workload, batch), grp in fits.groupby(["workload", "batch"], sort=False):
        table = rich_table(exponent_matrix(grp), f"{workload} exponents k, cost ∝ L^k, batch {batch}")
        table.caption, table.caption_justify = "±: 95% CI; ✓: asymptotic", "left"
        console.print(table)
    cross = crossovers(df) if cross is None else cross
    if len(cross):
        view = crossover_strings(cross)
        claimed = view[view["result"] == "crossover"]
        console.print(rich_table(claimed[["workload", "batch", "pair", "bracket", "≈ L"]], "crossovers (time)")
                      if len(claimed) else "crossovers (time): none in range for any pair", highlight=False)
    for title, _, table in recall_sections(probes):
        console.print(rich_table(table, title))
    bad = everything[everything["status"] != "ok"]
    if len(bad):
        counts = ", ".join(f"{STATUS_LABELS.get(k, k)} {v}" for k, v in bad["status"].value_counts().items())
        console.print(f"failed or skipped points: {counts}", highlight=False)


