"""The one-token state update shared by Mamba-1 and Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs", §7):
the decode step of both, with the semantics of mamba_ssm's ``selective_state_update``.
    h <- exp(Δ A) h + Δ B x,   y = C h + D x   (times silu(z) when given)
Computed in float32 whatever the input dtype; the output is cast back to the input dtype.
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
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
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
    dBx = (dt32 * x32).unsqueeze(-1)  # (b, h, p, 1)
    if state.dtype == torch.float32:  # update in place: no state-sized temporaries on the decode hot path
        new = state.mul_(dA).addcmul_(B32, dBx)
    else:  # low-precision state: compute in float32, round once
        new = state.float() * dA + B32 * dBx  # (b, h, p, n)
        state.copy_(new)
    out = (new * C32).sum(-1)  # (b, h, p)
    if D is not None:
        out = out + x32 * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(x.dtype)
