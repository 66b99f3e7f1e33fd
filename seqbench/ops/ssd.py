"""Reference chunked SSD: the state space duality algorithm of Mamba-2 in pure PyTorch.

Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality", §6 (the SSD algorithm) and Listing 1. Per head h, with scalar decay A_h < 0:

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T        y_t = h_t C_t + D x_t        (state h_t: (p, n))

The sequence is cut into blocks of q positions. Inside a block the output is the quadratic, attention-like
form y = (L ∘ C B^T)(Δ x), where L[i, j] = exp(cum_i - cum_j) for i >= j (cum: the running sum of Δ A, the
1-semiseparable mask); across blocks a linear recurrence passes one (p, n) state per head from block to
block. So the work is O(l q) for the diagonal blocks plus O(l n p) for the states, and no (b, l, h, p, n)
tensor exists.

Blocking is the reference's own choice (``block_len``), made from the shape and device: it is not the
``chunk_size`` argument, which names the fused CUDA kernel's block and does not change the math. Blocks never
run past l (the last block is just shorter), so a short sequence costs what its length costs.

The mask is never built per head when it can be avoided: L[i, j] = exp(cum_i - m) exp(m - cum_j) splits into
a row and a column scale (m: half the block's total log-decay), so the diagonal block of all r heads of a
group is one (q, q) @ (q, r p) product with the heads' scales applied to its input and output. The split is
used when every block's total log-decay is within FACTOR_RANGE (both scales then stay within e^±60, normal
float32 numbers, and every product keeps float32 relative precision). Otherwise (extreme Δ) the group falls
back to the explicit (h, q, q) mask, whose log-decays are clamped to [MIN_LOG_DECAY, 0] before exp. The math
is causal either way; the rounding of position i may depend on later Δ of its block (through m and the path
taken), at the level of float32 rounding.

The semantics are those of mamba_ssm's ``mamba_chunk_scan_combined`` (x (b, l, h, p), dt (b, l, h),
A (h,), B/C (b, l, g, n) with g groups of h/g consecutive heads, D (h,) or (h, p), z gating
y * silu(z), dt_bias, softplus, dt_limit clamp, initial and final states (b, h, p, n)).

Numerics: everything runs in float32 whatever the input dtype; the within-block cumulative sums of Δ A are
taken in float64, so every segment exp(cum_i - cum_j) keeps full float32 precision even when the cumulative
decay inside a block is huge. Gradients: when states pass and every block takes the split-mask path (the
usual case), ops/ssd_grad.py's written-out backward; otherwise autograd through these differentiable steps.

Memory: long inputs are processed in groups of blocks, carrying the state from group to group, so the
intermediates of one call are O(group) rather than O(l) (the output itself is O(l), as it must be).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seqbench.ops import tracks_grad
from seqbench.ops.ssd_grad import factored_ssd
from seqbench.ops.ssd_states import (
    MIN_LOG_DECAY,
    block_scores,
    exp_decay,
    factored_group,
    head_major,
    n_major,
    pass_states,
)

# Elements of the largest per-group intermediate (the block states, or the explicit mask). Measured on CPU:
# past ~16 MiB per temporary, glibc serves allocations by fresh mmap and every call pays page faults.
GROUP_ELEMS = 1 << 21
FACTOR_RANGE = 120.0  # largest total log-decay of a block for which the mask is split into row/column scales
MAX_BLOCKS = 16  # blocks per group (measured under autograd: one group of 64 blocks was slower)
BLOCK = 64  # positions per block of a long sequence on CPU (measured: 32 and 128 are slower at n=128, hp=512)


def block_len(l: int, h: int, p: int, g: int, n: int, device: torch.device | str = "cpu") -> int:
    """Positions per block for a sequence of l, from the shape and device alone.

    The diagonal blocks cost 2 q (g n + h p) FLOPs per token; more than one block adds 4 h p n (each block's
    state and its readout). So one block covering the sequence is cheaper while l <= BLOCK + 2 h p n / (g n
    + h p), capped at 2 BLOCK so that its total log-decay stays within FACTOR_RANGE for ordinary Δ (measured:
    one 256-block on the masked path is 2-4x slower than four 64-blocks). Beyond it, BLOCK positions, a size
    where CPU matmuls are efficient and the per-block work small; GPUs get twice larger blocks.
    """
    base = BLOCK * (2 if torch.device(device).type == "cuda" else 1)
    single = min(2 * base, base + 2 * h * p * n // (g * n + h * p))
    return max(1, l) if l <= single else base


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


def _masked_decay(cum: Tensor) -> Tensor:
    """exp(cum_i - cum_j) for i >= j as float32 (..., q, q) from float64 cumulative sums (..., q); entries
    i < j are exp(0) = 1 (the caller zeroes them through the masked scores)."""
    if torch.is_grad_enabled() and cum.requires_grad:
        return torch.exp((cum.unsqueeze(-1) - cum.unsqueeze(-2)).float().clamp(MIN_LOG_DECAY, 0.0))
    seg = torch.empty(*cum.shape, cum.shape[-1], dtype=torch.float32, device=cum.device)  # (..., i, j)
    torch.sub(cum.unsqueeze(-1), cum.unsqueeze(-2), out=seg)  # float64 difference, rounded once to float32
    return seg.clamp_(MIN_LOG_DECAY, 0.0).exp_()


def _masked_group(
    x: Tensor, dt: Tensor, cum: Tensor, scores: Tensor, Bb: Tensor, Cb: Tensor, state: Tensor | None, need_state: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """As ops/ssd_states.factored_group with the explicit (h, q, q) decay mask: exact for any block log-decay."""
    b, c, q, h, p = x.shape
    g, n = Bb.shape[2], Bb.shape[-1]
    r = h // g
    xdt = x * dt.unsqueeze(-1)  # (b, c, q, h, p)
    decay = _masked_decay(cum.transpose(2, 3)).view(b, c, g, r, q, q)  # (b, c, g, r, i, j)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", decay * scores.unsqueeze(3), xdt.view(b, c, q, g, r, p))
    y = y.reshape(b, c, q, h, p)
    entering = final = None
    if c > 1 or need_state:
        to_end = exp_decay(cum[:, :, -1:] - cum)  # (b, c, q, h)
        xe = (xdt * to_end.unsqueeze(-1)).view(b, c, q, g, r * p)
        local = torch.einsum("bcjgx,bcgjn->bcgnx", xe, Bb).reshape(b, c, g, n, r, p)  # (b, c, g, n, r, p)
        decay = exp_decay(cum[:, :, -1]).view(b, c, g, 1, r, 1)
        entering, final = pass_states(local, decay, n_major(state, g))
    elif state is not None:
        entering = n_major(state, g).unsqueeze(1)  # (b, 1, g, n, r, p)
    if entering is not None:
        y_off = torch.einsum("bcgin,bcgnx->bcigx", Cb, entering.reshape(b, -1, g, n, r * p)).reshape(b, c, q, h, p)
        y = y + y_off * exp_decay(cum).unsqueeze(-1)
    return (y, final) if out is None else (out.copy_(y), final)


def _block_group(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor | None, q: int, need_state: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SSD over the consecutive blocks of q positions of one group, entering with ``state`` (None: zeros).

    x (b, t, h, p), dt (b, t, h) discretised Δ, A (h,), B/C (b, t, g, n), all float32, t a multiple of q;
    state (b, h, p, n). Returns y (b, t, h, p) without the D skip (written into ``out`` (b, t, h, p) float32
    when given), and the state after the group (b, h, p, n) when ``need_state`` (else None).
    """
    b, t, h, p = x.shape
    c = t // q
    dt, cum, Bb, Cb, _, scores = block_scores(dt, A, B, C, q)  # cum (b, c, q, h) float64; scores (b, c, g, i, j)
    group = factored_group if _factorable(cum[:, :, -1]) else _masked_group
    dest = None if out is None else out.view(b, c, q, h, p)
    y, final = group(x.view(b, c, q, h, p), dt, cum, scores, Bb, Cb, state, need_state, dest)
    return y.reshape(b, t, h, p), (head_major(final) if need_state else None)


def _factorable(block_log_decays: Tensor) -> bool:
    """Whether every block's total log-decay (<= 0) is within FACTOR_RANGE: its mask then splits into scales."""
    return bool(-block_log_decays.min() <= FACTOR_RANGE)


def _all_factored(dtA: Tensor, q: int) -> bool:
    """Whether every block of q positions of dtA = Δ A (b, l, h) is ``_factorable``."""
    b, l, h = dtA.shape
    whole = l - l % q
    totals = [dtA[:, :whole].double().reshape(b, whole // q, q, h).sum(2)] if whole else []
    if whole < l:
        totals.append(dtA[:, whole:].double().sum(1, keepdim=True))
    return _factorable(torch.cat(totals, dim=1))


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
    dt_bias (h,), initial_states (b, h, p, n). Any l. ``chunk_size`` is the fused kernel's block length,
    checked but not used: this reference blocks by shape (``block_len``) and its result does not depend on it.
    Returns y (b, l, h, p) in x's dtype and, if asked, the final state (b, h, p, n) in float32.
    Differentiable with respect to every tensor argument.
    """
    _check_shapes(x, dt, A, B, C, D, z)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    A32 = A.float()
    D32 = None if D is None else D.float().view(h, -1)  # (h, 1) or (h, p)
    state = None if initial_states is None else initial_states.float()  # (b, h, p, n)
    q = block_len(l, h, p, g, n, x.device)
    per_block = b * max(h * p * n, h * q * q)  # elements of the largest per-block intermediate
    span = max(1, min(MAX_BLOCKS, GROUP_ELEMS // per_block)) * q  # positions per group
    whole = l - l % q
    groups = [(s, min(s + span, whole)) for s in range(0, whole, span)] + ([(whole, l)] if whole < l else [])
    # Without autograd the groups are written into one preallocated output (no extra copy for a cat).
    grad = tracks_grad(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if grad:
        dt32 = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h)
        # States to pass (more than one block, or a state in or out) and no extreme Δ: the written-out backward
        # of ops/ssd_grad.py. A single block without states has none of the costs it saves.
        stateful = l > q or state is not None or return_final_states
        if stateful and _all_factored(dt32 * A32, q):
            x32 = x.float()
            y, state = factored_ssd(x32, dt32, A32, B.float(), C.float(), state, q, groups)
            y = y if D32 is None else torch.addcmul(y, x32, D32)
            y = (y if z is None else y * F.silu(z.float())).to(x.dtype)
            return (y, state) if return_final_states else y
    y = None if grad else torch.empty(b, l, h, p, dtype=x.dtype, device=x.device)  # (b, l, h, p)
    pieces = []
    sizes = [e - s for s, e in groups]
    parts = [t.split(sizes, dim=1) for t in (x, dt, B, C)]  # one split: its backward is a single cat
    z_parts = z.split(sizes, dim=1) if z is not None else [None] * len(groups)
    for i, ((s, e), x_g, dt_g, B_g, C_g, z_g) in enumerate(zip(groups, *parts, z_parts, strict=True)):
        need_state = return_final_states or i + 1 < len(groups)
        x_g = x_g.float()
        dt_g = discretize_dt(dt_g, dt_bias, dt_softplus, dt_limit)  # (b, t, h)
        q_g = min(q, e - s)  # the last group may be one shorter block
        if y is not None and y.dtype == torch.float32:  # in place, straight into the output
            y_g, state = _block_group(x_g, dt_g, A32, B_g.float(), C_g.float(), state, q_g, need_state, y[:, s:e])
            if D32 is not None:
                y_g.addcmul_(x_g, D32)
            if z_g is not None:
                y_g.mul_(F.silu(z_g.float()))
            continue
        y_g, state = _block_group(x_g, dt_g, A32, B_g.float(), C_g.float(), state, q_g, need_state)
        if D32 is not None:
            y_g = torch.addcmul(y_g, x_g, D32)
        if z_g is not None:
            y_g = y_g * F.silu(z_g.float())
        if y is None:
            pieces.append(y_g.to(x.dtype))
        else:
            y[:, s:e] = y_g
    if y is None:
        y = torch.cat(pieces, dim=1) if pieces else x.new_zeros(x.shape)  # (b, l, h, p)
    if return_final_states:
        final = state if state is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
        return y, final
    return y
