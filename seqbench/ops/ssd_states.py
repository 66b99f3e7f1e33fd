"""Block states of the reference SSD (ops/ssd.py, and its backward in ops/ssd_grad.py): passing them from
block to block, and their n-major layout.

States are kept n-major, (b, g, n, r, p) for g groups of r heads of p channels, so that the readout
C (q, n) @ state (n, r p) and its gradient need no transposed copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqbench.ops import tracks_grad

MIN_LOG_DECAY = -80.0  # floor of log-decays fed to exp: exp(-80) ~ 2e-35, and CPU exp is slow on subnormals


def exp_decay(log_decay: Tensor) -> Tensor:
    """exp of float64 log-decays <= 0, floored at MIN_LOG_DECAY, in float32."""
    return log_decay.clamp(min=MIN_LOG_DECAY).float().exp()


def pass_states(
    local: Tensor, decay: Tensor, state: Tensor | None, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The recurrence at block granularity: the state entering each block and the state after the last.

    local (b, c, g, n, r, p): what each block leaves from a zero start, divided by ``scale``; decay
    (b, c, g, 1, r, 1): each block's total decay exp(last); state (b, g, n, r, p) or None; scale like decay,
    or None (ones). With start[0] = state (or 0) and start[k+1] = decay[k] start[k] + scale[k] local[k],
    returns entering[k] = scale[k] start[k] (b, c, g, n, r, p) and the final state start[c].

    A step per block, in local's layout (a group has at most ops/ssd.MAX_BLOCKS blocks).
    """
    c = local.shape[1]  # without autograd, local is overwritten by the entering states
    cur = local.new_zeros(local[:, 0].shape) if state is None else state.to(local.dtype)
    if not tracks_grad(local, decay, state, scale):
        # In place: block k's entering state replaces its local one once that is added in, so nothing of
        # local's size is allocated (fresh memory costs page faults) and every step stays in cache.
        cur = cur.clone(memory_format=torch.contiguous_format)
        held = torch.empty_like(cur)  # (b, g, n, r, p) each
        for k in range(c):
            if scale is None:
                held.copy_(cur)
                cur.mul_(decay[:, k]).add_(local[:, k])
            else:
                torch.mul(cur, scale[:, k], out=held)
                cur.mul_(decay[:, k]).addcmul_(local[:, k], scale[:, k])
            local[:, k] = held
        return local, cur
    # unbind, not local[:, k]: the backward of an index would zero-fill a gradient of local's size per block
    steps = []
    scales = [None] * c if scale is None else scale.unbind(1)
    for loc, dec, scl in zip(local.unbind(1), decay.unbind(1), scales, strict=True):
        steps.append(cur if scl is None else cur * scl)
        cur = cur * dec + (loc if scl is None else loc * scl)
    return torch.stack(steps, dim=1), cur


def n_major(state: Tensor | None, g: int) -> Tensor | None:
    """(b, h, p, n) -> (b, g, n, r, p), the layout pass_states keeps states in."""
    if state is None:
        return None
    b, h, p, n = state.shape
    return state.reshape(b, g, h // g, p, n).permute(0, 1, 4, 2, 3).contiguous()


def head_major(state: Tensor) -> Tensor:
    """(b, g, n, r, p) -> (b, h, p, n)."""
    b, g, n, r, p = state.shape
    return state.permute(0, 1, 3, 4, 2).reshape(b, g * r, p, n)


def block_scores(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, q: int) -> tuple[Tensor, ...]:
    """The per-block quantities both SSD paths start from, for a group of whole blocks of q positions.

    dt (b, t, h) discretised Δ, A (h,), B/C (b, t, g, n). Returns dt (b, c, q, h), cum (b, c, q, h): the
    float64 log-decay from each block's start, Bb, Cb (b, c, g, q, n), upper (q, q): j > i, and the masked
    scores C B^T (b, c, g, q, q).
    """
    b, t, h = dt.shape
    g, n = B.shape[-2:]
    c = t // q
    dt = dt.view(b, c, q, h)
    cum = torch.cumsum((dt * A).double(), dim=2)
    Bb = B.reshape(b, c, q, g, n).transpose(2, 3)
    Cb = C.reshape(b, c, q, g, n).transpose(2, 3)
    upper = torch.ones(q, q, dtype=torch.bool, device=dt.device).triu(1)
    scores = torch.matmul(Cb, Bb.transpose(-1, -2)).masked_fill_(upper, 0.0)
    return dt, cum, Bb, Cb, upper, scores


def split_scales(cum: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decay mask exp(cum_i - cum_j) split around mid, half of each block's total log-decay: from cum
    (b, c, q, h) float64 and dt (b, c, q, h), rows = e^(cum - mid), inv = e^(mid - cum), cols = Δ inv (all
    (b, c, q, h)) and half = e^mid (b, c, h), in float32. rel = cum - mid stays within ±60 on this path, so
    rounding it to float32 costs < 4e-6 relative."""
    mid = cum[:, :, -1:] / 2  # (b, c, 1, h)
    rel = (cum - mid).float()
    rows, inv = torch.exp(rel), torch.exp(-rel)
    return rows, inv, inv * dt, torch.exp(mid.squeeze(2)).float()
