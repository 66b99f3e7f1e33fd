"""Reference selective-scan ops of Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Alg. 2) and the one-token state update shared by Mamba-1 and Mamba-2
(Dao & Gu, 2024, "Transformers are SSMs", §7).

Discretisation (ZOH for A, Euler for B, as in the Mamba paper §2):
    Abar_t = exp(Δ_t A),   Bbar_t x_t = Δ_t B_t x_t,   h_t = Abar_t h_{t-1} + Δ_t B_t x_t,   y_t = C_t h_t.
Everything is computed in float32 whatever the input dtype; outputs are cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _expand_groups(t: Tensor, heads: int) -> Tensor:
    """(b, g, ...) -> (b, heads, ...): group j serves the contiguous heads j*heads/g .. (j+1)*heads/g - 1."""
    g = t.shape[1]
    if heads % g:
        raise ValueError(f"the number of groups ({g}) must divide the number of heads/channels ({heads})")
    return t.repeat_interleave(heads // g, dim=1) if g != heads else t


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One recurrent step; updates ``state`` in place and returns the output (dtype of x).

    Mamba-1 layout: state (b, d, n), x/dt/z (b, d), A (d, n), B/C (b, n), D/dt_bias (d,).
    Mamba-2 layout: state (b, h, p, n), x/dt/z (b, h, p), A (h, p, n), B/C (b, g, n), D/dt_bias (h, p).
    """
    if state.dim() == 3:  # Mamba-1: view each channel as a head with one element (p = 1)
        return selective_state_update(
            state.unsqueeze(2), x.unsqueeze(-1), dt.unsqueeze(-1), A.unsqueeze(1), B.unsqueeze(1), C.unsqueeze(1),
            None if D is None else D.unsqueeze(-1), None if z is None else z.unsqueeze(-1),
            None if dt_bias is None else dt_bias.unsqueeze(-1), dt_softplus,
        ).squeeze(-1)
    if state.dim() != 4:
        raise ValueError(f"state must be (b, d, n) or (b, h, p, n), got shape {tuple(state.shape)}")
    h = state.shape[1]
    dt32 = dt.float()  # (b, h, p)
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.float()
    if dt_softplus:
        dt32 = F.softplus(dt32)
    x32 = x.float()
    B32 = _expand_groups(B.float(), h).unsqueeze(2)  # (b, h, 1, n)
    C32 = _expand_groups(C.float(), h).unsqueeze(2)  # (b, h, 1, n)
    dA = torch.exp(A.float() * dt32.unsqueeze(-1))  # (b, h, p, n)
    new = state.float() * dA + B32 * (dt32 * x32).unsqueeze(-1)  # (b, h, p, n)
    state.copy_(new)
    out = (new * C32).sum(-1)  # (b, h, p)
    if D is not None:
        out = out + x32 * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------------
# Chunked selective scan.
#
# Layout inside: time-major (b, c, g, n, dg) with dg = d / g the channels of one B/C group, so every time
# slice is one contiguous block and the contractions over n and dg are small gemms.
# The sequence is cut into chunks of c steps (c sized so a work buffer holds ~2^19 floats and stays in
# cache) processed one after another, carrying the state (b, g, n, dg): nothing of size (b, l, d, n) is
# ever built. Inside a chunk the linear recurrence h_t = a_t h_{t-1} + x_t is solved by a blocked two-level
# scan (Blelloch 1990, "Prefix sums and their applications", §1.4): local scans inside blocks of _BLOCK
# steps (all blocks at once), a recursive scan over the block ends, then one fix-up pass -- about three
# passes over the buffer in total, against 2 log2(c) for a Hillis-Steele scan (measured 1.5-2x slower).
# Only products of decays a in [0, 1] and sums are formed, so any Δ (1e-6 .. 1e3 and beyond) is safe:
# decays underflow to 0 exactly where the true value is negligible, and no exp(-cumsum) ever appears.
# a = exp(Δ A) is evaluated as exp2(Δ · A log2 e), which torch vectorises ~4x faster than exp on CPU.
# ------------------------------------------------------------------------------------------------------

_WORK_ELEMS = 1 << 19  # target elements of one (b, c, g, n, dg) work buffer (2 MiB): stays in cache
_MIN_CHUNK, _MAX_CHUNK = 32, 256  # below 32 the per-chunk Python overhead dominates
_BLOCK = 8  # steps per block of the two-level in-chunk scan (measured best among 4, 8, 16)
_LOG2E = 1.4426950408889634


def _scan_(a: Tensor, x: Tensor, cum: Tensor, reverse: bool = False) -> None:
    """In place along dim 1: x_t <- a_t x_{t-1} + x_t (or a_t x_{t+1} + x_t when reverse); a is read-only.

    ``cum`` (same shape) receives block-local decay products; it may be ``a`` itself, which the scan then
    overwrites (a_t is read before cum_t is written). a_0 (a_{c-1} when reverse) is never read.
    """
    length = x.shape[1]
    if length < 2 * _BLOCK:
        steps = range(length - 2, -1, -1) if reverse else range(1, length)
        for t in steps:
            x[:, t].addcmul_(a[:, t], x[:, t + 1 if reverse else t - 1])
        return
    r = length % _BLOCK
    if r:  # scan the block-aligned part, then finish the few leftover steps one by one
        main = slice(r, length) if reverse else slice(0, length - r)
        _scan_(a[:, main], x[:, main], cum[:, main], reverse)
        steps = range(r - 1, -1, -1) if reverse else range(length - r, length)
        for t in steps:
            x[:, t].addcmul_(a[:, t], x[:, t + 1 if reverse else t - 1])
        return
    m = length // _BLOCK
    a4, x4, c4 = (t.view(t.shape[0], m, _BLOCK, *t.shape[2:]) for t in (a, x, cum))  # (b, m, block, ...)
    first, last = (_BLOCK - 1, 0) if reverse else (0, _BLOCK - 1)
    if cum is not a:
        c4[:, :, first].copy_(a4[:, :, first])
    steps = range(_BLOCK - 2, -1, -1) if reverse else range(1, _BLOCK)
    for t in steps:
        prev = t + 1 if reverse else t - 1
        x4[:, :, t].addcmul_(a4[:, :, t], x4[:, :, prev])
        torch.mul(a4[:, :, t], c4[:, :, prev], out=c4[:, :, t])
    ends_x, ends_c = x4[:, :, last].contiguous(), c4[:, :, last].contiguous()  # (b, m, ...)
    _scan_(ends_c, ends_x, ends_c, reverse)
    if reverse:  # block j receives the total of blocks j+1.. through its decay products
        x4[:, :-1].addcmul_(c4[:, :-1], ends_x[:, 1:].unsqueeze(2))
    else:
        x4[:, 1:].addcmul_(c4[:, 1:], ends_x[:, :-1].unsqueeze(2))


def _chunk_len(b: int, d: int, n: int) -> int:
    """Steps per chunk: the largest power of two whose work buffer fits _WORK_ELEMS, within the bounds."""
    c = 1 << max(0, (_WORK_ELEMS // (b * d * n)).bit_length() - 1)
    return max(_MIN_CHUNK, min(_MAX_CHUNK, c))


class _Problem:
    """Shapes and canonical float32 views of one selective-scan call."""

    def __init__(self, u: Tensor, A: Tensor, B: Tensor, C: Tensor):
        if A.is_complex():
            raise ValueError("selective_scan: complex A is not supported by the reference (use a real A)")
        if u.dim() != 3 or A.dim() != 2 or A.shape[0] != u.shape[1]:
            got = f"{tuple(u.shape)} and {tuple(A.shape)}"
            raise ValueError(f"selective_scan: need u (b, d, l) and A (d, n), got {got}")
        self.b, self.d, self.l = u.shape
        self.n = A.shape[1]
        self.B, self.C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))  # (b, g, n, l)
        self.g = self.B.shape[1]
        if self.B.shape != (self.b, self.g, self.n, self.l) or self.C.shape != self.B.shape:
            got = f"{tuple(B.shape)}, {tuple(C.shape)}"
            raise ValueError(f"selective_scan: B and C must be (b, n, l) or (b, g, n, l) with u (b, d, l); got {got}")
        if self.d % self.g:
            raise ValueError(f"selective_scan: {self.g} groups do not divide d = {self.d}")
        self.dg = self.d // self.g
        self.A = A.float().view(self.g, self.dg, self.n).transpose(1, 2).contiguous()  # (g, n, dg)
        self.chunk = _chunk_len(self.b, self.d, self.n)

    def to_inner(self, h: Tensor) -> Tensor:
        """(b, d, n) -> (b, g, n, dg), float32."""
        return h.float().reshape(self.b, self.g, self.dg, self.n).transpose(2, 3)

    def to_outer(self, h: Tensor) -> Tensor:
        """(b, g, n, dg) -> (b, d, n)."""
        return h.transpose(2, 3).reshape(self.b, self.d, self.n)

    def chan(self, t: Tensor, s: int, e: int) -> Tensor:
        """(b, d, l) -> time-major float32 chunk (b, c, g, dg)."""
        return t[:, :, s:e].float().transpose(1, 2).contiguous().view(self.b, e - s, self.g, self.dg)

    def bc(self, t: Tensor, s: int, e: int) -> Tensor:
        """(b, g, n, l) -> time-major float32 chunk (b, c, g, n, 1)."""
        return t[..., s:e].float().permute(0, 3, 1, 2).contiguous().unsqueeze(-1)

    def buffers(self, c: int, device: torch.device, count: int, extra: int = 0) -> tuple[Tensor, ...]:
        shape = (self.b, c + extra, self.g, self.n, self.dg)
        return tuple(torch.empty(shape, device=device) for _ in range(count))


def _process_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[..., None]
    return F.softplus(delta) if softplus else delta


@torch.no_grad()
def _forward(
    p: _Problem, u: Tensor, delta: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, h0: Tensor | None, states: list[Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Chunk loop of the forward pass; appends each chunk's starting state to ``states`` when given."""
    dev = u.device
    y = torch.empty(p.b, p.d, p.l, device=dev, dtype=torch.float32 if states is not None else u.dtype)
    h = torch.zeros(p.b, p.g, p.n, p.dg, device=dev) if h0 is None else p.to_inner(h0).contiguous()
    a, x = p.buffers(min(p.chunk, p.l), dev, count=2)
    A2 = p.A * _LOG2E  # exp(Δ A) = exp2(Δ A log2 e)
    for s in range(0, p.l, p.chunk):
        e = min(s + p.chunk, p.l)
        c = e - s
        if states is not None:
            states.append(h.clone())
        dt = p.chan(_process_delta(delta[:, :, s:e], delta_bias, softplus), 0, c)  # (b, c, g, dg)
        uc = p.chan(u, s, e)  # (b, c, g, dg)
        ac, xc = a[:, :c], x[:, :c]
        torch.mul(dt.unsqueeze(3), A2, out=ac).exp2_()  # (b, c, g, n, dg)
        torch.mul(p.bc(p.B, s, e), (dt * uc).unsqueeze(3), out=xc)  # Δ_t B_t u_t: (b, c, g, n, dg)
        xc[:, 0].addcmul_(ac[:, 0], h)
        _scan_(ac, xc, ac)  # a is not needed afterwards: let the scan keep its decay products in it
        h.copy_(xc[:, -1])
        yc = torch.matmul(p.bc(p.C, s, e).transpose(-1, -2), xc).view(p.b, c, p.d)  # C_t h_t: (b, c, d)
        if D is not None:
            yc = yc + uc.view(p.b, c, p.d) * D.float()
        if z is not None:
            yc = yc * F.silu(z[:, :, s:e].float().transpose(1, 2))
        y[:, :, s:e].copy_(yc.transpose(1, 2))
    return y, p.to_outer(h)


class _ScanFn(torch.autograd.Function):
    """Core scan y_t = C_t h_t with a hand-written backward that recomputes each chunk from its saved
    starting state, so training memory is O(l d + (l / chunk) d n) instead of O(l d n)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):  # float32; B, C (b, g, n, l); delta already biased / softplus'd
        p = _Problem(u, A, B, C)
        states: list[Tensor] = []
        y, h_last = _forward(p, u, delta, None, None, None, False, h0, states)
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(states))
        ctx.has_h0 = h0 is not None
        return y, h_last

    @staticmethod
    @torch.no_grad()
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, states = ctx.saved_tensors
        p = _Problem(u, A, B, C)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(p.B), torch.empty_like(p.C)  # (b, g, n, l)
        dA = torch.zeros_like(p.A)  # (g, n, dg)
        carry = p.to_inner(dh_last).clone() if dh_last is not None else torch.zeros_like(states[0])
        a, hbuf = p.buffers(min(p.chunk, p.l), u.device, count=2, extra=1)
        cum, gbuf = p.buffers(min(p.chunk, p.l), u.device, count=2)
        A2 = p.A * _LOG2E
        for i in range(states.shape[0] - 1, -1, -1):
            s = i * p.chunk
            e = min(s + p.chunk, p.l)
            c = e - s
            dt, uc, dyc = (p.chan(t, s, e) for t in (delta, u, dy))  # (b, c, g, dg)
            Bc, Cc = p.bc(p.B, s, e), p.bc(p.C, s, e)  # (b, c, g, n, 1)
            # Recompute a_t (a_c := 0 so the reverse scan sees nothing past the chunk) and h_{t-1}, h_t.
            ac = a[:, : c + 1]
            torch.mul(dt.unsqueeze(3), A2, out=ac[:, :c]).exp2_()
            ac[:, c].zero_()
            hc, cc, gc = hbuf[:, : c + 1], cum[:, :c], gbuf[:, :c]
            hc[:, 0].copy_(states[i])
            dtu = dt * uc  # (b, c, g, dg)
            torch.mul(Bc, dtu.unsqueeze(3), out=hc[:, 1:])
            hc[:, 1].addcmul_(ac[:, 0], hc[:, 0])
            _scan_(ac[:, :c], hc[:, 1:], cc)
            h_prev, h = hc[:, :c], hc[:, 1:]
            # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: a reverse scan with coefficients shifted by one.
            torch.mul(Cc, dyc.unsqueeze(3), out=gc)
            gc[:, -1].add_(carry)
            _scan_(ac[:, 1:], gc, cc, reverse=True)
            torch.mul(ac[:, 0], gc[:, 0], out=carry)  # dL/dh_{s-1}
            # (einsum picks a gemm layout here; matmul would run c slow (n x dg) @ (dg x 1) products)
            dC[..., s:e].copy_(torch.einsum("bcgnd,bcgd->bgnc", h, dyc))
            dB[..., s:e].copy_(torch.einsum("bcgnd,bcgd->bgnc", gc, dtu))
            ddtu = torch.matmul(Bc.transpose(-1, -2), gc).squeeze(3)  # dL/d(Δu): (b, c, g, dg)
            # dL/d(Δ A)_t = g_t a_t h_{t-1}; then chain to Δ (sum over n) and to A (sum over b, t).
            dlog = torch.mul(ac[:, :c], h_prev, out=cc).mul_(gc)  # (b, c, g, n, dg)
            dA.add_(torch.mul(dlog, dt.unsqueeze(3), out=gc).sum((0, 1)))
            ddt = torch.mul(dlog, p.A, out=gc).sum(3) + ddtu * uc  # (b, c, g, dg)
            ddelta[:, :, s:e].copy_(ddt.view(p.b, c, p.d).transpose(1, 2))
            du[:, :, s:e].copy_((ddtu * dt).view(p.b, c, p.d).transpose(1, 2))
        dA_out = dA.transpose(1, 2).reshape(p.d, p.n)
        return du, ddelta, dA_out, dB, dC, (p.to_outer(carry) if ctx.has_h0 else None)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the semantics of mamba_ssm's ``selective_scan_fn``, chunked and parallel in time.

    u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l) with g dividing d (channel
    group j uses B[:, j]); D, delta_bias: (d,); initial_state: (b, d, n).
    Δ = softplus(delta + delta_bias) (when asked); h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t; y_t = C_t h_t + D u_t,
    times silu(z_t) when z is given. Returns y (b, d, l) in u's dtype [and the final state (b, d, n), float32].
    """
    p = _Problem(u, A, B, C)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        dt = _process_delta(delta, delta_bias, delta_softplus)
        h0 = None if initial_state is None else initial_state.float()
        y, h_last = _ScanFn.apply(u.float(), dt, A.float(), p.B.float(), p.C.float(), h0)
        if D is not None:
            y = y + u.float() * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
        y = y.to(u.dtype)
    else:
        y, h_last = _forward(p, u, delta, D, z, delta_bias, delta_softplus, initial_state, None)
    return (y, h_last) if return_final_state else y
