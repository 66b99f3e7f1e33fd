"""The GPU path's CPU-visible parts: the parent of a process-isolated sweep leaves the device to the workers,
cuda_graph and reserved-memory columns, and the config checks that stop a GPU run before it starts."""

from __future__ import annotations

import json

import pytest

from seqbench.experiment import experiment_from_dict
from seqbench.run import sweep


def _exp(**measure):
    return experiment_from_dict({
        "name": "g", "device": "cpu", "threads": 1,
        "models": [{"name": "m", "kind": "mamba", "d_model": 32, "n_layers": 1}],
        "sweep": {"seq_lens": [16], "workloads": ["prefill", "decode"], "new_tokens": 3},
        "measure": {"warmup": 1, "min_samples": 2, "min_time_s": 0.0, **measure},
    })


def _forbidden(*args, **kwargs):
    raise AssertionError("the parent process touched the device")


def test_process_isolation_probes_and_calibrates_in_a_worker(tmp_path, monkeypatch):
    """Under process isolation, env.json and calibration.json come from a worker: the parent's own snapshot and
    calibrate (which would create a CUDA context and keep memory on a GPU) are never called."""
    monkeypatch.setattr(sweep, "snapshot", _forbidden)
    monkeypatch.setattr(sweep, "calibrate", _forbidden)
    state = sweep.prepare_run(_exp(isolation="process", calibrate=True), tmp_path)
    rows = sweep.run_sweep(state)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert json.loads((state.run_dir / "env.json").read_text())["device"] == "cpu"
    assert json.loads((state.run_dir / "calibration.json").read_text())["peak_flops_per_s"] > 0
    with pytest.raises(AssertionError, match="touched the device"):  # inline measures in this process
        sweep.run_sweep(sweep.prepare_run(_exp(isolation="inline", calibrate=True), tmp_path / "inline"))


def test_rows_record_the_graph_and_reserved_memory_columns(tmp_path):
    rows = sweep.run_sweep(sweep.prepare_run(_exp(calibrate=False), tmp_path))
    assert [r["cuda_graph"] for r in rows] == [False, False]  # no graphs on a CPU
    assert [r["peak_reserved_bytes"] for r in rows] == [None, None]  # a CUDA allocator figure


@pytest.mark.parametrize("text, expected", [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_cuda_graph_switch_reads_yaml_on_and_off(write_config, text, expected):
    from seqbench.experiment import load_experiment

    path = write_config(f"name: g\nmodels: [{{name: m, kind: mamba}}]\nsweep: {{seq_lens: [8]}}\n"
                        f"measure: {{cuda_graph: {text}}}\n")
    assert load_experiment(path).measure.cuda_graph == expected


def test_cuda_graph_on_without_cuda_is_a_config_error(write_config):
    from typer.testing import CliRunner

    from seqbench.cli import app

    path = write_config("name: g\ndevice: cpu\nmodels: [{name: m, kind: mamba}]\nsweep: {seq_lens: [8]}\n"
                        "measure: {cuda_graph: on}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "measure.cuda_graph: on needs a CUDA device" in result.output


@pytest.mark.parametrize("model, refused", [
    ("{name: m, kind: mamba, d_model: 64, impl: fast}", "selective_scan_fn cannot start from a cached state"),
    ("{name: d, kind: mamba2, d_model: 64, d_state: 18, headdim: 32, impl: fast}", "conv channels % 8 == 0"),
])
def test_fast_kernels_that_would_continue_a_prefill_are_refused_before_the_sweep(write_config, model, refused):
    """Checked before the device: the same config fails on a GPU machine, not after hours of sweeping."""
    from typer.testing import CliRunner

    from seqbench.cli import app

    path = write_config(f"name: g\ndevice: cpu\nmodels: [{model}]\nsweep: {{seq_lens: [64, 256]}}\n"
                        "measure: {prefill_chunk: 128}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "prefill_chunk (128) continues prompts" in result.output and refused in result.output


def test_the_captured_step_is_the_eager_decode_step():
    """GraphedDecode's body (what CUDA captures), run eagerly on the CPU: the step at the device-side position
    gives the logits of the eager decode call at context L, call after call (SSM states advance in both)."""
    import torch

    from seqbench.models import build_model
    from seqbench.run.cudagraph import GraphedDecode
    from seqbench.run.workloads import _tokens, decode

    spec = experiment_from_dict({"name": "g", "sweep": {"seq_lens": [8]}, "models": [
        {"name": "h", "kind": "hybrid", "layout": "MDSA", "d_model": 32, "n_layers": 4, "n_heads": 4, "d_state": 8,
         "headdim": 16, "chunk_size": 8}]}).models[0]
    torch.manual_seed(0)
    model = build_model(spec).eval()
    eager = decode(model, 2, 10, torch.device("cpu"), seed=3)
    other = decode(model, 2, 10, torch.device("cpu"), seed=3)  # the same context and token, its own cache
    token = _tokens(model, 2, 1, torch.device("cpu"), 3 + 1)  # the token decode() steps with (seed + 1)
    body = GraphedDecode(model, other.cache, token, pos=10)
    for _ in range(3):
        torch.testing.assert_close(body.step(), eager.call(), rtol=1e-4, atol=1e-4)
    assert body.pos.tolist() == [10]  # every call is the step at context L
    for a, b in zip(eager.cache.tensors(), other.cache.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

