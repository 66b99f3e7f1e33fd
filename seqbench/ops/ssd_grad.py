"""The reference SSD under autograd, when every block takes the factored path: a written-out backward.

Autograd through ops/ssd.py's blocked form keeps and writes some fifteen intermediates per group and
concatenates the groups' inputs and outputs; on a CPU, where every fresh MiB costs page faults, that was
most of the SSD's training cost. Here the forward runs group by group into one preallocated output and keeps,
per group, only the blocks' local and entering states and the pre-scale output; the backward recomputes the
cheap elementwise factors and writes the gradients of x, Δ, B and C straight into full-size tensors.

Per block (ops/ssd.py's factored form; heads grouped r to a B/C group, states n-major (n, r p)):

    cum = cumsum(Δ A),  mid = cum_last / 2,  rel = cum - mid,  rows = e^rel,  cols = Δ e^-rel,  half = e^mid
    xs = x cols,  S = tril(C B^T),  local = B^T xs,  entering, final = pass(local, e^last, state, half)
    y_pre = S xs + C entering,  y = y_pre rows

and the backward, with dyp = dy rows and the state-passing adjoint later[k] = dL/dstart[k+1]:

    dS = tril(dyp xs^T),  dxs = S^T dyp + B dlocal,  dC = dyp entering^T + dS B,  dB = dS^T C + xs dlocal^T
    dentering = C^T dyp,  dlocal = half later,  dx = dxs cols,  drows = sum_p dy y_pre,  dcols = sum_p dxs x
    drel = drows rows - dcols cols,  dΔ = dcols e^-rel + A revcumsum(dcum),  dA = sum Δ revcumsum(dcum)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqbench.ops.ssd_states import (
    MIN_LOG_DECAY,
    block_scores,
    exp_decay,
    head_major,
    n_major,
    pass_states,
    split_scales,
)


def factored_ssd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor | None, q: int,
    groups: list[tuple[int, int]],
) -> tuple[Tensor, Tensor]:
    """y (b, l, h, p) without the D skip, and the final state (b, h, p, n), for float32 x (b, l, h, p),
    discretised Δ dt (b, l, h), A (h,), B/C (b, l, g, n) and state (b, h, p, n) or None, over ``groups`` of
    positions (each whole blocks of q, the last possibly one shorter block). Differentiable in all of them."""
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    return _FactoredSSD.apply(x, dt, A, B, C, state, q, groups)


class _Block:
    """One group of c blocks of q positions: its elementwise factors and block-major views (built in the
    forward, rebuilt in the backward rather than kept). shape = (b, c, q, h, p, g, n, r)."""

    def __init__(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, q: int):
        b, t, h, p = x.shape
        g, n = B.shape[-2:]
        self.shape = (b, t // q, q, h, p, g, n, h // g)
        b, c, q, h, p, g, n, r = self.shape
        self.dt, self.cum, self.Bb, self.Cb, self.upper, self.S = block_scores(dt, A, B, C, q)
        self.last = self.cum[:, :, -1]  # (b, c, h)
        self.rows, self.inv, self.cols, self.half = split_scales(self.cum, self.dt)  # (b, c, q, h); half (b, c, h)
        self.x6 = x.view(b, c, q, g, r, p)
        self.xs = (self.x6 * self.cols.view(b, c, q, g, r, 1)).transpose(2, 3).reshape(b, c, g, q, r * p)

    def per_state(self, t: Tensor) -> Tensor:
        """(b, c, h) -> (b, c, g, 1, r, 1), broadcastable against n-major block states."""
        b, c, q, h, p, g, n, r = self.shape
        return t.reshape(b, c, g, 1, r, 1)


class _FactoredSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, state, q, groups):
        b, l, h, p = x.shape
        g = B.shape[2]
        y = torch.empty_like(x)  # (b, l, h, p)
        kept = []
        cur = state
        for s, e in groups:
            blk = _Block(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], min(q, e - s))
            _, c, qg, _, _, _, n, r = blk.shape
            local = torch.matmul(blk.Bb.transpose(-1, -2), blk.xs)  # (b, c, g, n, r p)
            decay, half = blk.per_state(exp_decay(blk.last)), blk.per_state(blk.half)
            entering, final = pass_states(local.clone().view(b, c, g, n, r, p), decay, n_major(cur, g), half)
            y_pre = torch.matmul(blk.S, blk.xs)  # (b, c, g, q, r p)
            y_pre.view(-1, qg, r * p).baddbmm_(blk.Cb.reshape(-1, qg, n), entering.view(-1, n, r * p))
            rows = blk.rows.view(b, c, qg, g, r, 1)
            torch.mul(y_pre.view(b, c, g, qg, r, p).transpose(2, 3), rows, out=y[:, s:e].view(b, c, qg, g, r, p))
            kept += [local, entering, y_pre]
            cur = head_major(final)
        ctx.save_for_backward(x, dt, A, B, C, *kept)
        ctx.q, ctx.groups = q, groups
        return y, cur

    @staticmethod
    @once_differentiable  # a second derivative is not written out: asking for one raises
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, *kept = ctx.saved_tensors  # kept: local, entering, y_pre of each group
        n_groups = len(ctx.groups)
        dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
        dA = torch.zeros(A.shape, dtype=torch.float64, device=A.device)
        g = B.shape[2]
        carry = n_major(dfinal.contiguous(), g)  # dL/d(state after the group), n-major
        for i in reversed(range(n_groups)):
            s, e = ctx.groups[i]
            local, entering, y_pre = kept[3 * i : 3 * i + 3]
            blk = _Block(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], min(ctx.q, e - s))
            carry, dA_g = _group_backward(blk, dy[:, s:e], carry, local, entering, y_pre,
                                          (dx[:, s:e], ddt[:, s:e], dB[:, s:e], dC[:, s:e]), A)
            dA += dA_g
        return dx, ddt, dA.to(A.dtype), dB, dC, head_major(carry), None, None


def _group_backward(
    blk: _Block, dy: Tensor, carry: Tensor, local: Tensor, entering: Tensor, y_pre: Tensor,
    outs: tuple[Tensor, Tensor, Tensor, Tensor], A: Tensor,
) -> tuple[Tensor, Tensor]:
    """One group's gradients, written into ``outs`` (dx, dΔ, dB, dC slices); returns dL/d(entering state)
    (n-major) and this group's dA (float64)."""
    b, c, q, h, p, g, n, r = blk.shape
    rp, bcg = r * p, b * c * g
    dx_out, ddt_out, dB_out, dC_out = outs
    dy6 = dy.view(b, c, q, g, r, p)
    dyp = torch.empty(b, c, g, q, r, p, device=dy.device)  # dy rows, block-major (b, c, g, q, r, p)
    torch.mul(dy6.transpose(2, 3), blk.rows.view(b, c, q, g, r, 1).transpose(2, 3), out=dyp)
    drows = (dyp * y_pre.view(b, c, g, q, r, p)).sum(-1).transpose(2, 3).reshape(b, c, q, h) / blk.rows
    dyp = dyp.view(b, c, g, q, rp)
    dS = torch.matmul(dyp, blk.xs.transpose(-1, -2)).masked_fill_(blk.upper, 0.0)  # (b, c, g, q, q)
    dxs = torch.matmul(blk.S.transpose(-1, -2), dyp)  # (b, c, g, q, r p)
    dCb = torch.matmul(dyp, entering.view(b, c, g, n, rp).transpose(-1, -2))  # (b, c, g, q, n)
    dCb.view(bcg, q, n).baddbmm_(dS.reshape(bcg, q, q), blk.Bb.reshape(bcg, q, n))
    dBb = torch.matmul(dS.transpose(-1, -2), blk.Cb)  # (b, c, g, q, n)
    dent = torch.matmul(blk.Cb.transpose(-1, -2), dyp).view(b, c, g, n, r, p)  # dL/dentering
    # the state-passing adjoint: later[k] = dL/dstart[k+1], adj = dL/dstart[k]
    half, decay = blk.per_state(blk.half), blk.per_state(exp_decay(blk.last))
    later, adj = torch.empty_like(dent), carry.clone()
    for k in reversed(range(c)):
        later[:, k] = adj
        adj.mul_(decay[:, k]).addcmul_(dent[:, k], half[:, k])
    start = entering.view(b, c, g, n, r, p) / half
    dhalf = (dent * start).add_(local.view(b, c, g, n, r, p) * later).sum((3, 5))  # (b, c, g, r)
    ddecay = (start * later).sum((3, 5))
    dlocal = later.mul_(half).view(b, c, g, n, rp)
    dxs.view(bcg, q, rp).baddbmm_(blk.Bb.reshape(bcg, q, n), dlocal.view(bcg, n, rp))
    dBb.view(bcg, q, n).baddbmm_(blk.xs.reshape(bcg, q, rp), dlocal.view(bcg, n, rp).transpose(1, 2))
    dxs6 = dxs.view(b, c, g, q, r, p).transpose(2, 3)  # (b, c, q, g, r, p)
    torch.mul(dxs6, blk.cols.view(b, c, q, g, r, 1), out=dx_out.view(b, c, q, g, r, p))
    dcols = (dxs6 * blk.x6).sum(-1).reshape(b, c, q, h)
    dBb_t, dCb_t = (t.transpose(2, 3).reshape(b, c * q, g, n) for t in (dBb, dCb))
    dB_out.copy_(dBb_t)
    dC_out.copy_(dCb_t)
    # back through rows = e^rel, cols = Δ e^-rel, rel = cum - mid, half = e^mid, decay = e^max(last, floor)
    drel = (drows * blk.rows).sub_(dcols * blk.cols).double()  # (b, c, q, h)
    dmid = (dhalf.reshape(b, c, h) * blk.half).double() - drel.sum(2)
    dlast = ddecay.reshape(b, c, h).double() * exp_decay(blk.last) * (blk.last > MIN_LOG_DECAY) + dmid / 2
    dcum = drel
    dcum[:, :, -1] += dlast
    ddtA = dcum.flip(2).cumsum(2).flip(2)  # (b, c, q, h): the cumulative sum's adjoint
    ddt_out.copy_((dcols * blk.inv + (ddtA * A.double()).float()).view(b, c * q, h))
    return adj, (ddtA * blk.dt.double()).sum((0, 1, 2))
