"""``seqbench gpu-check``: the first thing to run on a GPU (docs/design.md, "The GPU path").

1. Parity on CUDA of every fast kernel against its PyTorch reference, one PASS/FAIL line each with the max
   error (a kernel that cannot run is a FAIL that says why).
2. A short sweep (configs/gpu-check.yaml): all five kinds in bf16 with the fast kernels and CUDA-graph decode;
   every point must be ``ok``.

Without a CUDA device it says so and exits 2, before importing any kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import seqbench.ops as ops

NO_CUDA = ("no CUDA device: torch sees none on this machine, and gpu-check needs one "
           "(without a GPU, `make test` runs the contract tests against the kernels' references)")


def has_cuda() -> bool:
    return torch.cuda.is_available()


@dataclass
class Parity:
    op: str
    case: str
    max_error: float | None
    tolerance: float
    reason: str | None = None  # why the fast kernel could not run

    @property
    def ok(self) -> bool:
        return self.reason is None and self.max_error is not None and self.max_error <= self.tolerance

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        detail = self.reason or f"max |fast - ref| = {self.max_error:.2e} (tolerance {self.tolerance:.0e})"
        return f"{status}  {self.op:<24} {self.case:<22} {detail}"


def _cases(device: str) -> list[tuple[str, str, torch.dtype, Callable[[], tuple], float]]:
    """(op, case, dtype, make inputs, tolerance). Inputs are built fresh for each implementation (some update
    a state in place); the same seed makes them equal."""

    def _rand(*shape: int, dtype=torch.float32) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    b, d, l, n = 2, 256, 512, 16
    h, p, g, q = 8, 64, 1, 128

    def scan():
        return (_rand(b, d, l), _rand(b, d, l), -torch.rand(d, n, device=device) * 4, _rand(b, n, l), _rand(b, n, l),
                _rand(d), _rand(b, d, l), _rand(d), True, None, True)

    def state_update_m1():
        return (_rand(b, d, n), _rand(b, d), _rand(b, d), -torch.rand(d, n, device=device), _rand(b, n), _rand(b, n),
                _rand(d), _rand(b, d), _rand(d).abs(), True)

    def state_update_m2():
        return (_rand(b, h, p, n), _rand(b, h, p), _rand(b, h, p), -torch.rand(h, 1, 1, device=device).expand(h, p, n),
                _rand(b, g, n), _rand(b, g, n), _rand(h, p), None, _rand(h, 1).abs().expand(h, p), True)

    def ssd():
        return (_rand(b, l, h, p), _rand(b, l, h), -torch.rand(h, device=device) * 4, _rand(b, l, g, n),
                _rand(b, l, g, n), q, _rand(h), None, _rand(h), True, _rand(b, h, p, n), True)

    def conv(state: bool):
        return lambda: (_rand(b, d, l), _rand(d, 4), _rand(d), "silu", _rand(b, d, 4) if state else None)

    def conv_update():
        return (_rand(b, d), _rand(b, d, 4), _rand(d, 4), _rand(d), "silu")

    def attention():
        bf = torch.bfloat16
        return (_rand(b, l, 16, 64, dtype=bf), _rand(b, l, 4, 64, dtype=bf), _rand(b, l, 4, 64, dtype=bf), True)

    def attention_kvcache():
        bf = torch.bfloat16
        return (_rand(b, 1, 16, 64, dtype=bf), _rand(b, l, 4, 64, dtype=bf), _rand(b, l, 4, 64, dtype=bf),
                _rand(b, 1, 4, 64, dtype=bf), _rand(b, 1, 4, 64, dtype=bf), l // 2)

    f32, bf16 = torch.float32, torch.bfloat16
    return [
        ("selective_scan", "fp32 b2 d256 L512", f32, scan, 2e-3),
        ("selective_state_update", "Mamba-1 layout", f32, state_update_m1, 2e-3),
        ("selective_state_update", "Mamba-2 layout", f32, state_update_m2, 2e-3),
        ("ssd", "fp32 h8 p64 L512 +state", f32, ssd, 5e-3),
        ("causal_conv1d", "fp32 no state", f32, conv(False), 1e-4),
        ("causal_conv1d", "fp32 initial state", f32, conv(True), 1e-4),
        ("causal_conv1d_update", "fp32", f32, conv_update, 1e-4),
        ("attention", "bf16 GQA 16/4 L512", bf16, attention, 3e-2),
        ("attention_kvcache", "bf16 GQA append", bf16, attention_kvcache, 3e-2),
    ]


def _outputs(result) -> list[Tensor]:
    return [t.float() for t in (result if isinstance(result, tuple) else (result,))]


def kernel_parity(device: str = "cuda") -> list[Parity]:
    """Fast against reference for every case. (The contract tests run it on the CPU with the libraries'
    references standing in for the kernels.)"""
    results = []
    for op, case, dtype, make, tol in _cases(device):
        reason = ops.fast_unusable(op, device, dtype)
        if reason is not None:
            results.append(Parity(op, case, None, tol, reason))
            continue
        outs = []
        for impl in ("fast", "ref"):
            torch.manual_seed(0)
            args = make()
            outs.append(_outputs(ops.get(op, impl, device, dtype)[0](*args)) + [a.float() for a in args[:2]])
        err = max((a - r).abs().max().item() for a, r in zip(*outs, strict=True))  # outputs and in-place states
        results.append(Parity(op, case, err, tol))
    return results


def parity_report(console) -> int:
    """Print the parity table on CUDA to a rich console; return the number of failures."""
    echo = functools.partial(console.print, highlight=False)
    echo(f"kernel parity on {torch.cuda.get_device_name()} (fast vs reference):")
    results = kernel_parity()
    for r in results:
        echo(r.line())
    return sum(not r.ok for r in results)


def sweep_report(exp, console, failed: int = 0) -> int:
    """Run the experiment into a new run folder, one PASS/FAIL line per point, then the verdict with the
    ``failed`` checks before it; return the exit code (1 on any failure)."""
    echo = functools.partial(console.print, highlight=False)
    from seqbench.run import sweep

    state = sweep.prepare_run(exp)
    echo(f"sweep {exp.name} -> {state.run_dir}")
    rows = sweep.run_sweep(state)
    sweep.write_tables(state)
    for r in rows:
        what = (f"{r['time_median_s'] * 1e3:.3f} ms  {r['impl_used']}  cuda_graph={r['cuda_graph']}"
                if r["status"] == "ok" else f"{r['status']}: {r['error']}")
        echo(f"{'PASS' if r['status'] == 'ok' else 'FAIL'}  {r['model']:<12} {r['workload']:<8} b={r['batch']} "
             f"L={r['seq_len']:<6} {what}")
    failed += sum(r["status"] != "ok" for r in rows)
    echo("all passed" if not failed else f"FAILED: {failed} failures")
    return 1 if failed else 0
