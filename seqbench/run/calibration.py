"""Roofline calibration: the peak matmul FLOP/s and copy bandwidth of a device, measured once per run
(calibration.json) so that every row can say what fraction of the hardware's reach it used.

The matmul is the one the models' projections run on (``seqbench.ops.gemm.linear``: oneDNN for float32 on a
CPU that has it), so the peak is what the hardware reaches through seqbench's own GEMM, and ``gemm`` says which."""

from __future__ import annotations

import functools

import torch

from seqbench.ops.gemm import gemm_used, linear
from seqbench.run.measure import Clock, TimingPolicy, time_repeated


def calibrate(
    device: torch.device, dtype: torch.dtype = torch.float32, matmul_n: int = 2048, copy_mib: int = 256
) -> dict:
    """Measure peak dense matmul FLOP/s and memory bandwidth (copy: read + write) on ``device``.

    Each figure is the best of several timed runs: it stands for what the hardware can reach, not a typical run.
    """
    clock = Clock(device)
    policy = TimingPolicy(warmup=2, min_samples=5, max_samples=50, min_time_s=0.5)
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    _, samples = time_repeated(functools.partial(linear, a, b), clock, policy)  # a @ b^T
    peak_flops = 2 * matmul_n**3 / min(samples)
    gemm = gemm_used(a, b)
    del a, b
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    _, samples = time_repeated(lambda: dst.copy_(src), clock, policy)
    peak_bytes = 2 * n * 4 / min(samples)
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "matmul_n": matmul_n,
        "gemm": gemm,
        "peak_flops_per_s": peak_flops,
        "copy_mib": copy_mib,
        "peak_bytes_per_s": peak_bytes,
    }
