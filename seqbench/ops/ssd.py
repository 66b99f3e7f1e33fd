"""Reference chunked SSD: the state space duality algorithm of Mamba-2 in pure PyTorch.

Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality", §6 (the SSD algorithm) and Listing 1. Per head h, with scalar decay A_h < 0:

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T        y_t = h_t C_t + D x_t        (state h_t: (p, n))

The sequence is cut into chunks of Q positions. Inside a chunk the output is the quadratic, attention-like
form y = (L ∘ C B^T)(Δ x), where L[i, j] = exp(Δ_{j+1} A + ... + Δ_i A) for i >= j (the 1-semiseparable
mask); across chunks a linear recurrence passes one (p, n) state per head from chunk to chunk. So the work
is O(l Q) for the diagonal blocks plus O(l n p) for the states, and no (b, l, h, p, n) tensor exists.

The semantics are those of mamba_ssm's ``mamba_chunk_scan_combined`` (x (b, l, h, p), dt (b, l, h),
A (h,), B/C (b, l, g, n) with g groups of h/g consecutive heads, D (h,) or (h, p), z gating
y * silu(z), dt_bias, softplus, dt_limit clamp, initial and final states (b, h, p, n)).

Numerics: everything runs in float32 whatever the input dtype; the within-chunk cumulative sums of Δ A
are taken in float64, so every segment sum exp(cum_i - cum_j) keeps full float32 precision even when
the cumulative decay inside a chunk is huge (extreme Δ). Log-decays are clamped to [-80, 0] before exp
and the causal mask zeroes the scores, so no overflow, inf or NaN reaches the output or the gradient.

Memory: long inputs are processed in groups of chunks, carrying the state from group to group, so the
intermediates of one call are O(group) rather than O(l) (the output itself is O(l), as it must be).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of the largest per-group intermediate, the (b, chunks, h, Q, Q) decay mask (8 MiB in float32).
# Measured on CPU: past ~16 MiB per temporary, glibc serves allocations by fresh mmap and every call pays
# page faults, which made whole-sequence processing several times slower than small groups.
GROUP_ELEMS = 1 << 21
MIN_LOG_DECAY = -80.0  # floor of the in-chunk log-decays fed to exp, see _segment_decay


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None) -> None:
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (b, l, h) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (h,) = ({h},), got {tuple(A.shape)}")
    if B.shape != (b, l, g, n) or C.shape != (b, l, g, n):
        raise ValueError(f"B and C must both be (b, l, g, n) = {(b, l, g, n)}, got {tuple(B.shape)}, {tuple(C.shape)}")
    if h % g:
        raise ValueError(f"the number of groups g={g} must divide the number of heads h={h}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (h,) or (h, p), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")


def discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
    """Δ = clamp(softplus(dt + dt_bias)) in float32, the order mamba_ssm applies them."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _segment_decay(cum: Tensor) -> Tensor:
    """exp(cum_i - cum_j) for i >= j as a float32 (..., q, q) tensor, from float64 cumulative sums (..., q).

    Entries with i < j (where the difference is positive and may overflow) are clamped to exp(0) = 1;
    the caller zeroes them through the masked scores. Log-decays below MIN_LOG_DECAY are raised to it:
    exp(-80) ~ 2e-35 is far below float32 resolution of any sum it enters, and CPU exp is 5-30x slower on
    inputs whose result is subnormal or zero (measured), which long chunks with large Δ produce in bulk.
    """
    if torch.is_grad_enabled() and cum.requires_grad:
        return torch.exp((cum.unsqueeze(-1) - cum.unsqueeze(-2)).float().clamp(MIN_LOG_DECAY, 0.0))
    seg = torch.empty(*cum.shape, cum.shape[-1], dtype=torch.float32, device=cum.device)  # (..., i, j)
    torch.sub(cum.unsqueeze(-1), cum.unsqueeze(-2), out=seg)  # float64 difference, rounded once to float32
    return seg.clamp_(MIN_LOG_DECAY, 0.0).exp_()


def _chunk_group(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor, upper: Tensor
) -> tuple[Tensor, Tensor]:
    """SSD over consecutive chunks of one group, starting from ``state``.

    x (b, t, h, p) float32, dt (b, t, h) discretised Δ, A (g, r) with h = g * r, B/C (b, t, g, n),
    state (b, g, r, p, n) float32, upper (q, q) the boolean mask j > i. t is padded here to a multiple of q
    with Δ = 0, which neither decays nor feeds the state, so the final state is exact.
    Returns y (b, t, h, p) float32 and the final state.
    """
    b, t, h, p = x.shape
    g, r = A.shape
    n = B.shape[-1]
    q = upper.shape[0]
    nc = -(-t // q)
    pad = nc * q - t
    if pad:
        x, B, C = (F.pad(u, (0, 0, 0, 0, 0, pad)) for u in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    x = x.reshape(b, nc, q, g, r, p)  # (b, c, q, g, r, p)
    dt = dt.reshape(b, nc, q, g, r)  # (b, c, q, g, r)
    B = B.reshape(b, nc, q, g, n)  # (b, c, q, g, n)
    C = C.reshape(b, nc, q, g, n)  # (b, c, q, g, n)

    dA = (dt * A).permute(0, 1, 3, 4, 2)  # (b, c, g, r, q): log-decay of every step
    cum = torch.cumsum(dA.double(), dim=-1)  # (b, c, g, r, q) float64, see module docstring

    # 1. Diagonal blocks: y_diag[i] = sum_{j<=i} exp(cum_i - cum_j) (C_i . B_j) Δ_j x_j. The causal mask is
    #    applied to the scores, shared by the r heads of a group (r times fewer elements than the decays).
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B).masked_fill_(upper, 0.0)  # (b, c, g, i, j)
    xdt = x * dt.unsqueeze(-1)  # (b, c, q, g, r, p)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", _segment_decay(cum) * scores.unsqueeze(3), xdt)  # (b, c, q, g, r, p)

    # 2. State each chunk would leave from a zero start: sum_j exp(cum_last - cum_j) Δ_j x_j B_j^T
    to_end = torch.exp(cum[..., -1:] - cum).float().permute(0, 1, 4, 2, 3)  # (b, c, q, g, r)
    chunk_states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, xdt * to_end.unsqueeze(-1))  # (b, c, g, r, p, n)

    # 3. Pass states across chunks: start[c] = exp(P_c) state + sum_{k<c} exp(P_c - P_{k+1}) chunk_states[k],
    #    P_c = exclusive prefix sum of the chunk totals (the semiseparable recurrence at chunk granularity).
    prefix = F.pad(torch.cumsum(cum[..., -1], dim=1), (0, 0, 0, 0, 1, 0))  # (b, c+1, g, r) float64
    pair = (prefix.unsqueeze(2) - prefix[:, 1:].unsqueeze(1)).float()  # (b, c+1, k, g, r)
    later = torch.ones(nc + 1, nc, dtype=torch.bool, device=x.device).tril(-1)  # (c, k): k < c
    pair = torch.exp(pair.masked_fill_(~later[None, :, :, None, None], -math.inf))  # (b, c+1, k, g, r)
    starts = torch.einsum("bckgr,bkgrpn->bcgrpn", pair, chunk_states)  # (b, c+1, g, r, p, n)
    starts = starts + torch.exp(prefix).float()[..., None, None] * state.unsqueeze(1)  # (b, c+1, g, r, p, n)

    # 4. Off-diagonal blocks: the state entering chunk c, decayed to position i and read out by C_i.
    from_start = torch.exp(cum).float().permute(0, 1, 4, 2, 3)  # (b, c, q, g, r)
    y_off = torch.einsum("bcign,bcgrpn->bcigrp", C, starts[:, :-1])  # (b, c, q, g, r, p)
    y = y + y_off * from_start.unsqueeze(-1)
    if D is not None:
        y = y + x * D  # D broadcast as (g, r, 1) or (g, r, p)
    return y.reshape(b, nc * q, h, p)[:, :t], starts[:, -1]


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan with ``mamba_chunk_scan_combined`` semantics.

    x (b, l, h, p), dt (b, l, h), A (h,) negative, B/C (b, l, g, n), D (h,) or (h, p), z (b, l, h, p),
    dt_bias (h,), initial_states (b, h, p, n). Any l. Returns y (b, l, h, p) in x's dtype and, if asked,
    the final state (b, h, p, n) in float32. Differentiable with respect to every tensor argument.
    """
    _check_shapes(x, dt, A, B, C, D, z)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    A32 = A.float().view(g, r)  # (g, r)
    D32 = None if D is None else D.float().view(g, r, -1)  # (g, r, 1) or (g, r, p)
    if initial_states is None:
        state = x.new_zeros(b, g, r, p, n, dtype=torch.float32)  # (b, g, r, p, n)
    else:
        state = initial_states.float().reshape(b, g, r, p, n)  # (b, g, r, p, n)

    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).triu(1)  # (i, j): j > i
    span = max(1, GROUP_ELEMS // (b * h * chunk_size * chunk_size)) * chunk_size  # positions per group
    # Without autograd the groups are written into one preallocated output (no extra copy for a cat).
    tracked = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked)
    y = None if grad else torch.empty(b, l, h, p, dtype=x.dtype, device=x.device)  # (b, l, h, p)
    pieces = []
    for s in range(0, l, span):
        e = min(s + span, l)
        dt_g = discretize_dt(dt[:, s:e], dt_bias, dt_softplus, dt_limit)  # (b, t, h)
        y_g, state = _chunk_group(x[:, s:e].float(), dt_g, A32, B[:, s:e].float(), C[:, s:e].float(), D32, state, upper)
        if z is not None:
            y_g = y_g * F.silu(z[:, s:e].float())
        if y is None:
            pieces.append(y_g.to(x.dtype))
        else:
            y[:, s:e] = y_g
    if y is None:
        y = torch.cat(pieces, dim=1) if pieces else x.new_zeros(x.shape)  # (b, l, h, p)
    if return_final_states:
        return y, state.reshape(b, h, p, n)
    return y
