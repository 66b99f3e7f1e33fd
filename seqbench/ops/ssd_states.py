"""Block states of the reference SSD (ops/ssd.py, and its backward in ops/ssd_grad.py): passing them from
block to block, their n-major layout, and the factored forward of a group of blocks that both use.

States are kept n-major, (b, g, n, r, p) for g groups of r heads of p channels, so that the readout
C (q, n) @ state (n, r p) and its gradient need no transposed copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqbench.ops import tracks_grad
from seqbench.ops.scratch import BETWEEN_CALLS

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


def factored_group(
    x: Tensor, dt: Tensor, cum: Tensor, scores: Tensor, Bb: Tensor, Cb: Tensor, state: Tensor | None, need_state: bool,
    out: Tensor | None = None, keep: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The blocks of one group with the mask split into row and column scales (see ops/ssd.py's docstring).

    x (b, c, q, h, p), dt (b, c, q, h), cum (b, c, q, h) float64, scores (b, c, g, q, q) masked, Bb/Cb
    (b, c, g, q, n), state (b, h, p, n) or None. Returns y (b, c, q, h, p) and the final state (b, g, n, r, p);
    y is written into ``out`` (b, c, q, h, p) when given (no autograd), with no layout copy on the way.
    ``keep`` (the forward of ops/ssd_grad.py) receives the blocks' local and entering states, n-major.
    """
    b, c, q, h, p = x.shape
    g, n = Bb.shape[2], Bb.shape[-1]
    r = h // g
    rows, _, cols, half = split_scales(cum, dt)  # exp(cum_i - mid), Δ_j exp(mid - cum_j), exp(mid)
    # Without autograd (out given) the transients come from buffers kept between calls: none leaves this call.
    work = BETWEEN_CALLS if out is not None else None
    scale = cols.unsqueeze(-1)  # (b, c, q, h, 1)
    xs = x * scale if work is None else torch.mul(x, scale, out=work.get("xs", b, c, q, h, p, like=x))
    xs = xs.view(b, c, q, g, r * p).transpose(2, 3)  # (b, c, g, q, r p)
    # exp(last - cum_j) = exp(mid) cols_j / Δ_j and exp(cum_i) = exp(mid) rows_i: a block's state from a zero
    # start is exp(mid) xs^T B, and the state entering it reaches position i as rows_i exp(mid) C_i state.
    half = half.view(b, c, g, 1, r, 1)  # exp(mid), in [e^-60, 1]
    entering = final = None
    if c > 1 or need_state:
        local = None if work is None or keep is not None else work.get("local", b, c, g, n, r * p, like=x)
        local = torch.matmul(Bb.transpose(-1, -2), xs, out=local).view(b, c, g, n, r, p)  # B^T xs, / exp(mid)
        decay = exp_decay(cum[:, :, -1]).view(b, c, g, 1, r, 1)
        passed = local if keep is None else local.clone()  # pass_states overwrites it without autograd
        entering, final = pass_states(passed, decay, n_major(state, g), half)  # entering: times exp(mid)
        if keep is not None:
            keep += [local, entering]
    elif state is not None:
        entering = n_major(state, g).unsqueeze(1) * half  # (b, 1, g, n, r, p)
    y = torch.matmul(scores, xs, out=None if work is None else work.get("y", b, c, g, q, r * p, like=x))
    if entering is not None:
        e = entering.reshape(b * c * g, n, r * p)
        y.view(b * c * g, q, r * p).baddbmm_(Cb.reshape(b * c * g, q, n), e)  # in place: no copy of y
    y = y.view(b, c, g, q, r, p).transpose(2, 3)  # (b, c, q, g, r, p), a view
    rows = rows.view(b, c, q, g, r, 1)
    if out is None:
        return (y * rows).reshape(b, c, q, h, p), final
    torch.mul(y, rows, out=out.view(b, c, q, g, r, p))  # the (g, q) transpose, the row scale and the write
    return out, final
