"""Plots, report and compare on a small synthetic run folder with realistic rows (and failures)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
import yaml
from rich.console import Console

from seqbench.analysis.compare import compare_runs
from seqbench.analysis.report import make_report
from seqbench.analysis.runs import RunError, find_runs, load_run
from seqbench.analysis.summary import render_summary
from seqbench.cli import compare_cmd, plot_cmd

LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
D, LAYERS = 256, 4
# name -> (kind, prefill a*L + b*L^2 + c [s], decode a + b*L [s], cache bytes at L)
MODELS = {
    "transformer": ("attention", (1.2e-4, 2e-8, 2e-3), (1.5e-3, 1.5e-7), lambda L: 2 * LAYERS * L * D * 4),
    "mamba": ("mamba", (2.5e-4, 0.0, 3e-3), (2.2e-3, 0.0), lambda L: LAYERS * (512 * 16 + 512 * 3) * 4),
    "mamba2": ("mamba2", (1.8e-4, 0.0, 6e-3), (2.4e-3, 0.0), lambda L: LAYERS * (512 * 64 + 768 * 3) * 4),
    "s4d": ("s4d", (2e-4, 0.0, 4e-3), (1.9e-3, 0.0), lambda L: LAYERS * 256 * 32 * 8),
    "hybrid": ("hybrid", (2.2e-4, 5e-9, 3e-3), (2.1e-3, 4e-8), lambda L: 2 * L * D * 4 + 3 * (512 * 19) * 4),
}
FAILURES = {  # (model, workload, L) -> status
    ("transformer", "prefill", 8192): "oom",
    ("transformer", "prefill", 16384): "skipped_after_oom",
    ("hybrid", "decode", 16384): "timeout",
}


def _row(run_id, model, workload, L, median, spread, extra) -> dict:
    kind = MODELS[model][0]
    row = {
        "run_id": run_id, "model": model, "kind": kind, "layout": "MMMA" if kind == "hybrid" else None,
        "impl_used": "torch-sdpa" if kind == "attention" else "torch-chunked", "device": "cpu", "dtype": "float32",
        "threads": 2, "workload": workload, "batch": 1, "seq_len": L,
        "new_tokens": 16 if workload == "decode" else None,
        "param_count": 3_200_000, "param_count_non_embedding": 3_100_000, "param_bytes": 12_800_000,
        "flops_per_token": 6.4e6 + 2 * LAYERS * D * L * (kind == "attention"),
    }
    status = FAILURES.get((model, workload, L), "ok")
    row["status"] = status
    if status != "ok":
        row["error"] = {"oom": "RuntimeError: DefaultCPUAllocator: can't allocate memory",
                        "timeout": "point exceeded timeout_s=120"}.get(status)
        return row
    tokens = L if workload == "prefill" else 1
    row |= {
        "error": None, "n_samples": 10, "first_call_s": median * 3, "time_median_s": median,
        "time_p25_s": median * (1 - spread), "time_p75_s": median * (1 + spread),
        "time_min_s": median * (1 - 2 * spread),
        "iqr_ratio": 2 * spread, "noisy": 2 * spread > 0.10, "tokens_per_s": tokens / median,
        "achieved_flops_per_s": row["flops_per_token"] * tokens / median,
        "achieved_bytes_per_s": (row["param_bytes"] + extra.get("cache_bytes", 0)) / median,
    } | extra
    if workload == "decode":
        row["latency_per_token_s"] = median
    return row


def write_run(root: Path, name: str = "demo", seed: int = 0, jitter: float = 0.0, spread: float = 0.03,
              slow: dict | None = None, models: tuple[str, ...] = tuple(MODELS), lengths: list[int] = LENGTHS) -> Path:
    """A run folder like ``seqbench run`` writes; ``slow`` multiplies chosen points' times, ``jitter`` adds noise."""
    rng = np.random.default_rng(seed)
    run_dir = root / f"{name}-20260101T000000Z"
    run_dir.mkdir(parents=True)
    rows = []
    for workload in ("prefill", "decode"):
        for model in models:
            _kind, pre, dec, cache = MODELS[model]
            for L in lengths:
                base = pre[0] * L + pre[1] * L * L + pre[2] if workload == "prefill" else dec[0] + dec[1] * L
                median = base * math.exp(jitter * rng.standard_normal()) * (slow or {}).get((model, workload, L), 1)
                s = 0.08 if (model, workload, L) == ("mamba", "decode", 512) else spread
                per_token = 16384 if MODELS[model][0] in ("mamba", "hybrid") else 8192
                extra = {"peak_mem_bytes": per_token * L + 2**20} if workload == "prefill" else {
                    "cache_bytes": cache(L), "peak_mem_bytes": 65536 + 4 * cache(L) // 1024}
                rows.append(_row(run_dir.name, model, workload, L, median, s, extra))
    (run_dir / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"name": name, "device": "cpu", "dtype": "float32", "threads": 2,
              "models": [{"name": m, "kind": MODELS[m][0]} for m in models],
              "sweep": {"seq_lens": lengths, "batch": [1], "workloads": ["prefill", "decode"], "new_tokens": 16}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"python": "3.11.7", "torch": "2.13.0+cpu", "cuda": None, "device": "cpu", "device_name": "AMD EPYC",
           "cpu_model": "AMD EPYC", "cores": 2, "threads": 2, "dtype": "float32", "seed": 0, "git_commit": "abc123",
           "git_dirty": False,
           "kernels": {"mamba_ssm": None, "causal_conv1d": None, "flash_attn": None, "triton": None}}
    (run_dir / "env.json").write_text(json.dumps(env))
    (run_dir / "calibration.json").write_text(json.dumps({"device": "cpu", "peak_flops_per_s": 8e10,
                                                           "peak_bytes_per_s": 1.5e10}))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def reported(run_dir) -> Path:
    """The run after ``make_report`` (which draws every figure too): built once, checked by several tests."""
    assert make_report(run_dir) == run_dir / "report.md"
    return run_dir


def test_load_run_keeps_every_point_and_failure(run_dir):
    df = load_run(run_dir)
    assert len(df) == 2 * len(MODELS) * len(LENGTHS)
    assert set(df["status"]) == {"ok", "oom", "skipped_after_oom", "timeout"}
    assert df.loc[df["status"] == "oom", "time_median_s"].isna().all()
    assert find_runs(run_dir.parent) == [run_dir]


def test_plots_are_valid_png_and_svg(reported):
    run_dir = reported
    written = sorted((run_dir / "plots").iterdir())
    stems = {p.stem for p in written}
    assert len(written) == 2 * len(stems)  # every figure as PNG and SVG
    assert {"prefill_throughput", "decode_latency", "cache_bytes", "peak_memory", "exponents", "roofline"} <= stems
    for path in written:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert ET.parse(path).getroot().tag.endswith("svg")


def test_report_names_every_model_and_length(reported):
    run_dir = reported
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    for model in MODELS:
        assert f"| {model} |" in md and f"<td>{model}</td>" in html
    for L in LENGTHS:
        assert f"| {L} " in md or f"| {L} |" in md
        assert f"<th>{L}</th>" in html
    assert "OOM" in md and "skipped (OOM)" in md and "timeout" in md
    assert "data:image/png;base64," in html and "<img" in html  # offline: images inline
    assert "torch-sdpa" in md and "3.2 M" in md  # impl_used and parameter counts
    assert "| crossover |" in md  # the quadratic transformer is overtaken: a claimed crossover row
    assert "(4 pts)" in md  # a fitted exponent row, not just the heading


def test_report_survives_a_run_with_one_length_and_only_failures(tmp_path):
    rows = [{"model": m, "kind": "mamba", "workload": "prefill", "batch": 1, "seq_len": 128,
             "status": "oom" if m == "a" else "ok", "time_median_s": None if m == "a" else 1.0,
             "time_p25_s": None if m == "a" else 0.9, "time_p75_s": None if m == "a" else 1.1,
             "tokens_per_s": None if m == "a" else 128.0} for m in ("a", "b")]
    (tmp_path / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = make_report(tmp_path).read_text()  # no env.json, config.yaml or calibration: still a report
    assert "| a | OOM |" in md and "too few points" in md
    assert (tmp_path / "plots" / "prefill_throughput.png").is_file()
    assert not (tmp_path / "plots" / "roofline.png").exists()  # no calibration, no roofline


def test_render_summary_prints_key_tables(run_dir):
    console = Console(record=True, width=160)
    raw = pd.DataFrame([json.loads(line) for line in (run_dir / "points.jsonl").read_text().splitlines()])
    render_summary(console, raw)  # as the sweep hands it over: None for unmeasured values, no normalization
    text = console.export_text()
    assert "transformer" in text and "hybrid" in text and "exponent" in text.lower() and "16384" in text


def test_compare_flags_injected_slowdown_and_ignores_noise(tmp_path):
    old = write_run(tmp_path / "a", seed=1, jitter=0.01)
    same = write_run(tmp_path / "b", seed=2, jitter=0.01)
    slow = write_run(tmp_path / "c", seed=2, jitter=0.01, slow={("mamba", "decode", 1024): 2.0})
    table, flagged = compare_runs(old, same, threshold=1.10)
    assert not flagged and not table["flagged"].any()
    assert len(table) == 2 * len(MODELS) * len(LENGTHS)
    table, flagged = compare_runs(old, slow, threshold=1.10)
    hits = table[table["flagged"]]
    assert flagged and len(hits) == 1
    assert tuple(hits.iloc[0][["model", "workload", "seq_len"]]) == ("mamba", "decode", 1024)
    assert hits.iloc[0]["ratio"] == pytest.approx(2.0, rel=0.05)
    _, flagged = compare_runs(old, slow, threshold=2.5)  # a slowdown below the threshold does not fail
    assert not flagged


def test_compare_cmd_exit_codes(tmp_path, capsys):
    old = write_run(tmp_path / "a", seed=1, jitter=0.01)
    slow = write_run(tmp_path / "c", seed=2, jitter=0.01, slow={("s4d", "prefill", 4096): 2.0})
    compare_cmd(old, old)  # identical runs: no exit
    with pytest.raises(typer.Exit) as e:
        compare_cmd(old, slow, threshold=1.10)
    assert e.value.exit_code == 1
    with pytest.raises(typer.Exit) as e:
        compare_cmd(old, tmp_path / "missing")
    assert e.value.exit_code == 2
    assert "missing" in capsys.readouterr().err


def test_commands_parse_options_and_exit_codes_reach_the_shell(tmp_path):
    """--threshold parses; exit codes reach the shell."""
    from typer.testing import CliRunner

    from seqbench.cli import app
    old = write_run(tmp_path / "a", seed=1, jitter=0.01)
    slow = write_run(tmp_path / "c", seed=2, jitter=0.01, slow={("mamba2", "decode", 256): 1.5})
    runner = CliRunner()
    assert runner.invoke(app, ["compare", str(old), str(slow)]).exit_code == 1
    assert runner.invoke(app, ["compare", str(old), str(slow), "--threshold", "1.6"]).exit_code == 0
    missing = runner.invoke(app, ["plot", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such folder" in missing.output


def test_plot_cmd_accepts_a_folder_of_runs_and_rejects_empty(tmp_path):
    small = {"models": ("transformer", "mamba"), "lengths": [256, 512, 1024]}  # small: two full reports
    write_run(tmp_path / "many", name="one", **small)
    write_run(tmp_path / "many", name="two", seed=3, **small)
    plot_cmd(tmp_path / "many")
    for run in find_runs(tmp_path / "many"):
        assert (run / "report.html").is_file() and (run / "plots" / "decode_latency.png").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(typer.Exit) as e:
        plot_cmd(tmp_path / "empty")
    assert e.value.exit_code == 2
    with pytest.raises(RunError):
        find_runs(tmp_path / "empty")
