"""The GPU configs plan on a CPU: configs/gpu.yaml's dry run lists the grid with parameter counts within ±10%
of the sizes in the model names and predicted cache bytes; gpu-check says there is no CUDA device and exits 2."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from seqbench.cli import app
from seqbench.experiment import load_experiment
from seqbench.models import describe_model
from seqbench.run.sweep import plan_grid

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_gpu_config_plans_matched_models_at_their_stated_sizes():
    exp = load_experiment(CONFIGS / "gpu.yaml")
    assert exp.dtype == "bfloat16" and exp.device == "cuda"
    assert [m.kind for m in exp.models] == ["attention", "mamba", "mamba2", "hybrid"]
    for spec in exp.models:
        stated = float(re.search(r"(\d+(?:\.\d+)?)b$", spec.name)[1]) * 1e9
        params = describe_model(spec, 1, exp.dtype)["params"]
        assert abs(params / stated - 1) <= 0.10, (spec.name, params)
    grid = plan_grid(exp)
    assert {k[3] for k in grid if k[1] == "prefill"} == {2**i for i in range(9, 17)}  # 512 .. 65536
    assert {k[3] for k in grid if k[1] == "decode" and k[2] == 1} == {2**i for i in range(9, 18)}  # .. 131072
    assert {k[2] for k in grid if k[1] == "decode" and k[3] == 2048} == {2**i for i in range(8)}  # batch 1 .. 128
    assert len(grid) == len(set(grid)) == 4 * (8 + 9 + 8 - 1)  # b=1 at 2048 is one point of two grids


def test_gpu_config_dry_run_on_a_cpu_lists_sizes_and_cache_bytes():
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "gpu.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "96 points on cuda (bfloat16)" in result.output
    assert "cache/sequence @ L=131,072" in result.output
    row = next(line for line in result.output.splitlines() if "transformer-1.3b" in line)
    # K and V · 24 layers · 131072 positions · 2048 wide · 2 bytes (bf16) = 24 GiB
    assert "24 GiB" in row and "1,413,957,632" in row
    assert "a run would stop here" in result.output  # it says why it would not run on this machine


def test_gpu_check_config_demands_fast_kernels_and_graphs_for_all_five_kinds():
    exp = load_experiment(CONFIGS / "gpu-check.yaml")
    assert {m.kind for m in exp.models} == {"attention", "mamba", "mamba2", "s4d", "hybrid"}
    assert all(m.impl == "fast" for m in exp.models if m.kind != "s4d")  # S4D has no fast kernel
    assert exp.dtype == "bfloat16" and exp.measure.cuda_graph == "on"


def test_gpu_check_without_cuda_exits_2_and_says_why():
    result = CliRunner().invoke(app, ["gpu-check", str(CONFIGS / "gpu-check.yaml")])
    assert result.exit_code == 2
    assert "no CUDA device" in result.output
