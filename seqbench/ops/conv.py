"""Reference causal depthwise conv1d (the short convolution of Mamba / Mamba-2, Gu & Dao 2023).

Signatures match the ``causal_conv1d`` package: x (b, d, l), weight (d, w), bias (d,) or None,
activation None | "silu". ``conv_state`` (b, d, w) holds the last w inputs (newest last), the layout of
mamba_ssm's inference cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqbench.ops import tracks_grad
from seqbench.ops.blockwise import channel_dot


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
) -> Tensor:
    """y[t] = sum_k weight[:, k] * x[t - (w-1) + k]; positions before 0 come from ``initial_state`` or are 0.

    initial_state: (b, d, w-1) or wider (only the last w-1 columns are used) inputs preceding x.
    """
    d, w = weight.shape
    if x.stride(1) == 1 and d > 1:  # time-major in memory (Mamba's projections): stay in that layout
        return _time_major_conv(x, weight, bias, initial_state, activation)
    if initial_state is None:
        xp = F.pad(x, (w - 1, 0))  # (b, d, l + w - 1)
    else:
        xp = torch.cat([initial_state[..., initial_state.shape[-1] - (w - 1) :].to(x.dtype), x], dim=-1)
    y = F.conv1d(xp, weight.unsqueeze(1), bias, groups=d)  # (b, d, l)
    return F.silu(y) if activation in ("silu", "swish") else y


def _time_major_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, activation: str | None
) -> Tensor:
    """causal_conv1d for x (b, d, l) laid out as (b, l, d): w shifted multiply-adds over contiguous channels,
    returning y (b, d, l) in the same layout. (F.conv1d would transpose x in and y out, ~3x slower here.)

    No padded copy of x is made, and under autograd the backward is written out (``_TimeMajorConv``): autograd
    through shifted slices would build a zero-filled gradient of x's size per tap."""
    w = weight.shape[1]
    x_t = x.transpose(1, 2)  # (b, l, d)
    taps = weight.t().to(x.dtype)  # (w, d): taps[k] multiplies the input w-1-k steps back
    b_ = None if bias is None else bias.to(x.dtype)
    prefix = None
    if initial_state is not None and w > 1:
        prefix = initial_state[..., initial_state.shape[-1] - (w - 1) :].transpose(1, 2).to(x.dtype)  # (b, w-1, d)
    silu = activation in ("silu", "swish")
    if tracks_grad(x, weight, bias, prefix):
        y = _TimeMajorConv.apply(x_t, taps, b_, prefix, silu)
    else:
        y = _shifted_sum(x_t, taps, b_, prefix)
        if silu:
            F.silu(y, inplace=True)  # nothing keeps the pre-activation: no second tensor of x's size
    return y.transpose(1, 2)


def _shifted_sum(x: Tensor, taps: Tensor, bias: Tensor | None, prefix: Tensor | None) -> Tensor:
    """u[t] = bias + sum_k taps[k] x[t - (w-1-k)] for x (b, l, d), taps (w, d); x before 0 from prefix
    (b, w-1, d) or zero. Returns u (b, l, d), a new tensor."""
    w, l = taps.shape[0], x.shape[1]
    u = x * taps[w - 1] if bias is None else torch.addcmul(bias, x, taps[w - 1])  # (b, l, d)
    for k in range(w - 1):
        s = w - 1 - k  # steps back
        if s < l:
            u[:, s:].addcmul_(x[:, : l - s], taps[k])
        if prefix is not None:  # u[t] for t < s reads prefix[t + k]
            u[:, : min(s, l)].addcmul_(prefix[:, k : k + min(s, l)], taps[k])
    return u


class _TimeMajorConv(torch.autograd.Function):
    """_shifted_sum (then SiLU) with its gradient: every tap's term is a shifted multiply-add again."""

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor, bias: Tensor | None, prefix: Tensor | None, silu: bool) -> Tensor:
        u = _shifted_sum(x, taps, bias, prefix)  # (b, l, d) pre-activation
        ctx.save_for_backward(x, taps, prefix, u if silu else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(u) if silu else u

    @staticmethod
    @once_differentiable  # a second derivative is not written out: asking for one raises
    def backward(ctx, grad_y: Tensor):
        x, taps, prefix, u = ctx.saved_tensors
        w, l = taps.shape[0], x.shape[1]
        g = torch.ops.aten.silu_backward(grad_y, u) if ctx.silu else grad_y.contiguous()  # dL/du (b, l, d)
        grad_x = g * taps[w - 1]
        for k in range(w - 1):
            s = w - 1 - k
            if s < l:
                grad_x[:, : l - s].addcmul_(g[:, s:], taps[k])
        # dL/dtaps[k] = sum over b and t of g[t] x[t - (w-1-k)]
        grad_taps = torch.stack([channel_dot(g[:, w - 1 - k :], x[:, : max(0, l - (w - 1 - k))]) for k in range(w)])
        grad_prefix = None
        if prefix is not None:
            grad_prefix = torch.zeros_like(prefix)
            for k in range(w - 1):
                m = min(w - 1 - k, l)  # positions t < m read prefix[t + k]
                grad_prefix[:, k : k + m].addcmul_(g[:, :m], taps[k])
                grad_taps[k] += (g[:, :m] * prefix[:, k : k + m]).sum((0, 1))
        grad_bias = g.sum((0, 1)) if ctx.has_bias else None
        return grad_x, grad_taps, grad_bias, grad_prefix, None


def fill_conv_state(conv_state: Tensor, x: Tensor) -> None:
    """Write the last w inputs of x (b, d, l) into conv_state (b, d, w) in place, keeping older ones if l < w."""
    w = conv_state.shape[-1]
    l = x.shape[-1]
    if l >= w:
        conv_state.copy_(x[..., l - w :])
    else:
        conv_state.copy_(torch.cat([conv_state[..., l:], x], dim=-1))


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """One step: x (b, d); shifts conv_state (b, d, w) left in place, appends x, returns y (b, d)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = x.to(conv_state.dtype)
    y = (conv_state * weight).sum(-1)  # (b, d)
    if bias is not None:
        y = y + bias
    y = y.to(x.dtype)
    return F.silu(y) if activation in ("silu", "swish") else y
