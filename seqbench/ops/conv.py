"""Reference causal depthwise conv1d (the short convolution of Mamba / Mamba-2, Gu & Dao 2023).

Signatures match the ``causal_conv1d`` package: x (b, d, l), weight (d, w), bias (d,) or None,
activation None | "silu". ``conv_state`` (b, d, w) holds the last w inputs (newest last), the layout of
mamba_ssm's inference cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    returning y (b, d, l) in the same layout. (F.conv1d would transpose x in and y out, ~3x slower here.)"""
    b, d, l = x.shape
    w = weight.shape[1]
    xp = x.new_empty(b, w - 1 + l, d)  # (b, w-1+l, d): the w-1 inputs before position 0, then x
    if initial_state is None:
        xp[:, : w - 1] = 0
    else:
        xp[:, : w - 1] = initial_state[..., initial_state.shape[-1] - (w - 1) :].transpose(1, 2)
    xp[:, w - 1 :] = x.transpose(1, 2)
    taps = weight.t().to(x.dtype)  # (w, d): taps[k] multiplies the input w-1-k steps back
    y = xp[:, w - 1 :] * taps[w - 1]  # (b, l, d)
    for k in range(w - 1):
        y.addcmul_(xp[:, k : k + l], taps[k])
    if bias is not None:
        y += bias.to(x.dtype)
    y = F.silu(y) if activation in ("silu", "swish") else y
    return y.transpose(1, 2)


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
