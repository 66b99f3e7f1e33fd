"""The reference selective-scan ops against a plain per-timestep loop (the oracle lives only here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqbench.ops.scan import selective_state_update


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t; y_t = C_t h_t (+ D u_t) (* silu z_t), one step at a time in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, d, l = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 4:  # (b, g, n, l) -> (b, d, n, l)
        B = B.repeat_interleave(d // B.shape[1], dim=1)
        C = C.repeat_interleave(d // C.shape[1], dim=1)
    else:
        B, C = B[:, None], C[:, None]  # (b, 1, n, l)
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


@pytest.mark.parametrize("batch", [1, 3])
def test_state_update_mamba1_layout_equals_one_loop_step(batch):
    g = torch.Generator().manual_seed(0)
    d, n = 6, 4
    state = torch.randn(batch, d, n, generator=g)
    x, dt, z = (torch.randn(batch, d, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) * 3
    B, C = torch.randn(batch, n, generator=g), torch.randn(batch, n, generator=g)
    D, dt_bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y_ref, h_ref = loop_scan(
        x[..., None], dt[..., None], A, B[..., None], C[..., None], D, z[..., None], dt_bias, True, h0=state
    )
    ptr = state.data_ptr()
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    assert state.data_ptr() == ptr
    torch.testing.assert_close(out, y_ref[..., 0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h_ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_state_update_mamba2_layout_equals_one_loop_step(batch):
    g = torch.Generator().manual_seed(1)
    h, p, n, groups = 4, 3, 5, 2
    state = torch.randn(batch, h, p, n, generator=g)
    x, dt, z = (torch.randn(batch, h, p, generator=g) for _ in range(3))
    A = -torch.rand(h, p, n, generator=g) * 2
    B, C = torch.randn(batch, groups, n, generator=g), torch.randn(batch, groups, n, generator=g)
    D, dt_bias = torch.randn(h, p, generator=g), torch.randn(h, p, generator=g)
    # Flatten heads into channels: channel (i, j) of head i belongs to group i // (h / groups).
    flat = lambda t: t.reshape(batch, h * p, *t.shape[3:])  # noqa: E731
    y_ref, h_ref = loop_scan(
        flat(x)[..., None], flat(dt)[..., None], A.reshape(h * p, n),
        B[..., None], C[..., None], D.reshape(-1), flat(z)[..., None], dt_bias.reshape(-1), True,
        h0=state.reshape(batch, h * p, n),
    )
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    torch.testing.assert_close(out, y_ref[..., 0].float().view(batch, h, p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h_ref.float().view(batch, h, p, n), rtol=1e-5, atol=1e-5)


def test_state_update_keeps_state_dtype_and_returns_input_dtype():
    state = torch.zeros(2, 4, 3)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    out = selective_state_update(state, x, x.abs(), -torch.ones(4, 3), torch.ones(2, 3), torch.ones(2, 3))
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert state.abs().sum() > 0
