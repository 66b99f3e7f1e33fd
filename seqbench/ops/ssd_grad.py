"""The reference SSD under autograd, when every block takes the factored path: a written-out backward.

Autograd through ops/ssd.py's blocked form keeps and writes some fifteen intermediates per group and
concatenates the groups' inputs and outputs; on a CPU, where every fresh MiB costs page faults, that was
most of the SSD's training cost. Here the forward runs group by group into one preallocated output and keeps,
per group, only the blocks' local and entering states (and the output); the backward recomputes the cheap
elementwise factors and writes the gradients of x, Δ, B and C straight into full-size tensors.

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

from seqbench.ops.scratch import Scratch
from seqbench.ops.ssd_states import (
    MIN_LOG_DECAY,
    block_scores,
    exp_decay,
    factored_group,
    head_major,
    n_major,
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
    """One group of c blocks of q positions in the backward: its elementwise factors and block-major views,
    rebuilt from the inputs rather than kept from the forward. shape = (b, c, q, h, p, g, n, r)."""

    def __init__(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, q: int, work: Scratch):
        b, t, h, p = x.shape
        g, n = B.shape[-2:]
        self.shape = (b, t // q, q, h, p, g, n, h // g)
        b, c, q, h, p, g, n, r = self.shape
        self.dt, self.cum, self.Bb, self.Cb, self.upper, self.S = block_scores(dt, A, B, C, q)
        self.last = self.cum[:, :, -1]  # (b, c, h)
        self.rows, self.inv, self.cols, self.half = split_scales(self.cum, self.dt)  # (b, c, q, h); half (b, c, h)
        self.x6 = x.view(b, c, q, g, r, p)
        self.xs = work.get("xs", b, c, g, q, r * p)  # x cols, block-major
        torch.mul(self.x6.transpose(2, 3), self.cols.view(b, c, q, g, r, 1).transpose(2, 3),
                  out=self.xs.view(b, c, g, q, r, p))

    def per_state(self, t: Tensor) -> Tensor:
        """(b, c, h) -> (b, c, g, 1, r, 1), broadcastable against n-major block states."""
        b, c, q, h, p, g, n, r = self.shape
        return t.reshape(b, c, g, 1, r, 1)


class _FactoredSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, state, q, groups):
        b, l, h, p = x.shape
        y = torch.empty_like(x)  # (b, l, h, p)
        kept = []  # local and entering states of each group
        cur = state
        for s, e in groups:
            qg = min(q, e - s)
            c = (e - s) // qg
            dt_g, cum, Bb, Cb, _, scores = block_scores(dt[:, s:e], A, B[:, s:e], C[:, s:e], qg)
            x_g, y_g = x[:, s:e].view(b, c, qg, h, p), y[:, s:e].view(b, c, qg, h, p)
            _, final = factored_group(x_g, dt_g, cum, scores, Bb, Cb, cur, True, y_g, keep=kept)
            cur = head_major(final)
        ctx.save_for_backward(x, dt, A, B, C, y, *kept)
        ctx.q, ctx.groups = q, groups
        return y, cur

    @staticmethod
    @once_differentiable  # a second derivative is not written out: asking for one raises
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, y, *kept = ctx.saved_tensors  # kept: local, entering of each group
        dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
        dA = torch.zeros(A.shape, dtype=torch.float64, device=A.device)
        work = Scratch(x)
        carry = n_major(dfinal.contiguous(), B.shape[2])  # dL/d(state after the group), n-major
        for i in reversed(range(len(ctx.groups))):
            s, e = ctx.groups[i]
            local, entering = kept[2 * i : 2 * i + 2]
            blk = _Block(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], min(ctx.q, e - s), work)
            carry, dA_g = _group_backward(blk, dy[:, s:e], y[:, s:e], carry, local, entering,
                                          (dx[:, s:e], ddt[:, s:e], dB[:, s:e], dC[:, s:e]), A, work)
            dA += dA_g
        return dx, ddt, dA.to(A.dtype), dB, dC, head_major(carry), None, None


def _group_backward(
    blk: _Block, dy: Tensor, y: Tensor, carry: Tensor, local: Tensor, entering: Tensor,
    outs: tuple[Tensor, Tensor, Tensor, Tensor], A: Tensor, work: Scratch,
) -> tuple[Tensor, Tensor]:
    """One group's gradients, written into ``outs`` (dx, dΔ, dB, dC slices); returns dL/d(entering state)
    (n-major) and this group's dA (float64). y: the group's output, y_pre rows."""
    b, c, q, h, p, g, n, r = blk.shape
    rp, bcg = r * p, b * c * g
    dx_out, ddt_out, dB_out, dC_out = outs
    dy6 = dy.view(b, c, q, g, r, p)
    # drel = drows rows - dcols cols, where drows rows = sum_p dy rows y_pre = sum_p dy y
    drel = torch.mul(dy, y, out=work.get("act", *dy.shape)).sum(-1).view(b, c, q, h)
    dyp = work.get("dyp", b, c, g, q, r, p)  # dy rows, block-major
    torch.mul(dy6.transpose(2, 3), blk.rows.view(b, c, q, g, r, 1).transpose(2, 3), out=dyp)
    dyp = dyp.view(bcg, q, rp)
    xs = blk.xs.view(bcg, q, rp)
    dS = torch.bmm(dyp, xs.transpose(1, 2)).masked_fill_(blk.upper, 0.0)  # (b c g, q, q)
    dxs = torch.bmm(blk.S.view(bcg, q, q).transpose(1, 2), dyp, out=work.get("dxs", bcg, q, rp))
    Bb, Cb = blk.Bb.reshape(bcg, q, n), blk.Cb.reshape(bcg, q, n)
    dCb = torch.bmm(dyp, entering.view(bcg, n, rp).transpose(1, 2)).baddbmm_(dS, Bb)  # (b c g, q, n)
    dBb = torch.bmm(dS.transpose(1, 2), Cb)  # (b c g, q, n)
    dent = torch.bmm(Cb.transpose(1, 2), dyp, out=work.get("dent", bcg, n, rp)).view(b, c, g, n, r, p)
    # the state-passing adjoint: later[k] = dL/dstart[k+1], adj = dL/dstart[k]
    half, decay = blk.per_state(blk.half), blk.per_state(exp_decay(blk.last))
    later, adj = work.get("later", b, c, g, n, r, p), carry.clone()
    for k in reversed(range(c)):
        later[:, k] = adj
        adj.mul_(decay[:, k]).addcmul_(dent[:, k], half[:, k])
    # start = entering / half: dhalf = sum_{n,p} dent start + local later, ddecay = sum_{n,p} start later
    prod = work.get("prod", b, c, g, n, r, p)
    entering, local = entering.view(b, c, g, n, r, p), local.view(b, c, g, n, r, p)
    dhalf = torch.mul(dent, entering, out=prod).sum((3, 5)).div_(half.view(b, c, g, r))  # (b, c, g, r)
    dhalf += torch.mul(local, later, out=prod).sum((3, 5))
    ddecay = torch.mul(entering, later, out=prod).sum((3, 5)).div_(half.view(b, c, g, r))
    dlocal = later.mul_(half).view(bcg, n, rp)
    dxs.baddbmm_(Bb, dlocal)
    dBb.baddbmm_(xs, dlocal.transpose(1, 2))
    dxs6 = dxs.view(b, c, g, q, r, p).transpose(2, 3)  # (b, c, q, g, r, p)
    torch.mul(dxs6, blk.cols.view(b, c, q, g, r, 1), out=dx_out.view(b, c, q, g, r, p))
    dcols = torch.mul(dxs6, blk.x6, out=work.get("act", b, c, q, g, r, p)).sum(-1).view(b, c, q, h)
    dB_out.view(b, c, q, g, n).copy_(dBb.view(b, c, g, q, n).transpose(2, 3))
    dC_out.view(b, c, q, g, n).copy_(dCb.view(b, c, g, q, n).transpose(2, 3))
    # back through rows = e^rel, cols = Δ e^-rel, rel = cum - mid, half = e^mid, decay = e^max(last, floor)
    drel = drel.sub_(dcols * blk.cols).double()  # (b, c, q, h)
    dmid = (dhalf.reshape(b, c, h) * blk.half).double() - drel.sum(2)
    dlast = ddecay.reshape(b, c, h).double() * exp_decay(blk.last) * (blk.last > MIN_LOG_DECAY) + dmid / 2
    dcum = drel
    dcum[:, :, -1] += dlast
    ddtA = dcum.flip(2).cumsum(2).flip(2)  # (b, c, q, h): the cumulative sum's adjoint
    ddt_out.copy_((dcols * blk.inv + (ddtA * A.double()).float()).view(b, c * q, h))
    return adj, (ddtA * blk.dt.double()).sum((0, 1, 2))
