"""Recall beside cost: tables and the figure of a run's recall-probe rows (seqbench/probes).

- accuracy against the number of key-value pairs D, per model and probe length (MQAR);
- the Pareto view: accuracy against the bytes of KV cache or recurrent state the model allocates for one
  sequence of the probe length (``cache_bytes``, counted by ``allocate_cache`` like the decode workload). A
  model is on the frontier when no other model reaches at least its accuracy with at most its bytes;
- the length-extrapolation probe: accuracy at the training length and at each longer test length.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from seqbench.analysis.runs import STATUS_LABELS, model_order
from seqbench.config import PROBE_TASKS
from seqbench.formatting import fmt_bytes


def split_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cost rows, probe rows) of a run's frame."""
    probe = df["workload"].isin(PROBE_TASKS)
    return df[~probe], df[probe]


def _acc(r) -> str:
    return f"{r.accuracy:.2f}" if r.status == "ok" else STATUS_LABELS.get(r.status, r.status)


def accuracy_table(probes: pd.DataFrame, seq_len: int) -> pd.DataFrame:
    """Model x D accuracies of the MQAR probe at ``seq_len``, with each model's cache bytes there."""
    sub = probes[(probes["workload"] == "mqar") & (probes["seq_len"] == seq_len)]
    pairs = sorted(int(d) for d in sub["n_pairs"].unique())
    rows = []
    for model in model_order(sub):
        cells = {int(r.n_pairs): _acc(r) for r in sub[sub["model"] == model].itertuples()}
        cache = sub[(sub["model"] == model) & sub["cache_bytes"].notna()]["cache_bytes"]
        rows.append({"model": model, **{f"D={d}": cells.get(d, "–") for d in pairs},
                     "cache bytes": fmt_bytes(cache.iloc[0]) if len(cache) else "–"})
    return pd.DataFrame(rows)


def pareto_points(probes: pd.DataFrame) -> pd.DataFrame:
    """One point per model at the longest MQAR length and its largest D: cache bytes, accuracy, frontier."""
    sub = probes[(probes["workload"] == "mqar") & (probes["status"] == "ok")]
    if sub.empty:
        return pd.DataFrame(columns=["model", "seq_len", "n_pairs", "cache_bytes", "accuracy", "frontier"])
    seq_len = sub["seq_len"].max()
    sub = sub[sub["seq_len"] == seq_len]
    d = sub["n_pairs"].max()
    pts = sub[sub["n_pairs"] == d][["model", "seq_len", "n_pairs", "cache_bytes", "accuracy"]]
    order = {m: i for i, m in enumerate(model_order(probes))}
    pts = pts.sort_values("model", key=lambda m: m.map(order)).reset_index(drop=True)
    pts["frontier"] = [not ((pts["cache_bytes"] <= r.cache_bytes) & (pts["accuracy"] > r.accuracy)).any()
                       and not ((pts["cache_bytes"] < r.cache_bytes) & (pts["accuracy"] >= r.accuracy)).any()
                       for r in pts.itertuples()]
    return pts


def pareto_table(probes: pd.DataFrame) -> pd.DataFrame:
    pts = pareto_points(probes)
    return pd.DataFrame({
        "model": pts["model"], "cache bytes": pts["cache_bytes"].map(fmt_bytes),
        "accuracy": pts["accuracy"].map(lambda a: f"{a:.2f}"), "Pareto frontier": pts["frontier"].map({True: "yes",
                                                                                                      False: ""}),
    })


def extrapolation_table(probes: pd.DataFrame) -> pd.DataFrame:
    """Model x length accuracies of the extrapolation probe; the first length is the training length."""
    sub = probes[probes["workload"] == "extrapolation"]
    order = {m: i for i, m in enumerate(model_order(probes))}  # config order, not the grid's alternation
    rows, lengths = [], set()
    for r in sorted(sub.itertuples(), key=lambda r: order[r.model]):
        scores = json.loads(r.accuracy_by_len) if r.status == "ok" and r.accuracy_by_len else {}
        lengths |= {int(k) for k in scores}
        rows.append((r.model, int(r.seq_len), scores, r.status))
    lengths = sorted(lengths)
    out = []
    for model, train_len, scores, status in rows:
        failed = STATUS_LABELS.get(status, status)
        out.append({"model": model, **{f"{n}{' (train)' if n == train_len else ''}":
                                       f"{scores[str(n)]:.2f}" if str(n) in scores else failed for n in lengths}})
    return pd.DataFrame(out)


def recall_sections(probes: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(title, explanation, table) for every recall view the probe rows support."""
    out = []
    mqar = probes[probes["workload"] == "mqar"]
    for seq_len in sorted(int(n) for n in mqar["seq_len"].unique()):
        out.append((f"recall: MQAR accuracy vs key-value pairs D, L = {seq_len}",
                    "Exact-match accuracy at the query positions of held-out sequences; cache bytes: the KV cache "
                    "or recurrent state the model allocates for one sequence of L tokens.",
                    accuracy_table(probes, seq_len)))
    pts = pareto_points(probes)
    if len(pts):
        out.append((f"recall: accuracy vs cache bytes (L = {int(pts.seq_len[0])}, D = {int(pts.n_pairs[0])})",
                    "The Pareto view: a model is on the frontier when no other model is at least as accurate "
                    "with no more cache bytes.", pareto_table(probes)))
    if (probes["workload"] == "extrapolation").any():
        out.append(("recall: length extrapolation (accuracy at each test length)",
                    "MQAR trained at the length marked (train), scored on held-out sequences at every length.",
                    extrapolation_table(probes)))
    return out


def recall_figure(probes: pd.DataFrame, colors: dict, out_dir: Path, formats: tuple[str, ...]) -> list[Path]:
    """accuracy vs D per model (longest MQAR length) beside the Pareto view; [] without MQAR rows."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    mqar = probes[(probes["workload"] == "mqar") & (probes["status"] == "ok")]
    pts = pareto_points(probes)
    if mqar.empty:
        return []
    seq_len = int(mqar["seq_len"].max())
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_d, ax_p = fig.subplots(1, 2)
    for model in model_order(mqar):
        sub = mqar[(mqar["model"] == model) & (mqar["seq_len"] == seq_len)].sort_values("n_pairs")
        ax_d.plot(sub["n_pairs"], sub["accuracy"], "o-", color=colors.get(model), label=model)
    ax_d.set(xscale="log", xlabel="key-value pairs D", ylabel="accuracy", ylim=(-0.03, 1.03),
             title=f"MQAR accuracy vs D (L = {seq_len})")
    ax_d.minorticks_off()
    ax_d.set_xticks(sorted(mqar["n_pairs"].unique()), [str(int(d)) for d in sorted(mqar["n_pairs"].unique())])
    ax_d.legend(fontsize=8)
    front = pts[pts["frontier"]].sort_values("cache_bytes")
    ax_p.step(front["cache_bytes"], front["accuracy"], where="post", color="0.7", zorder=0, label="Pareto frontier")
    for r in pts.itertuples():
        ax_p.scatter(r.cache_bytes, r.accuracy, color=colors.get(r.model), s=50, zorder=2)
        ax_p.annotate(r.model, (r.cache_bytes, r.accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax_p.set(xscale="log", xlabel="cache bytes per sequence (KV cache or state)", ylabel="accuracy",
             ylim=(-0.03, 1.08), title=f"accuracy vs cache bytes (L = {seq_len}, D = {int(pts.n_pairs.max())})")
    ax_p.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v)))
    ax_p.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v)))
    ax_p.legend(fontsize=8, loc="lower right")
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = out_dir / f"recall.{fmt}"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written
