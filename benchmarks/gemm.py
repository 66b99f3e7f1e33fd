"""torch's float32 matmul against seqbench's projection GEMM (ops/gemm.py): ``python benchmarks/gemm.py``.

For the products of one layer's forward and backward at d_model 256 (Mamba-2's in_proj and out_proj, b*L
tokens), and for a few decode-sized products, prints GFLOP/s of ``torch.matmul`` and of what seqbench runs:
``linear`` for the forward and the input gradient, ``weight_grad`` for the weight gradient. Each is the
median of ``--repeats`` calls; the two sides are measured one after the other, so compare them on a quiet
machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seqbench.ops.gemm import GEMM, ONEDNN_MIN_MACS, linear, weight_grad


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the layer products (b * L)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t = a.tokens
    # (what, rows, in, out): y (rows, out) = x (rows, in) @ W (out, in)^T
    cases = [("in_proj fwd", t, 256, 1288), ("out_proj fwd", t, 512, 256), ("in_proj dx", t, 1288, 256),
             ("out_proj dx", t, 256, 512), ("decode b=1", 1, 256, 1288), ("decode b=64", 64, 256, 1288)]
    print(f"float32, {a.threads} threads, seqbench GEMM for large products: {GEMM} "
          f"(from {ONEDNN_MIN_MACS} multiply-adds)")
    print(f"{'product':<16}{'rows x in x out':>18}{'torch GFLOP/s':>15}{'seqbench':>10}{'ratio':>7}")
    for what, rows, k, m in cases:
        x, w = torch.randn(rows, k), torch.randn(m, k)
        theirs = _median_s(lambda: torch.matmul(x, w.t()), a.repeats)  # noqa: B023 (called at once)
        ours = _median_s(lambda: linear(x, w), a.repeats)  # noqa: B023
        flops = 2 * rows * k * m
        print(f"{what:<16}{f'{rows}x{k}x{m}':>18}{flops / theirs / 1e9:>15.0f}{flops / ours / 1e9:>10.0f}"
              f"{theirs / ours:>7.2f}")
    for what, m, k in [("in_proj dW", 1288, 256), ("out_proj dW", 256, 512)]:
        dy, x = torch.randn(t, m), torch.randn(t, k)
        theirs = _median_s(lambda: torch.mm(dy.t(), x), a.repeats)  # noqa: B023
        ours = _median_s(lambda: weight_grad(dy, x), a.repeats)  # noqa: B023
        flops = 2 * t * m * k
        print(f"{what:<16}{f'{m}x{t}x{k}':>18}{flops / theirs / 1e9:>15.0f}{flops / ours / 1e9:>10.0f}"
              f"{theirs / ours:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
