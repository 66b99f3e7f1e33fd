"""Dense projections, y = x W^T + b, on the fastest float32 GEMM that the installed torch build offers.

On a CPU, torch's float32 matmul calls MKL, and MKL takes a narrower code path on processors that are not
Intel's. The same torch build ships oneDNN, whose float32 matmul (``torch.ops.mkldnn._linear_pointwise``,
the op torch's own compiler emits for CPU linear layers) picks its kernels from the CPU's instruction sets:
on an AMD EPYC with AVX-512 it runs about twice as fast (``benchmarks/gemm.py`` prints both; docs/design.md
§3 has the figures). At torch's default float32 matmul precision, which seqbench never changes, both are
IEEE float32 products; only the order of the sums differs.

Where oneDNN is not the faster one, the choice stays with torch: products of fewer than ONEDNN_MIN_MACS
multiply-adds (a decode step of a small model at a small batch, tiny layers), where oneDNN's fixed ~12 µs
per call costs more than it saves; any device but the CPU; any dtype but float32 (torch already routes CPU
bfloat16 to oneDNN). ``gemm_used`` names the choice for one product; runs record it in env.json and
calibration.json.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from seqbench.ops import tracks_grad

ONEDNN_MIN_MACS = 1 << 22  # measured: below ~4M multiply-adds (e.g. 8 x 256 x 1288) MKL is as fast or faster


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


GEMM = "onednn" if onednn_available() else "torch"  # the float32 CPU GEMM of large products


def gemm_used(x: Tensor, weight: Tensor) -> str:
    """The GEMM that ``linear(x, weight)`` runs on: "onednn" or "torch"."""
    large = x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
    on_cpu_fp32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    return GEMM if large and on_cpu_fp32 else "torch"


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., k) @ weight (m, k)^T + bias (m,) -> (..., m), contiguous. weight may be a strided view (read as
    it lies); a strided x is made contiguous by torch first."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for x (..., k), weight (m, k), on the GEMM ``gemm_used`` names."""
    if gemm_used(x, weight) != "onednn":
        return F.linear(x, weight, bias)
    if tracks_grad(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(dy, weight.t(), None)  # dy (..., m) @ weight (m, k): weight^T is the (k, m) "weight"
        dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, m)
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dy (t, m)^T @ x (t, k) -> (m, k), a reduction over the t tokens, on oneDNN with the smaller of m and k
    as its rows: measured at t = 4096, that orientation beats MKL's torch.mm and the other one does not."""
    if dy.shape[1] <= x.shape[1]:
        return _onednn(dy.t(), x.t(), None)  # (m, k)
    return _onednn(x.t(), dy.t(), None).t()  # (k, m) computed, returned as its (m, k) transpose


class Linear(nn.Linear):
    """nn.Linear (same parameters, state_dict and initialisation) whose product runs on ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
