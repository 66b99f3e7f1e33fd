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
    # (what, m, k, n, make): a product (m, k) @ (k, n) and the operands of both sides; rows are tokens
    def projection(rows, k, n):  # y = x W^T
        x, w = torch.randn(rows, k), torch.randn(n, k)
        return (lambda: torch.matmul(x, w.t())), (lambda: linear(x, w))

    def weight_gradient(m, t, k):  # dW = dy^T x
        dy, x = torch.randn(t, m), torch.randn(t, k)
        return (lambda: torch.mm(dy.t(), x)), (lambda: weight_grad(dy, x))

    cases = [("in_proj fwd", t, 256, 1288, projection), ("out_proj fwd", t, 512, 256, projection),
             ("in_proj dx", t, 1288, 256, projection), ("out_proj dx", t, 256, 512, projection),
             ("in_proj dW", 1288, t, 256, weight_gradient), ("out_proj dW", 256, t, 512, weight_gradient),
             ("decode b=1", 1, 256, 1288, projection), ("decode b=64", 64, 256, 1288, projection)]
    print(f"float32, {a.threads} threads, seqbench GEMM for large products: {GEMM} "
          f"(from {ONEDNN_MIN_MACS} multiply-adds)")
    print(f"{'product':<16}{'m x k x n':>18}{'torch GFLOP/s':>15}{'seqbench':>10}{'ratio':>7}")
    for what, m, k, n, make in cases:
        theirs_fn, ours_fn = make(m, k, n)
        theirs, ours = _median_s(theirs_fn, a.repeats), _median_s(ours_fn, a.repeats)
        flops = 2 * m * k * n
        print(f"{what:<16}{f'{m}x{k}x{n}':>18}{flops / theirs / 1e9:>15.0f}{flops / ours / 1e9:>10.0f}"
              f"{theirs / ours:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
