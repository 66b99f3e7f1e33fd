"""Gated RMSNorm of Mamba-2 (Dao & Gu 2024, §7: a norm before out_proj, gated by SiLU(z)), with its gradient.

    norm_before_gate=False:  out = n w,           n = s r,  s = y silu(z)
    norm_before_gate=True:   out = n w silu(z),   n = s r,  s = y
    r = (mean over each group of s^2 + eps)^(-1/2)

Statistics and arithmetic in float32 (float64 for float64 input); the result in y's dtype. Autograd through
these few lines would keep and write some ten tensors of y's size; the backward below recomputes s from y
and z and writes four (on a CPU, fresh memory costs page faults, not just bandwidth).

With n, r and dn = dL/dn:  dL/ds = r (dn - n mean(dn n)),  dL/dw = sum over rows of dL/dout n (times silu(z)
when the gate comes after the norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqbench.ops import tracks_grad
from seqbench.ops.blockwise import channel_dot


def _acc(t: Tensor) -> Tensor:
    """t in the arithmetic dtype: float32, or float64 for float64 input."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gated_rms_norm(
    y: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> Tensor:
    """y, z (..., dim), weight (dim,) -> (..., dim) in y's dtype; statistics over groups of group_size."""
    if tracks_grad(y, z, weight):
        return _GatedRMSNorm.apply(y, z, weight, eps, group_size, norm_before_gate)
    s = _gated_input(y, z, norm_before_gate)  # (..., dim) float32, a new tensor
    n = _grouped(s, group_size).mul_(_rstd(s, eps, group_size)).flatten(-2)
    out = n.mul_(_acc(weight))
    if z is not None and norm_before_gate:
        out.mul_(F.silu(_acc(z)))
    return out.to(y.dtype)


def _gated_input(y: Tensor, z: Tensor | None, norm_before_gate: bool) -> Tensor:
    """s: y * silu(z) (gate before the norm) or a float32 copy of y; always a new tensor."""
    if z is None or norm_before_gate:
        return _acc(y).clone() if _acc(y) is y else _acc(y)
    return F.silu(_acc(z)).mul_(y)


def _rstd(s: Tensor, eps: float, group_size: int) -> Tensor:
    """r (..., dim // group_size, 1): 1 / sqrt(mean of s^2 over each group + eps)."""
    grouped = s.unflatten(-1, (-1, group_size))  # (..., groups, group_size)
    mean_sq = torch.linalg.vector_norm(grouped, dim=-1, keepdim=True).square_().div_(group_size)  # no s^2 copy
    return mean_sq.add_(eps).rsqrt_()


def _grouped(t: Tensor, group_size: int) -> Tensor:
    return t.unflatten(-1, (-1, group_size))


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size, norm_before_gate):
        s = _gated_input(y, z, norm_before_gate)
        r = _rstd(s, eps, group_size)  # (..., groups, 1)
        out = _grouped(s, group_size).mul_(r).flatten(-2).mul_(_acc(weight))
        if z is not None and norm_before_gate:
            out.mul_(F.silu(_acc(z)))
        ctx.save_for_backward(y, z, weight, r)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return out.to(y.dtype)

    @staticmethod
    @once_differentiable  # a second derivative is not written out: asking for one raises
    def backward(ctx, grad_out):
        y, z, weight, r = ctx.saved_tensors
        gs, before = ctx.group_size, ctx.norm_before_gate
        gate = None if z is None else F.silu(_acc(z))
        s = _acc(y).clone() if gate is None or before else gate * y  # recomputed: one tensor of y's size
        n = _grouped(s, gs).mul_(r)  # (..., groups, group_size)
        g = _acc(grad_out)
        gated_after = before and gate is not None
        dn = g * _acc(weight)  # (..., dim)
        if gated_after:
            dn.mul_(gate)
        grad_w = None
        if ctx.needs_input_grad[2]:  # sum over rows of g n (gate after the norm: g n silu(z))
            flat_n = n.flatten(-2).reshape(1, -1, n.shape[-2] * gs)
            flat_g = (g * gate if gated_after else g).reshape(flat_n.shape)
            grad_w = channel_dot(flat_g, flat_n)
        dz = None
        if gated_after and ctx.needs_input_grad[1]:
            dgate = (g * _acc(weight)).mul_(n.flatten(-2))
            dz = torch.ops.aten.silu_backward(dgate, _acc(z))
        dn_g = _grouped(dn, gs)
        mean_dot = torch.einsum("...i,...i->...", dn_g, n).unsqueeze(-1).div_(gs)  # (..., groups, 1)
        ds = dn_g.addcmul_(n, mean_dot, value=-1.0).mul_(r).flatten(-2)  # dL/ds (..., dim)
        if gate is None or before:
            dy = ds
        else:
            dy = ds * gate
            if ctx.needs_input_grad[1]:
                dz = torch.ops.aten.silu_backward(ds.mul_(y), _acc(z))
        dy = dy.to(y.dtype)
        return dy, (None if dz is None else dz.to(z.dtype)), (None if grad_w is None else grad_w.to(weight.dtype)), \
            None, None, None
