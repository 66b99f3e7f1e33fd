"""Figures of a run: log-log scaling curves, cache sizes, exponents with CIs and a roofline view.

Every figure uses the same colour per model, marks failed points (OOM, timeout, error, skipped) on the top
edge of the axes instead of dropping them, shades the p25..p75 band of timed metrics, and names the device,
dtype and batch in its titles. The roofline view follows Williams, Waterman & Patterson, "Roofline: an
insightful visual performance model for multicore architectures" (CACM 2009). matplotlib is imported lazily
and used through ``Figure`` objects (Agg/SVG canvases), never pyplot, so nothing global is touched.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from seqbench.analysis.fits import exponent_table
from seqbench.analysis.recall import recall_figure, split_rows
from seqbench.analysis.runs import STATUS_LABELS, load_meta, load_run, model_order, ok_rows
from seqbench.formatting import fmt_bytes, fmt_scaled, pick_unit

FAIL_MARKERS = {"oom": "X", "oom_killed": "X", "timeout": "d", "error": "*", "skipped_after_oom": "x",
                "skipped_after_timeout": "x"}
WORKLOAD_MARKERS = {"prefill": "o", "decode": "s", "train": "^"}
X_VIEW = (-1.5, 3.5)  # exponent axis range; physical costs here lie in [0, 2]
CACHE_KIND = {"attention": "KV cache", "hybrid": "KV cache + state"}


def model_colors(models: list[str]) -> dict[str, tuple]:
    """A fixed colour per model, by its position in the run (tab10, then tab20 for larger runs)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(models)}


def _device_label(df: pd.DataFrame, meta: dict) -> str:
    env = meta.get("env", {})
    device = str(df["device"].iloc[0]) if len(df) else env.get("device", "?")
    name = env.get("device_name") or env.get("cpu_model") or ""
    threads = env.get("threads") or (int(df["threads"].iloc[0]) if df["threads"].notna().any() else None)
    dtype = df["dtype"].iloc[0] if len(df) else env.get("dtype", "?")
    parts = [f"{device} ({name})" if name and name != device else device, dtype]
    if threads and device == "cpu":
        parts.append(f"{threads} threads")
    return " · ".join(parts)


def _scaled_axis(axis, scale: float) -> None:
    """Log axis whose tick labels are values / scale; minor ticks are labelled when few decades are shown."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def label(v, _pos):
        return fmt_scaled(v, scale)

    lo, hi = axis.get_view_interval()
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(label))
    if hi / max(lo, 1e-300) < 30:  # under ~1.5 decades there may be no major tick at all
        axis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
        axis.set_minor_formatter(FuncFormatter(label))
    else:
        axis.set_minor_formatter(NullFormatter())


def _bytes_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=2, numticks=8))
    axis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_bytes(v)))
    axis.set_minor_formatter(NullFormatter())


def _length_axis(ax, lengths: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    shown: list[int] = []
    for length in lengths:  # labels at least ~an octave apart, so √2 steps do not overlap
        if not shown or length >= shown[-1] * 1.9:
            shown.append(length)
    shown = shown if len(shown) <= 10 else shown[::2]
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0f}" if v < 1e5 else f"{v / 1024:.0f}k"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(lengths) > 1:
        ax.set_xlim(lengths[0] / 1.25, lengths[-1] * 1.25)


def _mark_failures(ax, sub: pd.DataFrame, color, slot: int) -> set[str]:
    """Failed points of one series as markers on the top edge (x = length, y in axes coordinates)."""
    seen = set()
    for status, grp in sub[sub["status"] != "ok"].groupby("status"):
        skipped = status.startswith("skipped")
        ax.scatter(grp["seq_len"], [0.97 - 0.045 * slot] * len(grp), transform=ax.get_xaxis_transform(),
                   marker=FAIL_MARKERS.get(status, "*"), s=30 if skipped else 70, color=color, clip_on=False,
                   alpha=0.55 if skipped else 1.0, zorder=5, linewidths=1.2)
        seen.add(status)
    return seen


def _fail_handles(statuses: set[str]) -> list:
    from matplotlib.lines import Line2D

    handles = []
    for status in sorted(statuses, key=list(FAIL_MARKERS).index):
        label = STATUS_LABELS.get(status, status)
        if any(h.get_label() == label for h in handles):
            continue
        handles.append(Line2D([], [], ls="", marker=FAIL_MARKERS.get(status, "*"), color="0.3", label=label))
    return handles


def _series_panel(ax, df: pd.DataFrame, metric: str, colors: dict, slopes: dict, band: str | None,
                  label_fn=None) -> set[str]:
    """One line per model of ``metric`` vs L; ``band`` "time" or "rate" shades p25..p75 of the timing."""
    from matplotlib.lines import Line2D

    statuses: set[str] = set()
    handles = []
    slot = 0
    present = [m for m in colors if m in set(df["model"])]
    for index, model in enumerate(present):
        sub = df[df["model"] == model].sort_values("seq_len")
        measured = sub[(sub["status"] == "ok") & sub[metric].notna()]
        ok, zero = measured[measured[metric] > 0], measured[measured[metric] <= 0]
        color = colors[model]
        if len(zero):  # a log axis cannot show 0 (e.g. no new pages touched): marked on the bottom edge instead
            ax.scatter(zero["seq_len"], [0.03] * len(zero), transform=ax.get_xaxis_transform(), marker="v",
                       facecolor="white", edgecolor=color, s=28, clip_on=False, zorder=5)
            statuses.add("zero")
        if len(ok):
            # Lines only join adjacent measured lengths: a failed or zero point in between breaks them (NaN).
            shown = sub["seq_len"].isin(ok["seq_len"])
            line = sub[metric].where(shown)
            # Earlier series are drawn wider, so identical curves (e.g. equal state sizes) stay visible.
            ax.plot(sub["seq_len"], line, "-", color=color, lw=1.4 + 0.3 * (len(present) - 1 - index))
            noisy = ok["noisy"].to_numpy(bool) & (band is not None)  # the flag is about timing noise
            ax.scatter(ok["seq_len"][~noisy], ok[metric][~noisy], color=color, s=22, zorder=4)
            ax.scatter(ok["seq_len"][noisy], ok[metric][noisy], facecolor="white", edgecolor=color, s=26, zorder=4)
            if band:
                p25, p75 = sub["time_p25_s"].where(shown), sub["time_p75_s"].where(shown)
                lo, hi = (p25, p75) if band == "time" else (sub["batch"] * sub["seq_len"] / p75,
                                                            sub["batch"] * sub["seq_len"] / p25)
                ax.fill_between(sub["seq_len"], lo, hi, color=color, alpha=0.15, lw=0)
        failed = _mark_failures(ax, sub, color, slot)
        slot += bool(failed)
        statuses |= failed
        slope = slopes.get(model)
        label = model + (f" ({label_fn(sub)})" if label_fn else "")
        label += f"  k = {slope + 0.0 if abs(slope) >= 0.005 else 0.0:.2f}" if slope is not None and np.isfinite(
            slope) else ""
        handles.append(Line2D([], [], color=color, marker="o", ms=4, label=label))
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if slot:  # headroom above the data for the failure markers of `slot` series
        lo, hi = ax.get_ylim()
        frac = 0.06 + 0.045 * slot
        ax.set_ylim(lo, math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) / (1 - frac)))
    if "zero" in statuses:
        statuses.discard("zero")
        handles.append(Line2D([], [], ls="", marker="v", mfc="white", color="0.3", label="0 (off the log axis)"))
    if band is not None and df["noisy"].any():
        handles.append(Line2D([], [], ls="", marker="o", mfc="white", color="0.3", label="noisy (IQR > 10%)"))
    # Outside the axes, so it never hides a curve or a failure marker on the top edge.
    ax.legend(handles=handles + _fail_handles(statuses), fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0, frameon=False)
    return statuses


def _grid(df: pd.DataFrame, workloads: list[str]) -> tuple[list[str], list[int]]:
    """Panel rows (workloads present) and columns (batch sizes present) of a figure."""
    rows = [w for w in workloads if w in set(df["workload"])]
    return rows, sorted(int(b) for b in df[df["workload"].isin(rows)]["batch"].unique())


def _save(fig, out_dir: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    import matplotlib

    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "seqbench"}):
        for ext in formats:
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path, dpi=150, metadata={"Date": None} if ext == "svg" else None)
            paths.append(path)
    return paths


def _curve_figure(df, meta, colors, fits, workloads, metric, title, ylabel, band=None, label_fn=None):
    """A row of panels, one per (workload, batch) present; bytes get binary-unit ticks, times/rates one unit."""
    from matplotlib.figure import Figure

    rows, cols = _grid(df, workloads)
    if not rows:
        return None
    fig = Figure(figsize=(6.6 * len(cols), 4.4 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for (i, workload), (j, batch) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axes[i, j]
        sel = df[(df["workload"] == workload) & (df["batch"] == batch)]
        if sel.empty:
            ax.set_visible(False)
            continue
        key = fits[(fits["workload"] == workload) & (fits["batch"] == batch) & (fits["metric"] == metric)]
        slopes = {r.model: r.slope for r in key.itertuples() if r.status == "ok"}
        _series_panel(ax, sel, metric, colors, slopes, band, label_fn)
        _length_axis(ax, sorted(int(x) for x in sel["seq_len"].unique()))
        ok = ok_rows(sel)[metric]
        if metric.endswith("_bytes"):
            _bytes_axis(ax.yaxis)
            ax.set_ylabel(ylabel)
        else:
            unit, scale = pick_unit(ok, metric)
            _scaled_axis(ax.yaxis, scale)
            ax.set_ylabel(ylabel.format(unit=unit))
        ax.set_xlabel("context length L [tokens]" if workload == "decode" else "sequence length L [tokens]")
        ax.set_title(f"{workload}, batch {batch}", fontsize=10)
    fig.suptitle(f"{title}\n{_device_label(df, meta)}", fontsize=11)
    note = "k: log-log slope (cost ∝ L^k) fitted from the fit start (default: the top three octaves)" + (
        "; shaded: p25–p75 of the timing" if band else "")
    fig.supxlabel(note, fontsize=7, color="0.4", x=0.99, ha="right")
    return fig


def _cache_label(series: pd.DataFrame) -> str:
    return CACHE_KIND.get(series["kind"].iloc[0], "recurrent state")


def _exponent_figure(df, meta, colors, fits):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fits = fits[fits["metric"] != "tokens_per_s"]  # the mirror image of the time slope
    panels = list(dict.fromkeys(zip(fits["label"], fits["batch"], strict=True)))
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    models = [m for m in colors if m in set(fits["model"])]
    fig = Figure(figsize=(4.4 * ncols, 0.45 * len(models) * nrows + 1.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, batch) in zip(axes, panels, strict=False):
        sub = fits[(fits["label"] == label) & (fits["batch"] == batch)].set_index("model")
        for ref in (0, 1, 2):
            ax.axvline(ref, color="0.75", lw=0.8, ls=":")
        for y, model in enumerate(models):
            if model not in sub.index:
                continue
            r = sub.loc[model]
            if r["status"] != "ok":
                ax.text(0.02, y, "too few points", va="center", fontsize=7.5, color="0.4",
                        transform=ax.get_yaxis_transform())
                continue
            # CIs beyond the view are cut at its edge and end in an arrow instead of squashing every other row.
            lo, hi = max(r["ci_low"], X_VIEW[0]), min(r["ci_high"], X_VIEW[1])
            x = min(max(r["slope"], X_VIEW[0]), X_VIEW[1])
            ax.errorbar(x, y, xerr=[[x - lo], [hi - x]], fmt="o", color=colors[model], capsize=3, ms=6,
                        mfc=colors[model] if r["asymptotic"] else "white")
            for end, cut, marker in ((lo, r["ci_low"] < X_VIEW[0], "<"), (hi, r["ci_high"] > X_VIEW[1], ">")):
                if cut:
                    ax.plot(end, y, marker=marker, color=colors[model], ms=6)
        ranges = {m: f"\nL {sub.loc[m, 'l_min']:.0f}–{sub.loc[m, 'l_max']:.0f}" if m in sub.index
                  and sub.loc[m, "status"] == "ok" else "" for m in models}
        ax.set_yticks(range(len(models)), [m + ranges[m] for m in models], fontsize=7.5)
        ax.set_ylim(len(models) - 0.5, -0.5)
        ok = sub[sub["status"] == "ok"]
        left = min(-0.25, ok["ci_low"].min() - 0.1) if len(ok) else -0.25
        right = max(2.25, ok["ci_high"].max() + 0.1) if len(ok) else 2.25
        ax.set_xlim(max(left, X_VIEW[0] - 0.1), min(right, X_VIEW[1] + 0.1))
        ax.set_title(f"{label}, batch {batch}", fontsize=9.5)
        ax.set_xlabel("exponent k in cost ∝ L^k", fontsize=8.5)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], ls="", marker="o", color="0.3", label="asymptotic (local slopes agree within 0.1)"),
               Line2D([], [], ls="", marker="o", mfc="white", color="0.3",
                      label="local slopes disagree: still curving, or too noisy to tell"),
               Line2D([], [], ls="", marker=">", color="0.3", label="CI continues beyond the view")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"Scaling exponents with 95% CIs (from the fit start)\n{_device_label(df, meta)}", fontsize=11)
    return fig


def _roofline_figure(df, meta, colors):
    """Achieved FLOP/s against arithmetic intensity, under the calibrated compute and bandwidth roofs."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cal = meta.get("calibration") or {}
    peak_f, peak_b = cal.get("peak_flops_per_s"), cal.get("peak_bytes_per_s")
    ok = ok_rows(df)
    ok = ok[(ok["achieved_flops_per_s"] > 0) & (ok["achieved_bytes_per_s"] > 0)]
    if not peak_f or not peak_b or ok.empty:
        return None
    intensity = ok["achieved_flops_per_s"] / ok["achieved_bytes_per_s"]  # FLOP per byte moved
    fig = Figure(figsize=(8.4, 5.0), layout="constrained")
    ax = fig.subplots()
    lo, hi = min(intensity.min(), peak_f / peak_b) / 4, max(intensity.max(), peak_f / peak_b) * 4
    xs = np.geomspace(lo, hi, 200)
    ax.plot(xs, np.minimum(peak_f, xs * peak_b), color="0.2", lw=2)
    ax.text(hi, peak_f * 1.15, f"peak {peak_f / 1e9:.3g} GFLOP/s", ha="right", fontsize=8)
    ax.text(lo * 1.3, lo * 1.3 * peak_b * 1.3, f"{peak_b / 1e9:.3g} GB/s", fontsize=8, rotation=0)
    for (model, workload, _batch), grp in ok.assign(ai=intensity).groupby(["model", "workload", "batch"], sort=False):
        grp = grp.sort_values("seq_len")
        ax.plot(grp["ai"], grp["achieved_flops_per_s"], "-", color=colors[model], lw=0.8, alpha=0.6)
        sizes = 12 + 50 * (np.log2(grp["seq_len"]) - np.log2(ok["seq_len"].min())) / max(
            np.log2(ok["seq_len"].max() / ok["seq_len"].min()), 1)  # marker area grows with L
        ax.scatter(grp["ai"], grp["achieved_flops_per_s"], s=sizes, color=colors[model], alpha=0.8,
                   marker=WORKLOAD_MARKERS.get(workload, "o"), edgecolor="white", linewidths=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity [FLOP/byte]")
    ax.set_ylabel("achieved [FLOP/s]")
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colors[m], lw=2, label=m) for m in colors if m in set(ok["model"])]
    handles += [Line2D([], [], ls="", marker=mk, color="0.3", label=w)
                for w, mk in WORKLOAD_MARKERS.items() if w in set(ok["workload"])]
    handles.append(Line2D([], [], ls="", color="none", label=f"marker size: L = {int(ok['seq_len'].min())}"
                          f" … {int(ok['seq_len'].max())}"))
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    shown = ", ".join(w for w in WORKLOAD_MARKERS if w in set(ok["workload"]))
    batches = ", ".join(str(int(b)) for b in sorted(ok["batch"].unique()))
    ax.set_title(f"Roofline: achieved vs calibrated peak ({shown}; batch {batches})\n{_device_label(df, meta)}",
                 fontsize=10)
    return fig


def make_plots(run_dir: str | Path, df: pd.DataFrame | None = None, meta: dict | None = None,
               formats: tuple[str, ...] = ("png", "svg"), fits: pd.DataFrame | None = None) -> list[Path]:
    """Write every figure the run's data supports into ``run_dir/plots``; returns the written files.
    ``fits`` (exponent_table of df) is computed here unless the caller already has it."""
    run_dir = Path(run_dir)
    df = load_run(run_dir) if df is None else df
    meta = load_meta(run_dir) if meta is None else meta
    names = [m.get("name") for m in (meta.get("config") or {}).get("models", []) if isinstance(m, dict)]
    colors = model_colors(list(dict.fromkeys([n for n in names if n in set(df["model"])] + model_order(df))))
    df, probes = split_rows(df)
    fits = exponent_table(df) if fits is None else fits
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "prefill_throughput": _curve_figure(df, meta, colors, fits, ["prefill"], "tokens_per_s",
                                            "Prefill throughput vs sequence length", "throughput [{unit}]",
                                            band="rate"),
        "decode_latency": _curve_figure(df, meta, colors, fits, ["decode"], "latency_per_token_s",
                                        "Per-token decode latency vs context length", "latency per token [{unit}]",
                                        band="time"),
        "cache_bytes": _curve_figure(df, meta, colors, fits, ["decode"], "cache_bytes",
                                     "Cache size after a context of L tokens (KV cache vs recurrent state)",
                                     "cache size [bytes, binary units]", label_fn=_cache_label),
        "peak_memory": _curve_figure(df, meta, colors, fits, ["prefill", "decode", "train"], "peak_mem_bytes",
                                     "Peak memory of the workload (live tensors of one call + its cache)",
                                     "peak memory [bytes, binary units]"),
        "train_throughput": _curve_figure(df, meta, colors, fits, ["train"], "tokens_per_s",
                                          "Training step (forward + backward) throughput vs sequence length",
                                          "throughput [{unit}]", band="rate"),
        "exponents": _exponent_figure(df, meta, colors, fits),
        "roofline": _roofline_figure(df, meta, colors),
    }
    written = []
    for stem, fig in figures.items():
        if fig is not None:
            written += _save(fig, out_dir, stem, formats)
    return written + recall_figure(probes, colors, out_dir, formats)
