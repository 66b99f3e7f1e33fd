"""The ``seqbench`` command line: thin commands that parse, call one function and render.

Logs and progress go to stderr; tables to stdout. A mistake the user can fix exits 2 with one message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from seqbench.config import ConfigError, Experiment, load_experiment
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


def _preflight(exp: Experiment, config: Path):
    """Resolve the device and check that every demanded fast kernel can run, before anything is measured."""
    from seqbench.env import resolve_device
    from seqbench.models import preflight_kernels

    try:
        device = resolve_device(exp.device)
        preflight_kernels(exp, device)
    except RuntimeError as e:
        fail(f"{config}: {e}")
    return device


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment YAML"),
    out_dir: Path | None = typer.Option(None, "--out", help="parent folder of the run folder (default: output_dir)"),
    resume: Path | None = typer.Option(None, "--resume", help="finish the grid of this run folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the grid and model sizes; measure nothing"),
    run_dir_file: Path | None = typer.Option(None, "--run-dir-file", help="write the run folder's path here"),
) -> None:
    """Run an experiment: build the models, sweep the grid, write the run folder."""
    exp = _load(config)
    device = _preflight(exp, config)
    from seqbench import sweep

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
    err.print(f"run folder: {state.run_dir}  (device {device}, dtype {exp.dtype}, isolation {exp.measure.isolation})")
    t0 = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False)
    total = len(sweep.plan_grid(exp))
    task = progress.add_task("starting", total=total, completed=len(state.rows))

    def on_start(key, done, n):
        model, workload, batch, seq_len = key
        progress.update(task, description=f"{model:>12} {workload:<7} b={batch} L={seq_len}")

    def on_done(key, row, done, n):
        progress.update(task, completed=done)
        if row["status"] != "ok":
            where = f"{key[0]} {key[1]} b={key[2]} L={key[3]}"
            progress.console.print(f"  {where}: {row['status']} {escape(row['error'] or '')}", highlight=False)

    interrupted = False
    with progress:
        try:
            sweep.run_sweep(state, on_start, on_done,
                            on_wait=lambda: err.print("another seqbench run is measuring here; waiting for it"))
        except sweep.Interrupted:
            interrupted = True
    sweep.write_tables(state)
    import pandas as pd

    df = pd.DataFrame(sweep.ordered_rows(state))
    if len(df):
        from seqbench.report import render_summary

        render_summary(out, df)
    if interrupted:
        err.print(f"[yellow]interrupted[/]: {len(state.rows)} of {total} points kept in {state.run_dir}\n"
                  f"resume with: seqbench run {config} --resume {state.run_dir}", highlight=False)
        raise typer.Exit(130)
    err.print(f"done: {len(state.rows)} points in {time.monotonic() - t0:.1f} s -> {state.run_dir}/results.csv; "
              f"plots: seqbench plot {state.run_dir}", highlight=False)


def _print_plan(exp: Experiment, device: str) -> None:
    from seqbench.models import describe_model
    from seqbench.sweep import plan_grid

    grid = plan_grid(exp)
    table = Table(title=f"{exp.name}: {len(grid)} points on {device} ({exp.dtype})", title_justify="left")
    for col in ("model", "kind", "layers", "params", "non-embedding", "FLOPs/token @ max L"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right")
    max_len = max(exp.sweep.seq_lens)
    for spec in exp.models:
        info = describe_model(spec, max_len)
        table.add_row(spec.name, info["kind"], str(spec.n_layers), f"{info['params']:,}",
                      f"{info['params_non_embedding']:,}", f"{info['flops_per_token']:.3g}")
    out.print(table)
    out.print(f"workloads {exp.sweep.workloads} × batch {exp.sweep.batch} × seq_lens {exp.sweep.seq_lens} "
              f"× {len(exp.models)} models = {len(grid)} points", highlight=False)


@app.command()
def validate(config: Path = typer.Argument(..., help="experiment YAML")) -> None:
    """Check a config file; exit 2 with a message naming the key if it is wrong."""
    exp = _load(config)
    _preflight(exp, config)
    from seqbench.sweep import plan_grid

    out.print(f"ok: {config}: {len(exp.models)} models, {len(plan_grid(exp))} grid points", highlight=False)


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Versions, device, threads and which fast kernels can run here."""
    from seqbench.env import snapshot
    from seqbench.ops import _FAST, fast_available

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

    table = Table(title="kinds and presets (use: {kind: mamba, preset: small})", title_justify="left")
    for col in ("kind", "preset", "fields", "params"):
        table.add_column(col)
    for kind, presets in KIND_PRESETS.items():
        for name, fields in presets.items():
            spec = ModelSpec(name=name, kind=kind, **fields)
            table.add_row(kind, name, ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in fields.items()), f"{describe_model(spec, 1)['params']:,}")
    out.print(table)

    from seqbench.archs import load_presets

    table = Table(title="published shapes (use: {preset: jamba-v0.1, scale: {layers: 0.25, width: 0.0625}})",
                  title_justify="left")
    for col in ("preset", "model", "layout", "layers", "d_model", "source"):
        table.add_column(col)
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

    from seqbench.env import resolve_device
    from seqbench.measure import calibrate as measure_peaks
    from seqbench.models import DTYPES

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
    except RuntimeError as e:
        fail(str(e))
    cal = measure_peaks(dev, DTYPES[dtype])
    out.print(f"{cal['device']} {cal['dtype']} threads={cal['threads']}: "
              f"peak matmul {cal['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, "
              f"copy bandwidth {cal['peak_bytes_per_s'] / 1e9:.1f} GB/s", highlight=False)


@app.command("bench-ops")
def bench_ops() -> None:
    """Benchmark the reference kernels against per-timestep loops and Hugging Face's torch path."""
    from seqbench.ops.bench import main

    main([])


# --- commands from other modules ----------------------------------------------------------------------
def _register() -> None:
    from seqbench.memcalc import flops_cmd, memory_cmd
    from seqbench.report import compare_cmd, plot_cmd

    app.command("plot", help="Figures, report.md and report.html for a run folder (or each run in a folder).")(plot_cmd)
    app.command("compare", help="Per-point ratios of two runs; exit 1 on a flagged slowdown.")(compare_cmd)
    app.command("memory", help="Analytic KV-cache, state and parameter bytes of published architectures.")(memory_cmd)
    app.command("flops", help="Analytic FLOPs per token of published architectures (an estimate).")(flops_cmd)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
