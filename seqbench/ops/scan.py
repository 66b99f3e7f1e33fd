"""Reference selective scan of Mamba (Gu & Dao, 2023, "Mamba", Alg. 2); its one-token decode step is in
ops/state_update.py.
Discretisation (ZOH for A, Euler for B, as in the Mamba paper §2):
    Abar_t = exp(Δ_t A),   Bbar_t x_t = Δ_t B_t x_t,   h_t = Abar_t h_{t-1} + Δ_t B_t x_t,   y_t = C_t h_t.
Everything is computed in float32 whatever the input dtype; outputs are cast back to the input dtype.
"""

from __future__ import annotations

from itertools import repeat

import torch
import torch.nn.functional as F
from torch import Tensor

from seqbench.ops import tracks_grad

# Chunked selective scan. Inside, everything is time-major, (b, c, g, n, dg) with dg = d / g the channels of
# one B/C group. The sequence runs in chunks of c steps (a cache-sized work buffer) carrying the state
# (b, g, n, dg): nothing of size (b, l, d, n) is built. In a chunk h_t = a_t h_{t-1} + x_t is solved by a
# two-phase blocked scan (Blelloch 1990, "Prefix sums and their applications", §1.4) looping over the _BLOCK
# steps of a block with all blocks at once: ~5 passes, where a log-depth Hillis-Steele scan needs 2 log2(c)
# (measured 1.5-2x slower). Only decays a in [0, 1] are multiplied and no exp(-cumsum) appears, so any Δ
# (1e-6 .. 1e3 and beyond) is safe. a = exp(Δ A) is computed as exp2(Δ A log2 e), ~4x faster on CPU.
# Measured (2-core EPYC, b=1, d=512, n=16, L=4096; forward+backward ms): chunk & block 64 & 16: 132,
# 128 & 8: 112, 128 & 16: 104, 256 & 16: 123, 256 & 32: 126.

_WORK_ELEMS = 1 << 20  # target elements of one (b, c, g, n, dg) work buffer (4 MiB)
_MIN_CHUNK, _MAX_CHUNK = 32, 256
_BLOCK = 16  # steps per block of the two-level in-chunk scan
_LOG2E = 1.4426950408889634


def _scratch_len(length: int) -> int:
    """Block-level entries _scan_ needs for a sequence of ``length``: m + m / _BLOCK + ... with m = length / _BLOCK."""
    total = 0
    while length >= 2 * _BLOCK:
        length //= _BLOCK
        total += length
    return total


def _scan_(
    a: Tensor, x: Tensor, h0: Tensor | None, dt: Tensor, A2: Tensor, scratch: Tensor, reverse: bool = False
) -> None:
    """In place along dim 1: x_t <- a_t x_{t-1} + x_t from x_{-1} = h0 (reverse: x_t <- a_t x_{t+1} + x_t from
    x_{len} = h0; None = zero state), a_t = exp2(dt_t A2) given. Phase 1: every block's end value from a zero
    start and its decay exp2(A2 Σ dt); a recursive scan over blocks gives their incoming states; phase 2
    replays each block from its state, writing x. x, a: (b, len, g, n, dg); dt: (b, len, g, 1, dg); scratch:
    (2, b, >= _scratch_len(len), g, n, dg), the block values of every level."""
    length = x.shape[1]
    if length < 2 * _BLOCK:
        xs, as_ = x.unbind(1), a.unbind(1)  # one call for all the step views
        steps = range(length - 1, -1, -1) if reverse else range(length)
        prev = h0
        for t in steps:
            if prev is not None:
                xs[t].addcmul_(as_[t], prev)
            prev = xs[t]
        return
    r = length % _BLOCK
    if r:  # the block-aligned part, then the few leftover steps one by one
        main, rest = (slice(r, length), slice(0, r)) if reverse else (slice(0, length - r), slice(length - r, length))
        _scan_(a[:, main], x[:, main], h0, dt[:, main], A2, scratch, reverse)
        h_rest = x[:, r] if reverse else x[:, length - r - 1]
        _scan_(a[:, rest], x[:, rest], h_rest, dt[:, rest], A2, scratch, reverse)
        return
    m = length // _BLOCK
    decay, total = scratch[0, :, :m], scratch[1, :, :m]  # (b, m, g, n, dg)
    a4, x4 = (t.view(t.shape[0], m, _BLOCK, *t.shape[2:]) for t in (a, x))  # (b, m, block, g, n, dg)
    dt_blocks = dt.reshape(dt.shape[0], m, _BLOCK, *dt.shape[2:]).sum(2)  # (b, m, g, 1, dg)
    torch.mul(dt_blocks, A2, out=decay).exp2_()
    order = list(range(_BLOCK - 1, -1, -1)) if reverse else list(range(_BLOCK))
    xs, as_ = x4.unbind(2), a4.unbind(2)  # (b, m, g, n, dg) each: step t of every block
    torch.addcmul(xs[order[1]], as_[order[1]], xs[order[0]], out=total)
    for t in order[2:]:
        torch.addcmul(xs[t], as_[t], total, out=total)
    _scan_(decay, total, h0, dt_blocks, A2, scratch[:, :, m:], reverse)  # total_j <- state at block j's end
    first, a_first = xs[order[0]], as_[order[0]]  # block j starts from the end state of its predecessor
    if reverse:
        first[:, :-1].addcmul_(a_first[:, :-1], total[:, 1:])
    else:
        first[:, 1:].addcmul_(a_first[:, 1:], total[:, :-1])
    edge = m - 1 if reverse else 0
    if h0 is not None:
        first[:, edge].addcmul_(a_first[:, edge], h0)
    for prev, t in zip(order[:-1], order[1:], strict=True):
        xs[t].addcmul_(as_[t], xs[prev])


def _batch_rows(b: int, d: int, n: int) -> int:
    """Batch rows scanned together: as many as fit the work buffer at the shortest chunk (a large batch of
    short sequences would otherwise make every buffer b / rows times larger than the cache)."""
    return max(1, min(b, _WORK_ELEMS // (_MIN_CHUNK * d * n)))


def _chunk_len(b: int, d: int, n: int) -> int:
    """Steps per chunk: the largest power of two whose work buffer fits _WORK_ELEMS, within the bounds."""
    c = 1 << max(0, (_WORK_ELEMS // (b * d * n)).bit_length() - 1)
    return max(_MIN_CHUNK, min(_MAX_CHUNK, c))


def _time_major(t: Tensor) -> Tensor:
    """(b, d, l) -> (b, l, d) float32, contiguous in d. Free when t is already a transposed time-major tensor
    (as Mamba's projections produce); otherwise one 2-D transpose per batch row, torch's fast copy path."""
    t = t.float()
    if _is_time_major(t):
        return t.transpose(1, 2)  # (b, l, d)
    out = torch.empty(t.shape[0], t.shape[2], t.shape[1], device=t.device)
    src = t.contiguous()
    for i in range(t.shape[0]):
        out[i].copy_(src[i].t())
    return out


def _is_time_major(t: Tensor) -> bool:  # (b, d, l) laid out as (b, l, d)
    return t.stride(1) == 1 and t.stride(2) == t.shape[1]


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
        self.A2 = self.A * _LOG2E  # exp(Δ A) = exp2(Δ A log2 e)
        self.chunk = _chunk_len(self.b, self.d, self.n)

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk, self.l)) for s in range(0, self.l, self.chunk)]

    def to_inner(self, h: Tensor) -> Tensor:
        """(b, d, n) -> (b, g, n, dg), float32."""
        return h.float().reshape(self.b, self.g, self.dg, self.n).transpose(2, 3)

    def to_outer(self, h: Tensor) -> Tensor:
        """(b, g, n, dg) -> (b, d, n)."""
        return h.transpose(2, 3).reshape(self.b, self.d, self.n)

    def grouped(self, t: Tensor, s: int, e: int) -> Tensor:
        """Time-major (b, l, d) -> chunk (b, c, g, 1, dg), broadcastable against the state dims."""
        return t[:, s:e].reshape(self.b, e - s, self.g, 1, self.dg)

    def bc(self, t: Tensor, s: int, e: int) -> Tensor:
        """(b, g, n, l) -> time-major float32 chunk (b, c, g, n, 1)."""
        return t[..., s:e].float().permute(0, 3, 1, 2).contiguous().unsqueeze(-1)

    def decays(self, dt: Tensor, out: Tensor) -> Tensor:
        """a = exp(Δ A) for dt (b, c, g, 1, dg), written into out (b, c, g, n, dg)."""
        return torch.mul(dt, self.A2, out=out).exp2_()

    def scratch(self) -> Tensor:
        shape = (2, self.b, _scratch_len(min(self.chunk, self.l)), self.g, self.n, self.dg)
        return torch.empty(shape, device=self.A.device)

    def buffers(self, count: int, extra: int = 0) -> tuple[Tensor, ...]:
        shape = (self.b, min(self.chunk, self.l) + extra, self.g, self.n, self.dg)
        return tuple(torch.empty(shape, device=self.A.device) for _ in range(count))


def _delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    """Δ = softplus(delta + delta_bias), each part when asked; in delta's layout."""
    raw = delta if delta_bias is None else delta + delta_bias
    return F.softplus(raw) if softplus else raw


def _output(out: Tensor, s: int, e: int, chunk: Tensor, time_major: bool) -> None:
    """Write a time-major chunk (b, c, d) into positions s:e of ``out``: (b, l, d) when time_major, else (b, d, l)."""
    (out[:, s:e] if time_major else out[:, :, s:e].transpose(1, 2)).copy_(chunk)


class _Chunk:
    """Time-major float32 views of one chunk s:e of the per-channel inputs, and Δ formed from them."""

    def __init__(self, p: _Problem, s: int, e: int, u: Tensor, delta: Tensor, z: Tensor | None,
                 delta_bias: Tensor | None, softplus: bool, dt: Tensor | None = None):
        self.c, self.u = e - s, u[:, s:e]  # u: (b, c, d)
        self.z = None if z is None else z[:, s:e]
        # Δ (b, c, d): from the full-length Δ the forward kept, or formed here
        self.dt = dt[:, s:e] if dt is not None else _delta(delta[:, s:e], delta_bias, softplus)
        self.dtu = self.dt * self.u
        self.dtg = p.grouped(self.dt, 0, self.c)  # (b, c, g, 1, dg)
        self.B, self.C = p.bc(p.B, s, e), p.bc(p.C, s, e)  # (b, c, g, n, 1)


def _states(p: _Problem, ch: _Chunk, a: Tensor, h: Tensor, h0: Tensor | None, scratch: Tensor) -> Tensor:
    """h_t for t in the chunk, into h (b, c, g, n, dg), from h0 (b, g, n, dg); a receives the decays."""
    p.decays(ch.dtg, a)  # (b, c, g, n, dg)
    torch.mul(ch.B, p.grouped(ch.dtu, 0, ch.c), out=h)  # Δ_t B_t u_t
    _scan_(a, h, h0, ch.dtg, p.A2, scratch)
    return h


def _readout(p: _Problem, ch: _Chunk, h: Tensor, D: Tensor | None) -> Tensor:
    """C_t h_t + D u_t before the gate: (b, c, d)."""
    y = torch.matmul(ch.C.transpose(-1, -2), h).view(p.b, ch.c, p.d)
    return y if D is None else y.addcmul_(ch.u, D)


@torch.no_grad()
def _forward(
    p: _Problem, u: Tensor, delta: Tensor, z: Tensor | None, h0: Tensor | None, D: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, keep: dict[str, Tensor | list[Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunk loop on time-major float32 u, delta, z (b, l, d): the output, time-major (b, l, d), and the
    final state (b, d, n). With ``keep`` (for the backward) it also keeps each chunk's starting state and the
    O(l d) per-channel tensors the backward would otherwise recompute: Δ, silu(z) and pre * silu'(z)."""
    y = torch.empty(p.b, p.l, p.d, device=u.device)
    if keep is not None:
        gates = (None, None) if z is None else (torch.empty_like(y), torch.empty_like(y))
        keep.update(states=[], dt=torch.empty_like(y), gate=gates[0], dgate=gates[1])
    h = torch.zeros(p.b, p.g, p.n, p.dg, device=u.device) if h0 is None else p.to_inner(h0).contiguous()
    a, x = p.buffers(2)
    scratch = p.scratch()
    for s, e in p.chunks():
        ch = _Chunk(p, s, e, u, delta, z, delta_bias, softplus)
        if keep is not None:
            keep["states"].append(h.clone())
            keep["dt"][:, s:e] = ch.dt
        hc = _states(p, ch, a[:, : ch.c], x[:, : ch.c], h, scratch)
        h.copy_(hc[:, -1])
        yc = _readout(p, ch, hc, D)
        if ch.z is None:
            y[:, s:e] = yc
            continue
        gate = F.silu(ch.z)
        if keep is not None:  # y = pre * silu(z): dL/dz = dy * pre * silu'(z), dL/dpre = dy * silu(z)
            keep["dgate"][:, s:e] = torch.ops.aten.silu_backward(yc, ch.z)
            keep["gate"][:, s:e] = gate
        torch.mul(yc, gate, out=y[:, s:e])
    return y, p.to_outer(h)


class _ScanFn(torch.autograd.Function):
    """The whole selective scan with a hand-written backward. The forward keeps only each chunk's starting
    state; the backward recomputes a chunk's states from it, so training memory is O(l d + (l / c) d n)
    rather than O(l d n). D, the gate and the softplus are folded in and everything runs chunk by chunk in
    one (time-major) layout, so no full-length temporary is made beyond the inputs' transposes."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus):  # float32; B, C (b, g, n, l)
        p = _Problem(u, A, B, C)
        u_t, delta_t = _time_major(u), _time_major(delta)
        z_t = None if z is None else _time_major(z)
        k: dict = {}  # what the forward keeps for the backward
        y, h_last = _forward(p, u_t, delta_t, z_t, h0, D, delta_bias, softplus, k)
        states = torch.stack(k["states"])
        ctx.save_for_backward(u_t, delta_t, k["dt"], A, B, C, D, k["gate"], k["dgate"], delta_bias, states)
        ctx.softplus, ctx.has_h0 = softplus, h0 is not None
        ctx.time_major = tuple(t is not None and _is_time_major(t) for t in (u, delta, z))  # layouts of the grads
        return y.transpose(1, 2), h_last

    @staticmethod
    @torch.no_grad()
    def backward(ctx, dy, dh_last):
        u, delta, dt, A, B, C, D, gate, dgate, delta_bias, states = ctx.saved_tensors  # (b, l, d) but A .. D
        p = _Problem(u.transpose(1, 2), A, B, C)
        dy = _time_major(dy)
        tm_u, tm_delta, tm_z = ctx.time_major
        shape_of = lambda tm: (p.b, p.l, p.d) if tm else (p.b, p.d, p.l)  # noqa: E731
        du, ddelta = torch.empty(shape_of(tm_u), device=u.device), torch.empty(shape_of(tm_delta), device=u.device)
        dz = None if gate is None else torch.empty(shape_of(tm_z), device=u.device)
        dB, dC = torch.empty_like(p.B), torch.empty_like(p.C)  # (b, g, n, l)
        dA = torch.zeros_like(p.A)  # (g, n, dg)
        dD = None if D is None else torch.zeros_like(D)
        dbias = None if delta_bias is None else torch.zeros_like(delta_bias)
        carry = None if dh_last is None else p.to_inner(dh_last)  # dL/dh at the end of the current chunk
        dh0 = None
        (a,) = p.buffers(1, extra=1)
        hbuf, gbuf = p.buffers(2)  # whole chunks of them are contiguous (einsum would copy a slice of a batch)
        scratch = p.scratch()
        for i, (s, e) in reversed(list(enumerate(p.chunks()))):
            ch = _Chunk(p, s, e, u, delta, None, delta_bias, ctx.softplus, dt)
            c = ch.c
            # Recompute h_t from the chunk's starting state h_{s-1}, and a_t for t = s .. e, where a_e belongs
            # to the next chunk (Δ := 0, a = 1, past the sequence's end).
            start = states[i]  # h_{s-1}: (b, g, n, dg)
            h = _states(p, ch, a[:, :c], hbuf[:, :c], start, scratch)
            if e < p.l:
                dt_next = p.grouped(dt, e, e + 1)
            else:
                dt_next = torch.zeros_like(ch.dtg[:, :1])
            dt_ext = torch.cat([ch.dtg, dt_next], dim=1)  # (b, c + 1, g, 1, dg)
            p.decays(dt_next, a[:, c : c + 1])
            # Through the gate y = pre * silu(z) and the skip pre = C h + D u.
            dyc = dy[:, s:e]  # (b, c, d)
            if gate is not None:
                _output(dz, s, e, dyc * dgate[:, s:e], tm_z)
                dyc = dyc * gate[:, s:e]
            if D is not None:
                dD.add_((dyc * ch.u).sum((0, 1)))
            dyg = p.grouped(dyc, 0, c)  # (b, c, g, 1, dg)
            # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: a reverse scan with coefficients shifted by one,
            # entered from g of the next chunk's first step.
            gc = gbuf[:, :c]
            torch.mul(ch.C, dyg, out=gc)
            _scan_(a[:, 1 : c + 1], gc, carry, dt_ext[:, 1:], p.A2, scratch, reverse=True)
            carry = gc[:, 0].clone()
            if i == 0 and ctx.has_h0:
                dh0 = p.to_outer(a[:, 0] * carry)  # dL/dh_{-1}, before a is overwritten below
            # (einsum picks a gemm layout here; matmul would run c slow (n x dg) @ (dg x 1) products)
            dC[..., s:e] = torch.einsum("bcgnd,bcgd->bgnc", h, dyg.squeeze(3))
            dB[..., s:e] = torch.einsum("bcgnd,bcgd->bgnc", gc, p.grouped(ch.dtu, 0, c).squeeze(3))
            ddtu = torch.matmul(ch.B.transpose(-1, -2), gc).view(p.b, c, p.d)  # dL/d(Δu): (b, c, d)
            # dL/d(Δ A)_t = g_t a_t h_{t-1}; then chain to Δ (sum over n) and to A (sum over b, t).
            torch.mul(a[:, 1:c], h[:, : c - 1], out=a[:, 1:c])  # a_t h_{t-1}, a is done with
            a[:, 0].mul_(start)
            dlog = a[:, :c].mul_(gc)  # (b, c, g, n, dg)
            dA.add_(torch.mul(dlog, ch.dtg, out=gc).sum((0, 1)))
            ddt = torch.mul(dlog, p.A, out=gc).sum(3).view(p.b, c, p.d).addcmul_(ddtu, ch.u)  # (b, c, d)
            duc = ddtu.mul_(ch.dt)
            _output(du, s, e, duc if D is None else duc.addcmul_(dyc, D), tm_u)
            if ctx.softplus:  # d softplus(x) / dx = sigmoid(x)
                ddt.mul_(torch.sigmoid(_delta(delta[:, s:e], delta_bias, False)))
            if dbias is not None:
                dbias.add_(ddt.sum((0, 1)))
            _output(ddelta, s, e, ddt, tm_delta)
        dA_out = dA.transpose(1, 2).reshape(p.d, p.n)
        du, ddelta, dz = (t if t is None or not tm else t.transpose(1, 2)
                          for t, tm in zip((du, ddelta, dz), ctx.time_major, strict=True))
        return du, ddelta, dA_out, dB, dC, dD, dz, dbias, dh0, None


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
    delta_bias: Tensor | None = None, delta_softplus: bool = False, initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the semantics of mamba_ssm's ``selective_scan_fn``, chunked and parallel in time.

    u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l) with g dividing d (channel
    group j uses B[:, j]); D, delta_bias: (d,); initial_state: (b, d, n).
    Δ = softplus(delta + delta_bias) (when asked); h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t; y_t = C_t h_t + D u_t,
    times silu(z_t) when z is given. Returns y (b, d, l) in u's dtype [and the final state (b, d, n), float32].
    """
    p = _Problem(u, A, B, C)
    rows = _batch_rows(p.b, p.d, p.n)
    if rows < p.b:  # independent sequences: scan them in cache-sized groups of batch rows
        dtype = u.dtype
        # time-major float32 once for the whole batch (the groups' slices of it are then free to use)
        u, delta, z = (None if t is None else _time_major(t).transpose(1, 2) for t in (u, delta, z))  # (b, d, l)
        # split, not u[i : i + rows]: the backward of each slice would zero-fill a gradient of the whole batch
        splits = (repeat(None) if t is None else t.split(rows) for t in (u, delta, p.B, p.C, z, initial_state))
        parts = [
            selective_scan(u_g, delta_g, A, B_g, C_g, D, z_g, delta_bias, delta_softplus, h0_g, return_final_state=True)
            for u_g, delta_g, B_g, C_g, z_g, h0_g in zip(*splits)  # noqa: B905 (repeat(None) is endless)
        ]
        ys, hs = zip(*parts, strict=True)
        y = torch.cat([y.transpose(1, 2) for y in ys]).transpose(1, 2).to(dtype)  # (b, d, l), time-major
        h_last = torch.cat(hs)  # (b, d, n)
        return (y, h_last) if return_final_state else y
    f32 = [None if t is None else t.float() for t in (D, z, delta_bias, initial_state)]
    if tracks_grad(u, delta, A, B, C, D, z, delta_bias, initial_state):
        y, h_last = _ScanFn.apply(u.float(), delta.float(), A.float(), p.B.float(), p.C.float(), *f32, delta_softplus)
    else:
        D32, z32, bias32, h0 = f32
        z_t = None if z32 is None else _time_major(z32)
        y, h_last = _forward(p, _time_major(u), _time_major(delta), z_t, h0, D32, bias32, delta_softplus)
        y = y.transpose(1, 2)
    y = y.to(u.dtype)
    return (y, h_last) if return_final_state else y
