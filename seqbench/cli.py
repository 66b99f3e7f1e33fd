"""The ``seqbench`` command line: thin commands that parse, call one function and render.

Logs and progress go to stderr; tables to stdout. A mistake the user can fix exits 2 with one message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from seqbench.config import ConfigError, Experiment
from seqbench.experiment import load_experiment
from seqbench.messages import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure what Transformers, S4D, Mamba, Mamba-2 and hybrids cost as sequences grow.")
out = Console()
err = Console(stderr=True)


def _load(config: Path) -> Experiment:
    try:
        return load_experiment(config)
    except ConfigError as e:
        fail(str(e))


def _preflight(exp: Experiment, config: Path, dry_run: bool = False):
    """Resolve the device and check the demanded kernels and graphs; a dry run plans anyway, saying why not."""
    from seqbench.models import preflight_kernels
    from seqbench.run.cudagraph import preflight_graphs
    from seqbench.run.provenance import resolve_device

    try:
        device = resolve_device(exp.device)
        preflight_kernels(exp, device)
        preflight_graphs(exp, device)
    except RuntimeError as e:
        if not dry_run:
            fail(f"{config}: {e}")
        err.print(f"[yellow]note[/]: a run would stop here: {escape(str(e))}", highlight=False)
        return "cpu" if exp.device == "auto" else exp.device
    return device


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment YAML"),
    out_dir: Path | None = typer.Option(None, "--out", help="parent folder of the run folder (default: output_dir)"),
    resume: Path | None = typer.Option(None, "--resume", help="finish the grid of this run folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the grid and model sizes; measure nothing"),
    run_dir_file: Path | None = typer.Option(None, "--run-dir-file", help="write the run folder's path here"),
    executor: str | None = typer.Option(None, "--executor", help="inline | process | ray | slurm (default: config)"),
    address: str | None = typer.Option(None, "--address", help="the Ray cluster to use (default: a local instance)"),
) -> None:
    """Run an experiment: build the models, sweep the grid, write the run folder."""
    exp = _load(config)
    from seqbench.run.executors import ExecutorUnavailable, choose_executor

    try:
        on_cluster = choose_executor(exp, executor, address) in ("ray", "slurm")
    except ValueError as e:
        fail(str(e))
    # a cluster's nodes may have the GPUs and kernels the driver lacks: there, the nodes check them per point
    device = "cuda (on the nodes)" if on_cluster and exp.device == "cuda" else _preflight(exp, config, dry_run)
    from seqbench.run import sweep

    if dry_run:
        _print_plan(exp, str(device))
        return
    if resume is not None and not (resume / "config.yaml").is_file():
        fail(f"{resume}: not a run folder (no config.yaml)")
    try:
        state = sweep.prepare_run(exp, out_dir, resume)
    except (ValueError, OSError) as e:
        fail(str(e))
    if run_dir_file:
        run_dir_file.parent.mkdir(parents=True, exist_ok=True)
        run_dir_file.write_text(str(state.run_dir))
    err.print(f"run folder: {state.run_dir}  (device {device}, dtype {exp.dtype}, "
              f"executor {exp.executor or exp.measure.isolation})")
    t0 = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False)
    total = len(sweep.plan_grid(exp))
    task = progress.add_task("starting", total=total, completed=len(state.rows))

    def on_start(key, done, n):
        progress.update(task, description=sweep.describe_key(key))

    def on_done(key, row, done, n):
        progress.update(task, completed=done)
        if row["status"] != "ok":
            progress.console.print(f"  {sweep.describe_key(key).strip()}: {row['status']} {escape(row['error'] or '')}",
                                   highlight=False)

    interrupted = False
    with progress:
        try:
            sweep.run_sweep(state, on_start, on_done,
                            on_wait=lambda: err.print("another seqbench run is measuring here; waiting for it"))
        except sweep.Interrupted:
            interrupted = True
        except ExecutorUnavailable as e:
            fail(f"{e}; nothing was measured in {state.run_dir}")
    from seqbench.analysis.summary import render_summary, summary_markdown

    sweep.write_results_csv(state)
    rows = sweep.ordered_rows(state)
    (state.run_dir / "summary.md").write_text(summary_markdown(rows, exp.name, total))
    if rows:
        render_summary(out, rows)
    if interrupted:
        err.print(f"[yellow]interrupted[/]: {len(state.rows)} of {total} points kept in {state.run_dir}\n"
                  f"resume with: seqbench run {config} --resume {state.run_dir}", highlight=False)
        raise typer.Exit(130)
    err.print(f"done: {len(state.rows)} points in {time.monotonic() - t0:.1f} s -> {state.run_dir}/results.csv; "
              f"plots: seqbench plot {state.run_dir}", highlight=False)


def _print_plan(exp: Experiment, device: str) -> None:
    from seqbench.formatting import fmt_bytes
    from seqbench.models import describe_model
    from seqbench.run.sweep import plan_grid

    grid = plan_grid(exp)
    cache_len = exp.sweep.max_context()
    table = Table(title=f"{exp.name}: {len(grid)} points on {device} ({exp.dtype})", title_justify="left")
    for col in ("model", "kind", "layers", "d_model", "params", "non-embedding", "FLOPs/token @ max L",
                f"cache/sequence @ L={cache_len:,}"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right", no_wrap=True)
    for spec in exp.models:
        info = describe_model(spec, max(exp.sweep.all_seq_lens()), exp.dtype, cache_len)
        counts = (spec.n_layers, spec.d_model, info["params"], info["params_non_embedding"])
        table.add_row(spec.name, info["kind"], *(f"{c:,}" for c in counts), f"{info['flops_per_token']:.3g}",
                      fmt_bytes(info["cache_bytes"]))
    Console(width=max(out.width, 150)).print(table)  # never truncate the counts, even in a narrow pipe
    grids = [f"workloads {g.workloads} × batch {g.batch} × seq_lens {g.seq_lens}" for g in exp.sweep.grids()]
    out.print(" +\n".join(grids) + f"\n× {len(exp.models)} models = {len(grid)} points", highlight=False)


@app.command("gpu-check")
def gpu_check(config: Path = typer.Argument(Path("configs/gpu-check.yaml"), help="the short sweep to run")) -> None:
    """On a GPU: fast kernels against references, then a short bf16 sweep; exit 1 on a failure, 2 without CUDA."""
    from seqbench.run import gpu_check as check

    if not check.has_cuda():
        fail(check.NO_CUDA)
    exp = _load(config)
    failed = check.parity_report(out)
    _preflight(exp, config)
    raise typer.Exit(check.sweep_report(exp, out, failed))


@app.command()
def validate(config: Path = typer.Argument(..., help="experiment YAML")) -> None:
    """Check a config file; exit 2 with a message naming the key if it is wrong."""
    exp = _load(config)
    _preflight(exp, config)
    from seqbench.run.sweep import plan_grid

    out.print(f"ok: {config}: {len(exp.models)} models, {len(plan_grid(exp))} grid points", highlight=False)


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Versions, device, threads and which fast kernels can run here."""
    from seqbench.ops import _FAST, fast_available
    from seqbench.run.provenance import snapshot

    snap = snapshot()
    snap["fast_kernels"] = {op: fast_available(op) or "available" for op in _FAST}
    if as_json:
        out.print_json(json.dumps(snap))
        return
    table = Table(show_header=False)
    for k, v in snap.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(table)


@app.command()
def models() -> None:
    """Model kinds and their size presets."""
    from seqbench.config import ModelSpec
    from seqbench.models import describe_model
    from seqbench.models.presets import KIND_PRESETS
    from seqbench.models.published import load_presets

    table = Table("kind", "preset", "fields", "params", title="kinds and presets (use: {kind: mamba, preset: small})",
                  title_justify="left")
    for kind, presets in KIND_PRESETS.items():
        for name, fields in presets.items():
            spec = ModelSpec(name=name, kind=kind, **fields)
            table.add_row(kind, name, ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in fields.items()), f"{describe_model(spec, 1)['params']:,}")
    out.print(table)
    table = Table("preset", "model", "layout", "layers", "d_model", "source", title_justify="left",
                  title="published shapes (use: {preset: jamba-v0.1, scale: {layers: 0.25, width: 0.0625}})")
    for name, arch in load_presets().items():
        table.add_row(name, arch.title, arch.layout, str(arch.n_layers), str(arch.d_model), arch.source)
    out.print(table)


@app.command()
def calibrate(
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("float32"),
    threads: int | None = typer.Option(None),
) -> None:
    """Measure this device's peak matmul FLOP/s and memory bandwidth (the roofline)."""
    import torch

    from seqbench.models import DTYPES
    from seqbench.run.calibration import calibrate as measure_peaks
    from seqbench.run.provenance import resolve_device

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}")
    torch.set_num_threads(threads or torch.get_num_threads())
    try:
        dev = resolve_device(device)
    except RuntimeError as e:
        fail(str(e))
    cal = measure_peaks(dev, DTYPES[dtype])
    out.print(f"{cal['device']} {cal['dtype']} threads={cal['threads']}: "
              f"peak matmul {cal['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({cal['gemm']}), "
              f"copy bandwidth {cal['peak_bytes_per_s'] / 1e9:.1f} GB/s", highlight=False)


# ---- analysis ---------------------------------------------------------------------------------------


@app.command("plot")
def plot_cmd(
    path: Path = typer.Argument(..., help="a run folder, or a folder of runs (e.g. results/)"),
    fit_from: Annotated[int | None, typer.Option(
        "--fit-from", min=1, help="fit exponents on L >= this (default: the top three octaves)")] = None,
) -> None:
    """Figures, report.md and report.html for a run folder (or each run in a folder); prints the key tables."""
    from seqbench.analysis.report import analyse_run, make_report
    from seqbench.analysis.runs import RunError, find_runs
    from seqbench.analysis.summary import render_summary

    try:
        runs = find_runs(path)
    except RunError as e:
        fail(str(e))
    written = 0
    for run_dir in runs:
        try:
            analysed = analyse_run(run_dir, fit_from)
            report = make_report(run_dir, analysed)
        except RunError as e:
            err.print(f"[yellow]skipped[/] {escape(str(e))}", highlight=False)
            continue
        written += 1
        out.rule(run_dir.name)
        df, _, fits, cross = analysed
        render_summary(out, df, fits, cross)
        err.print(f"report: {report} and {report.with_suffix('.html')}; figures in {run_dir / 'plots'}",
                  highlight=False)
    if not written:
        fail(f"{path}: no run with points to plot")


@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="the baseline run folder"),
    run_b: Path = typer.Argument(..., help="the new run folder"),
    threshold: float = typer.Option(1.10, help="fail when a point is slower than this ratio beyond noise"),
) -> None:
    """Per-point time ratios of RUN_B over RUN_A; exit 1 when a slowdown beyond noise exceeds --threshold."""
    from seqbench.analysis.compare import changes_view, compare_runs, headline
    from seqbench.analysis.runs import RunError
    from seqbench.analysis.tables import rich_table

    try:
        table, flagged = compare_runs(run_a, run_b, threshold)
    except RunError as e:
        fail(str(e))
    if table.empty:
        fail(f"{run_a} and {run_b} share no grid points")
    for note in table.attrs.get("mismatch", []):
        out.print(f"[yellow]warning:[/] runs differ in {escape(note)}", highlight=False)
    view = changes_view(table)
    if len(view):
        out.print(rich_table(view, f"time changes beyond noise, B = {run_b.name} vs A = {run_a.name}"))
    out.print(headline(table), highlight=False)
    if flagged:
        out.print(f"[bold red]{int(table['flagged'].sum())} point(s) slower than {threshold:.2f}× beyond noise "
                  "or newly failing[/]")
        raise typer.Exit(1)


# ---- the calculator of published architectures --------------------------------------------------------

DEFAULT_CONTEXTS = "4k,32k,128k,256k"
PRESET_HELP = "preset name (repeatable, comma-separated, or 'all')"
CONTEXT_HELP = "contexts, e.g. 4k,32k,128k or 4096,1M"


def _presets_and_contexts(preset: list[str], context: str, dtype: str = "bfloat16"):
    from seqbench.calc.memcalc import parse_request

    try:
        return parse_request(preset, context, dtype)
    except ValueError as e:
        fail(str(e))


def _print_sections(title: str, columns: list[str], rows: list[tuple]) -> None:
    """A table with one section per preset: rows are (preset, cells)."""
    table = Table("preset", *(Column(c, justify="right", no_wrap=True) for c in columns), title=escape(title),
                  title_justify="left")
    for i, (p, cells) in enumerate(rows):
        table.add_row(p.name, *cells, end_section=i + 1 < len(rows) and rows[i + 1][0] is not p)
    out.print(table)


@app.command("memory")
def memory_cmd(
    preset: list[str] = typer.Option(..., "--preset", "-p", help=PRESET_HELP),
    context: str = typer.Option(DEFAULT_CONTEXTS, "--context", "-c", help=CONTEXT_HELP),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="sequences held at once"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="dtype of weights, KV cache and conv state"),
    json_out: bool = typer.Option(False, "--json", help="print exact bytes as JSON"),
    plot: Path | None = typer.Option(None, "--plot", help="draw memory versus context into this image file"),
) -> None:
    """KV cache, recurrent state, parameters and total memory of published architectures (analytic)."""
    from seqbench.calc.memcalc import human_tokens, memory, plot_memory
    from seqbench.formatting import fmt_bytes

    presets, contexts = _presets_and_contexts(preset, context, dtype)
    if plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        if plot.suffix.lstrip(".").lower() not in FigureCanvasBase.get_supported_filetypes():
            fail(f"--plot {plot}: use an image suffix such as .png, .svg or .pdf")
    rows = [(p, memory(p, c, batch, dtype)) for p in presets for c in contexts]
    if json_out:
        typer.echo(json.dumps([{**m.as_dict(), "title": p.title} for p, m in rows], indent=2))
    else:
        _print_sections(
            f"Memory, batch {batch}, {dtype} (analytic; activations excluded); state = SSM + conv state",
            ["context", "KV cache", "state", "weights", "total"],
            [(p, [human_tokens(m.context), fmt_bytes(m.kv_cache_bytes), fmt_bytes(m.state_bytes),
                  fmt_bytes(m.param_bytes), fmt_bytes(m.total_bytes)]) for p, m in rows])
        for p in presets:
            if p.moe is not None:
                out.print(f"{p.name}: weights count all {p.moe.experts} experts of each mixture.", highlight=False)
            if p.notes:
                out.print(f"{p.name}: {escape(p.notes)}.", highlight=False)
    if plot is not None:
        try:
            plot_memory(presets, contexts, batch, dtype, plot)
        except OSError as e:  # e.g. an unwritable folder
            fail(f"--plot {plot}: {e}")
        err.print(f"wrote {plot}", highlight=False)


@app.command("flops")
def flops_cmd(
    preset: list[str] = typer.Option(..., "--preset", "-p", help=PRESET_HELP),
    context: str = typer.Option(DEFAULT_CONTEXTS, "--context", "-c", help=CONTEXT_HELP),
    json_out: bool = typer.Option(False, "--json", help="print exact FLOP counts as JSON"),
) -> None:
    """Analytic FLOPs per token of prefill and decode at each context (docs/design.md, "The calculator")."""
    from dataclasses import asdict

    from seqbench.calc.memcalc import flops, human_tokens
    from seqbench.formatting import fmt_count

    presets, contexts = _presets_and_contexts(preset, context)
    rows = [(p, flops(p, c)) for p in presets for c in contexts]
    if json_out:
        typer.echo(json.dumps([{**asdict(f), "title": p.title} for p, f in rows], indent=2))
        return
    _print_sections("FLOPs per token, batch 1 (2 per multiply-add; matmuls + attention/scan terms; "
                    "MoE counts active experts)", ["context", "active params", "prefill /token", "decode /token"],
                    [(p, [human_tokens(f.context), fmt_count(f.active_params),
                          fmt_count(f.prefill_flops_per_token, "FLOP"), fmt_count(f.decode_flops_per_token, "FLOP")])
                     for p, f in rows])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
