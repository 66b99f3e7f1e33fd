"""Timing statistics, memory tracking, cache bytes and failure rows (issue 4)."""

import json
import math

import pytest
import torch

from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model
from seqbench.run.measure import Clock, PeakMemory, TimingPolicy, quantile, summarize, time_repeated
from seqbench.run.sweep import plan_grid, prepare_run, run_sweep


def test_summary_statistics_of_known_samples():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n_samples, s.time_median_s, s.time_min_s) == (5, 3.0, 1.0)
    assert (s.time_p25_s, s.time_p75_s) == (2.0, 4.0)
    assert s.iqr_ratio == pytest.approx(2 / 3) and s.noisy
    quiet = summarize([1.0, 1.01, 0.99, 1.0])
    assert not quiet.noisy and quiet.iqr_ratio < 0.1
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_timer_honours_min_samples_and_min_time():
    calls = []
    first, samples = time_repeated(lambda: calls.append(1), Clock(torch.device("cpu")),
                                   TimingPolicy(warmup=3, min_samples=7, max_samples=100, min_time_s=0.0))
    assert len(samples) == 7 and len(calls) == 3 + 7 and first >= 0
    _, samples = time_repeated(lambda: torch.ones(1000).sum(), Clock(torch.device("cpu")),
                               TimingPolicy(warmup=1, min_samples=2, max_samples=10**6, min_time_s=0.05))
    assert sum(samples) >= 0.05


def test_peak_memory_of_known_allocation_within_5_percent():
    size = 256 * 2**20
    with PeakMemory(torch.device("cpu")) as mem:
        t = torch.ones(size // 4, dtype=torch.float32)  # touches every page
        del t
    assert mem.peak_bytes == pytest.approx(size, rel=0.05)


def test_peak_memory_after_freed_medium_tensors():
    """Memory freed before the measured block must not hide an allocation inside it."""
    blocks = [torch.ones(2 * 2**20) for _ in range(32)]  # 32 × 8 MiB, then freed
    del blocks
    with PeakMemory(torch.device("cpu")) as mem:
        blocks = [torch.ones(2 * 2**20) for _ in range(32)]
        del blocks
    assert mem.peak_bytes == pytest.approx(256 * 2**20, rel=0.05)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_cache_bytes_equal_the_formula(n_kv_heads):
    model_spec = {"name": "a", "kind": "attention", "d_model": 64, "n_layers": 3, "n_heads": 4,
                  "n_kv_heads": n_kv_heads}
    spec = experiment_from_dict({"name": "c", "models": [model_spec], "sweep": {"seq_lens": [8]}}).models[0]
    model = build_model(spec)
    b, L, head_dim = 2, 100, 16
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = model.allocate_cache(b, L, dtype=dtype)
        assert cache.nbytes() == 2 * 3 * b * L * n_kv_heads * head_dim * size


def _exp(**measure):
    return experiment_from_dict({
        "name": "m", "device": "cpu", "threads": 2,
        "models": [{"name": "a", "kind": "attention", "d_model": 32, "n_layers": 1, "n_heads": 2},
                   {"name": "b", "kind": "attention", "d_model": 64, "n_layers": 1, "n_heads": 4}],
        "sweep": {"seq_lens": [16, 32, 64], "workloads": ["prefill", "decode"], "new_tokens": 6},
        "measure": {"warmup": 1, "min_samples": 3, "min_time_s": 0.0, "calibrate": False, **measure},
    })


def test_grid_interleaves_models_within_a_length():
    grid = plan_grid(_exp())
    assert len(grid) == 2 * 3 * 2
    prefill = [k for k in grid if k[1] == "prefill"]
    assert [k[0] for k in prefill] == ["a", "b", "b", "a", "a", "b"]
    assert [k[3] for k in prefill] == [16, 16, 32, 32, 64, 64]


def test_sweep_rows_decode_samples_cache_and_env(tmp_path):
    exp = _exp()
    state = prepare_run(exp, tmp_path)
    rows = run_sweep(state)
    assert len(rows) == len(plan_grid(exp)) and all(r["status"] == "ok" for r in rows)
    decode = [r for r in rows if r["workload"] == "decode"]
    assert all(r["n_samples"] == 6 for r in decode)  # exactly new_tokens per-step samples
    for r in decode:
        d, heads = (32, 2) if r["model"] == "a" else (64, 4)
        # (k, v) · layers · batch · L · kv width · fp32
        assert r["cache_bytes"] == 2 * 1 * 1 * r["seq_len"] * heads * (d // heads) * 4
        assert r["latency_per_token_s"] == r["time_median_s"] > 0
        assert math.isclose(r["tokens_per_s"], 1 / r["time_median_s"])
    prefill = [r for r in rows if r["workload"] == "prefill"]
    assert all(r["tokens_per_s"] == pytest.approx(r["seq_len"] / r["time_median_s"]) for r in prefill)
    assert all(r["param_bytes"] == 4 * r["param_count"] and r["flops_per_token"] > 0 for r in rows)
    env = json.loads((state.run_dir / "env.json").read_text())
    for key in ("python", "torch", "cuda", "device_name", "cpu_model", "cores", "threads", "dtype", "seed",
                "git_commit", "git_dirty", "kernels"):
        assert key in env
    assert set(env["kernels"]) == {"mamba_ssm", "causal_conv1d", "flash_attn", "triton"}
    lines = [json.loads(line) for line in (state.run_dir / "points.jsonl").read_text().splitlines()]
    # one line per point, plus one per re-measurement of a noisy point; the last line of a key is its row
    assert len(lines) == len(rows) + sum(r["remeasure_rounds"] for r in rows)
    last = {(r["model"], r["workload"], r["batch"], r["seq_len"]): r for r in lines}
    assert list(last.values()) != [] and all(last[(r["model"], r["workload"], r["batch"], r["seq_len"])] == r
                                             for r in rows)


FAILURE_MODELS = {
    # train logits of (L, 32768) floats need > 0.25 GiB from L = 4096 on
    "oom": ({"name": "wide", "kind": "attention", "d_model": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 32768},
            [32, 4096, 8192], {"memory_limit_gb": 0.25, "timeout_s": 60}, ("ok", "oom", "skipped_after_oom")),
    # attention backward at L = 65536 takes far more than 5 s on 2 cores
    "timeout": ({"name": "slow", "kind": "attention", "d_model": 64, "n_layers": 2, "n_heads": 4},
                [32, 65536, 131072], {"timeout_s": 5}, ("ok", "timeout", "skipped_after_timeout")),
}


@pytest.mark.parametrize("isolation", ["inline", "process"])
@pytest.mark.parametrize("failure", sorted(FAILURE_MODELS))
def test_failures_become_rows_and_the_grid_stays_complete(tmp_path, isolation, failure):
    model, lengths, measure, expected = FAILURE_MODELS[failure]
    exp = experiment_from_dict({
        "name": failure, "device": "cpu", "threads": 2, "models": [model],
        "sweep": {"seq_lens": lengths, "workloads": ["train"]},
        "measure": {"warmup": 1, "min_samples": 2, "min_time_s": 0, "calibrate": False, "isolation": isolation,
                    **measure},
    })
    rows = run_sweep(prepare_run(exp, tmp_path))
    assert [r["status"] for r in rows] == list(expected)
    assert [r["seq_len"] for r in rows] == lengths
    assert rows[1]["error"]


def test_worker_killed_by_sigkill_becomes_oom_killed_row():
    """The kernel's OOM killer ends a worker with SIGKILL; the parent must record that, not crash."""
    import multiprocessing as mp
    import os
    import signal
    import threading
    import time

    from seqbench.run.executors import ProcessExecutor
    from seqbench.run.point import PointSpec

    exp = experiment_from_dict({
        "name": "killed", "device": "cpu", "threads": 1,
        "models": [{"name": "slow", "kind": "attention", "d_model": 64, "n_layers": 2, "n_heads": 4}],
        "sweep": {"seq_lens": [65536], "workloads": ["train"]},
        "measure": {"timeout_s": 120, "calibrate": False, "isolation": "process"},
    })
    spec = PointSpec("r", exp.model_dump(mode="json"), "slow", "train", 1, 65536, "cpu")
    result = {}
    worker = threading.Thread(target=lambda: result.update(row=ProcessExecutor().run(spec)))
    worker.start()
    deadline = time.monotonic() + 60
    while not mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # let it get into the measurement
    (child,) = mp.active_children()
    os.kill(child.pid, signal.SIGKILL)
    worker.join(60)
    assert result["row"]["status"] == "oom_killed"
    assert "SIGKILL" in result["row"]["error"]
