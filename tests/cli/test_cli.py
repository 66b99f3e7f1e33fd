"""The command line end to end: runs write complete run folders; interrupts keep points; resume completes."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from typer.testing import CliRunner

from seqbench.cli import app
from seqbench.experiment import load_experiment
from seqbench.run.point import COLUMNS
from seqbench.run.sweep import plan_grid

DOCUMENTED_COLUMNS = """run_id model kind layout impl_used device dtype threads workload batch seq_len new_tokens status
error n_samples first_call_s time_median_s time_p25_s time_p75_s time_min_s iqr_ratio noisy tokens_per_s
latency_per_token_s cache_bytes peak_mem_bytes param_count param_bytes flops_per_token achieved_flops_per_s
achieved_bytes_per_s""".split()


def _run_dir(base: Path) -> Path:
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


def test_design_columns_are_all_present():
    assert set(DOCUMENTED_COLUMNS) <= set(COLUMNS)


def test_smoke_config_runs_and_plots(tmp_path):
    config = Path(ROOT) / "configs" / "smoke.yaml"
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run = _run_dir(tmp_path)
    for name in ("config.yaml", "env.json", "points.jsonl", "results.csv", "summary.md"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines()]
    # points.jsonl is append-only: a re-measured noisy point adds a later line for the same key
    keys = {(r["model"], r["workload"], r["batch"], r["seq_len"]) for r in rows}
    assert keys == set(plan_grid(load_experiment(config)))
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    with open(run / "results.csv") as f:
        header = next(csv.reader(f))
    assert header[: len(DOCUMENTED_COLUMNS)] == DOCUMENTED_COLUMNS
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    pngs = list((run / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (run / "report.md").is_file()


def test_dry_run_measures_nothing(tmp_path, write_config):
    path = write_config("""
name: dry
models: [{name: a, kind: attention, d_model: 64, n_layers: 2, n_heads: 4}]
sweep: {seq_lens: 16..64 x2, workloads: [prefill, decode]}
""")
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "6 points" in result.output and "a" in result.output
    assert not (tmp_path / "r").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, write_config):
    path = write_config("name: r\nmodels: [{name: a, kind: attention, preset: tiny}]\nsweep: {seq_lens: [16]}\n")
    result = CliRunner().invoke(app, ["run", str(path), "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output


SLOW_GRID = """
name: sigint
device: cpu
threads: 1
models:
  - {name: a, kind: attention, d_model: 32, n_layers: 1, n_heads: 2}
  - {name: b, kind: attention, d_model: 64, n_layers: 1, n_heads: 2}
sweep: {seq_lens: 16..2048 x2, workloads: [prefill, decode], new_tokens: 4}
measure: {warmup: 1, min_samples: 3, min_time_s: 0.25, calibrate: false, remeasure: 0}
"""


def test_sigint_keeps_points_and_resume_completes_without_duplicates(tmp_path, write_config):
    config = write_config(SLOW_GRID)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "seqbench.cli", "run", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 120
    points = None
    while time.monotonic() < deadline:
        runs = list(out.glob("sigint-*/points.jsonl")) if out.exists() else []
        if runs and len(runs[0].read_text().splitlines()) >= 3:
            points = runs[0]
            break
        time.sleep(0.1)
    assert points is not None, "the run produced no points"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    kept = len(points.read_text().splitlines())
    total = len(plan_grid(load_experiment(config)))
    assert 3 <= kept < total
    run = points.parent
    assert "--resume" in " ".join(stderr.split()) and (run / "results.csv").is_file()

    resumed = subprocess.run([*cmd[:-2], "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in points.read_text().splitlines()]
    keys = [(r["model"], r["workload"], r["batch"], r["seq_len"]) for r in rows]
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == set(plan_grid(load_experiment(config)))
    assert (run / "env.json").is_file() and list(run.glob("env-resumed-*.json"))


def test_env_reports_versions_and_kernels():
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    snap = json.loads(result.output)
    assert snap["torch"] and snap["threads"] >= 1
    assert set(snap["kernels"]) == {"mamba_ssm", "causal_conv1d", "flash_attn", "triton"}
    # no GPU here: either the package is missing (and the fix is named) or it is installed (make test's
    # contract copies) and the device is missing
    reason = snap["fast_kernels"]["selective_scan"]
    assert reason == "no CUDA device" or "pip install 'seqbench[cuda]'" in reason


def test_models_lists_kind_and_published_presets():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    for word in ("attention", "mamba2", "s4d", "hybrid", "tiny", "jamba-v0.1", "llama-3-70b"):
        assert word in result.output


def test_memory_command_is_registered_and_rejects_bad_presets():
    runner = CliRunner()
    result = runner.invoke(app, ["memory", "--preset", "llama-2-7b", "--context", "4k", "--dtype", "float16", "--json"])
    assert result.exit_code == 0, result.output
    assert "2147483648" in result.output  # 2 (k, v) · 32 layers · 4096 positions · 4096 width · 2 bytes
    bad = runner.invoke(app, ["memory", "--preset", "llama-2-7", "--context", "4k"])
    assert bad.exit_code == 2 and "did you mean" in bad.output


def test_calibrate_prints_peaks():
    result = CliRunner().invoke(app, ["calibrate", "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "GFLOP/s" in result.output and "GB/s" in result.output


def test_a_plain_run_never_imports_ray_or_submitit(write_config):
    """The cluster engines are optional extras: the command line and the sweep must load without them."""
    config = write_config("name: plain\nmodels: [{name: a, kind: mamba, preset: tiny}]\nsweep: {seq_lens: [16]}\n")
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from seqbench.cli import app\n"
        "import seqbench.run.executors, seqbench.run.sweep\n"
        f"result = CliRunner().invoke(app, ['run', {str(config)!r}, '--dry-run'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'submitit')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_executor_options_are_checked(tmp_path, write_config):
    config = write_config("name: x\nmodels: [{name: a, kind: mamba, preset: tiny}]\nsweep: {seq_lens: [16]}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--executor", "dask", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--executor must be one of inline, process, ray, slurm" in result.output
    result = runner.invoke(app, ["run", str(config), "--address", "head:6379", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs --executor ray" in result.output
    if shutil.which("srun") is None:
        result = runner.invoke(app, ["run", str(config), "--executor", "slurm", "--out", str(tmp_path)])
        assert result.exit_code == 2 and "no SLURM here" in result.output and "cluster: local" in result.output
    assert not any(tmp_path.iterdir()) or all(p.name == "exp.yaml" for p in tmp_path.iterdir())


def test_a_cluster_run_may_ask_for_cuda_from_a_driver_without_it(write_config):
    """GPUs are on the nodes: the driver (this CPU machine) checks device: cuda only for local executors."""
    config = write_config("name: g\ndevice: cuda\nmodels: [{name: a, kind: mamba, preset: tiny}]\n"
                          "sweep: {seq_lens: [16]}\n")
    runner = CliRunner()
    local = runner.invoke(app, ["run", str(config), "--dry-run"])
    cluster = runner.invoke(app, ["run", str(config), "--dry-run", "--executor", "ray"])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to tell apart")
    # a dry run still plans a local run, but says that the run itself would stop on the missing device
    assert local.exit_code == 0 and "a run would stop here" in local.output and "cuda" in local.output
    assert cluster.exit_code == 0 and "cuda (on the nodes)" in cluster.output
    assert "a run would stop here" not in cluster.output
