"""Benchmark of the Mamba-1 reference ops on CPU: ``python benchmarks/ops_bench.py`` (``make bench``).

Three comparisons at float32, b=1, d_inner=512, d_state=16, L=4096 by default (Gu & Dao 2023, Mamba §3.3 on
why the scan must not be computed step by step):

(a) selective-scan forward: seqbench's chunked scan vs a per-timestep loop;
(b) forward + backward of the same: chunked (hand-written chunk-recomputing backward) vs autograd through the loop;
(c) one Mamba-1 layer prefill: ``seqbench.models.mamba.Mamba`` vs Hugging Face transformers' ``MambaMixer`` pure
    PyTorch path, both holding the same state_dict (the HF layer is built from a config in code; nothing is
    downloaded).

Timing: one warm-up call each, then ``--repeats`` timed calls alternating seqbench and the baseline (so both see
the same load on a shared machine); the table shows medians, the interquartile range relative to the median,
and the speed-up (baseline median / seqbench median) against the target.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from seqbench.ops.scan import selective_scan

TARGETS = {"scan forward": 5.0, "scan forward+backward": 10.0, "Mamba layer prefill": 3.0}


def loop_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor
) -> Tensor:
    """The baseline: discretise the whole sequence at once, then one state update per time step.

    Slices come from ``unbind`` so autograd stacks their gradients once, instead of materialising a full-size
    zero gradient per indexed step (which would make the baseline quadratic rather than merely sequential).
    """
    delta = F.softplus(delta + delta_bias[:, None])  # (b, d, l)
    dA = torch.exp(delta.transpose(1, 2).unsqueeze(-1) * A)  # (b, l, d, n)
    dBu = (delta * u).transpose(1, 2).unsqueeze(-1) * B.permute(0, 2, 1).unsqueeze(2)  # (b, l, d, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for a_t, x_t, c_t in zip(dA.unbind(1), dBu.unbind(1), C.unbind(2), strict=True):
        h = torch.addcmul(x_t, a_t, h)
        ys.append(torch.bmm(h, c_t.unsqueeze(-1)).squeeze(-1))  # (b, d)
    y = torch.stack(ys, dim=-1) + D[:, None] * u  # (b, d, l)
    return y * F.silu(z)


def timeit(ours: Callable[[], object], base: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Times of ``repeats`` calls of each, alternating so both see the same machine load; one warm-up each."""
    ours(), base()  # warm-up: allocator, thread pool, lazy imports
    t_ours, t_base = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (base, t_base)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return t_ours, t_base


def _stats(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return med, (q[2] - q[0]) / med


def _scan_inputs(d: int, n: int, l: int, requires_grad: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, d, l, generator=g) for _ in range(3))
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    B, C = torch.randn(1, n, l, generator=g), torch.randn(1, n, l, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g) - 2
    return [t.requires_grad_(requires_grad) for t in (u, delta, A, B, C, D, z, bias)]


def _ours(u, delta, A, B, C, D, z, bias):
    return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)


def bench_scan(d: int, n: int, l: int, repeats: int) -> list[tuple]:
    rows = []
    args = _scan_inputs(d, n, l, requires_grad=False)
    with torch.no_grad():
        diff = (_ours(*args) - loop_scan(*args)).abs().max().item()
        t_ours, t_loop = timeit(lambda: _ours(*args), lambda: loop_scan(*args), repeats)
    rows.append(("scan forward", t_ours, t_loop, f"max|diff| {diff:.1e}"))

    args = _scan_inputs(d, n, l, requires_grad=True)
    w = torch.randn(1, d, l, generator=torch.Generator().manual_seed(1))

    def fwd_bwd(fn):
        def run():
            for t in args:
                t.grad = None
            (fn(*args) * w).sum().backward()

        return run

    fwd_bwd(_ours)()
    grads = [t.grad.clone() for t in args]
    fwd_bwd(loop_scan)()
    gdiff = max(((a - t.grad).abs().max() / t.grad.abs().max()).item() for a, t in zip(grads, args, strict=True))
    t_ours, t_loop = timeit(fwd_bwd(_ours), fwd_bwd(loop_scan), repeats)
    rows.append(("scan forward+backward", t_ours, t_loop, f"max rel grad diff {gdiff:.1e}"))
    return rows


def bench_layer(d_inner: int, n: int, l: int, repeats: int) -> tuple:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the HF layer comes from a config in code
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from seqbench.models.mamba import Mamba

    d_model = d_inner // 2
    torch.manual_seed(0)
    ours = Mamba(d_model, d_state=n, expand=2).eval()
    config = MambaConfig(
        hidden_size=d_model, state_size=n, expand=2, conv_kernel=ours.d_conv, time_step_rank=ours.dt_rank,
        num_hidden_layers=1, use_bias=False, use_conv_bias=True, use_mambapy=False,
    )
    hf = MambaMixer(config, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, l, d_model, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        y_ours, y_hf = ours(x), hf(x)
        diff = ((y_ours - y_hf).abs().max() / y_hf.abs().max()).item()
        t_ours, t_hf = timeit(lambda: ours(x), lambda: hf(x), repeats)
    return ("Mamba layer prefill", t_ours, t_hf, f"vs HF MambaMixer, max rel diff {diff:.1e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/ops_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--d-inner", type=int, default=512)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-layer", action="store_true", help="skip (c), the comparison with transformers")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"seqbench ops bench: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={a.threads}, float32, b=1, d_inner={a.d_inner}, d_state={a.d_state}, L={a.length}, "
          f"repeats={a.repeats}, load average {load:.2f}")
    rows = bench_scan(a.d_inner, a.d_state, a.length, a.repeats)
    if not a.skip_layer:
        rows.append(bench_layer(a.d_inner, a.d_state, a.length, a.repeats))
    head = f"{'case':<24}{'seqbench ms':>12}{'iqr':>6}{'baseline ms':>13}{'iqr':>6}{'speed-up':>10}{'target':>8}  check"
    print(head)
    print("-" * (len(head) + 30))
    for name, t_ours, t_base, note in rows:
        (m1, q1), (m2, q2) = _stats(t_ours), _stats(t_base)
        ratio, target = m2 / m1, TARGETS[name]
        verdict = "ok" if ratio >= target else "MISSED"
        print(f"{name:<24}{m1 * 1e3:>12.1f}{q1:>6.2f}{m2 * 1e3:>13.1f}{q2:>6.2f}{ratio:>9.1f}x{target:>7.0f}x  "
              f"{verdict}  ({note})")
    print("baseline: (a, b) per-timestep loop over the discretised sequence; (c) transformers MambaMixer torch path")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
