"""summary.md: the headline figure of every point as model × length tables, plus failures. Written at the end
of every run (also an interrupted one); the full analysis is ``seqbench plot``'s report."""

from __future__ import annotations

import pandas as pd

from seqbench.analysis import fmt_bytes
from seqbench.report import markdown_table

HEADLINE = {
    "prefill": ("tokens_per_s", "prefill throughput (tokens/s)"),
    "decode": ("latency_per_token_s", "decode latency per token (ms) at context L"),
    "train": ("tokens_per_s", "train throughput, forward+backward (tokens/s)"),
}


def _cell(row: pd.Series, metric: str) -> str:
    if row["status"] != "ok":
        return row["status"]
    v = row[metric]
    if metric == "latency_per_token_s":
        return f"{v * 1e3:.3g}" + ("~" if row.get("noisy") else "")
    return f"{v:,.0f}" + ("~" if row.get("noisy") else "")


def headline_pivot(df: pd.DataFrame, workload: str, batch: int) -> pd.DataFrame:
    metric, _ = HEADLINE[workload]
    sub = df[(df.workload == workload) & (df.batch == batch)]
    lengths = sorted(sub.seq_len.unique())
    table = {"model": [], "impl_used": []}
    for L in lengths:
        table[str(L)] = []
    for model in dict.fromkeys(sub.model):
        rows = sub[sub.model == model]
        impls = [i for i in rows.impl_used.dropna().unique()]
        table["model"].append(model)
        table["impl_used"].append(",".join(impls) or "—")
        for L in lengths:
            r = rows[rows.seq_len == L]
            table[str(L)].append(_cell(r.iloc[0], metric) if len(r) else "—")
    return pd.DataFrame(table)


def summary_markdown(df: pd.DataFrame, name: str, planned: int) -> str:
    out = [f"# {name}: summary", "", f"{len(df)} of {planned} planned points measured or recorded."]
    if len(df) and (df.status != "ok").any():
        counts = df.status.value_counts().to_dict()
        out.append("Statuses: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    out.append("`~` marks a noisy point (IQR / median > 0.10).")
    for workload in dict.fromkeys(df.workload) if len(df) else []:
        for batch in sorted(df[df.workload == workload].batch.unique()):
            out += ["", f"## {workload}, batch {batch}: {HEADLINE[workload][1]}", ""]
            out.append(markdown_table(headline_pivot(df, workload, batch)))
    decode = df[(df.workload == "decode") & (df.status == "ok")] if len(df) else df
    if len(decode):
        cache = decode.pivot_table(index="model", columns="seq_len", values="cache_bytes", aggfunc="first", sort=False)
        cache = cache.map(fmt_bytes).reset_index()
        cache.columns = [str(c) for c in cache.columns]
        out += ["", "## cache bytes at context L (KV cache or recurrent state)", "", markdown_table(cache)]
    failed = df[df.status != "ok"] if len(df) else df
    if len(failed):
        out += ["", "## failed or skipped points", ""]
        out.append(markdown_table(failed[["model", "workload", "batch", "seq_len", "status", "error"]].fillna("")))
    return "\n".join(out) + "\n"
