"""The reference selective-scan ops against a plain per-timestep loop (the oracle lives only here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from seqbench.ops import scan
from seqbench.ops.scan import selective_scan
from seqbench.ops.state_update import selective_state_update


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
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
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
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    for state_dtype in (torch.float32, torch.bfloat16):  # the in-place float32 path and the low-precision path
        state = torch.zeros(2, 4, 3, dtype=state_dtype)
        out = selective_state_update(state, x, x.abs(), -torch.ones(4, 3), torch.ones(2, 3), torch.ones(2, 3))
        assert out.dtype == torch.bfloat16 and state.dtype == state_dtype
        assert state.abs().sum() > 0


def _inputs(batch, d, n, l, groups=0, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    u, z = torch.randn(batch, d, l, generator=g), torch.randn(batch, d, l, generator=g)
    delta = torch.rand(batch, d, l, generator=g) * 1.5 + 0.01  # positive: also a valid step without softplus
    if extreme:  # a mix of huge steps (forget everything), tiny steps (remember everything) and normal ones
        pick = torch.rand(batch, d, l, generator=g)
        delta = torch.where(pick < 0.2, torch.full_like(delta, 1e3), delta)
        delta = torch.where((pick >= 0.2) & (pick < 0.5), torch.full_like(delta, 1e-6), delta)
    A = -torch.rand(d, n, generator=g) * (16 if extreme else 3) - 0.05
    bshape = (batch, groups, n, l) if groups else (batch, n, l)
    B, C = torch.randn(bshape, generator=g), torch.randn(bshape, generator=g)
    D, bias, h0 = torch.randn(d, generator=g), torch.randn(d, generator=g) * 0.1, torch.randn(batch, d, n, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, h0=h0)


CASES = {  # name -> (use groups, D, z, delta_bias + softplus, initial state)
    "plain": (0, False, False, False, False),
    "groups": (2, False, False, False, False),
    "full": (2, True, True, True, True),
    "D-z-softplus": (0, True, True, True, False),
}


def _call(x, case, **kw):
    groups, use_d, use_z, use_sp, use_h0 = case
    return selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"] if use_d else None, x["z"] if use_z else None,
        x["delta_bias"] if use_sp else None, use_sp, x["h0"] if use_h0 else None, return_final_state=True, **kw,
    )


def _oracle(x, case):
    groups, use_d, use_z, use_sp, use_h0 = case
    return loop_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"] if use_d else None, x["z"] if use_z else None,
        x["delta_bias"] if use_sp else None, use_sp, x["h0"] if use_h0 else None,
    )


@pytest.fixture(params=[4, 16])
def small_chunks(monkeypatch, request):
    """Force 32-step chunks so short sequences cross several chunk boundaries and uneven tails; with 4-step
    blocks the in-chunk scan also recurses twice. The work buffer holds 2 batch rows of d = 8, n = 4, so a
    batch of 3 is scanned as groups of 2 and 1 rows."""
    monkeypatch.setattr(scan, "_WORK_ELEMS", 2 * 32 * 8 * 4)
    monkeypatch.setattr(scan, "_MAX_CHUNK", 32)
    monkeypatch.setattr(scan, "_MIN_CHUNK", 32)
    monkeypatch.setattr(scan, "_BLOCK", request.param)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("l", [1, 13, 53, 300])
def test_chunked_scan_equals_loop(batch, case, l, small_chunks):
    x = _inputs(batch, 8, 4, l, groups=CASES[case][0], seed=l)
    y, h = _call(x, CASES[case])
    y_ref, h_ref = _oracle(x, CASES[case])
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("l", [300, 1000])
def test_default_chunking_equals_loop(l, block, monkeypatch):
    """Default chunk length (256 at this size), a ragged last chunk, and with 4-step blocks three levels of
    in-chunk recursion."""
    monkeypatch.setattr(scan, "_BLOCK", block)
    x = _inputs(2, 6, 3, l, groups=3, seed=7)
    y, h = _call(x, CASES["full"])
    y_ref, h_ref = _oracle(x, CASES["full"])
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("softplus", [False, True])
def test_extreme_delta_is_stable_and_exact(batch, softplus, small_chunks):
    x = _inputs(batch, 8, 4, 200, seed=3, extreme=True)
    case = (0, True, True, softplus, True)
    if softplus:  # softplus(1e3) = 1e3; tiny raw values become ~0.69, so also feed very negative raw deltas
        x["delta"] = torch.where(x["delta"] == 1e-6, torch.full_like(x["delta"], -14.0), x["delta"])
        x["delta_bias"] = torch.zeros_like(x["delta_bias"])
    y, h = _call(x, case)
    y_ref, h_ref = _oracle(x, case)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(h, h_ref.float(), rtol=1e-4, atol=1e-5 * h_ref.abs().max().item())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", ["groups", "full"])
def test_gradients_match_loop_autograd(batch, case, small_chunks):
    x = _inputs(batch, 8, 4, 77, groups=CASES[case][0], seed=11)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]
    ours = {k: x[k].clone().requires_grad_() for k in names}
    ref = {k: x[k].double().requires_grad_() for k in names}
    g = torch.Generator().manual_seed(5)
    wy, wh = torch.randn(batch, 8, 77, generator=g), torch.randn(batch, 8, 4, generator=g)
    y, h = _call(ours, CASES[case])
    ((y * wy).sum() + (h * wh).sum()).backward()
    y_ref, h_ref = _oracle(ref, CASES[case])
    ((y_ref * wy.double()).sum() + (h_ref * wh.double()).sum()).backward()
    used = [k for k in names if ref[k].grad is not None]
    assert {"u", "delta", "A", "B", "C"} <= set(used)
    for k in used:
        torch.testing.assert_close(ours[k].grad, ref[k].grad.float(), rtol=1e-4, atol=1e-4, msg=k)


def test_grad_and_inference_paths_agree():
    x = _inputs(2, 8, 4, 100, groups=2, seed=2)
    with torch.no_grad():
        y0, h0 = _call(x, CASES["full"])
    y1, h1 = _call({k: v.clone().requires_grad_() for k, v in x.items()}, CASES["full"])
    torch.testing.assert_close(y1.detach(), y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1.detach(), h0, rtol=1e-6, atol=1e-6)


def test_low_precision_inputs_compute_in_float32():
    x = _inputs(2, 8, 4, 64, seed=4)
    y32 = _call(x, CASES["D-z-softplus"])[0]
    xb = {k: v.bfloat16() for k, v in x.items()}
    yb, hb = _call(xb, CASES["D-z-softplus"])
    assert yb.dtype == torch.bfloat16 and hb.dtype == torch.float32
    torch.testing.assert_close(yb.float(), y32, rtol=0.05, atol=0.05)


def test_bad_shapes_raise_clear_errors():
    x = _inputs(1, 6, 4, 10)
    with pytest.raises(ValueError, match="groups"):
        selective_scan(x["u"], x["delta"], x["A"], torch.randn(1, 4, 4, 10), torch.randn(1, 4, 4, 10))
    with pytest.raises(ValueError, match="complex"):
        selective_scan(x["u"], x["delta"], x["A"].to(torch.complex64), x["B"], x["C"])


_PEAK_SCRIPT = """
import torch
from seqbench.ops.scan import selective_scan
torch.set_num_threads(1)
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
b, d, n, l = 1, 64, 16, 1 << 17
u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
A, B, C = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l)
selective_scan(u[..., :512], delta[..., :512], A, B[..., :512], C[..., :512])  # warm up the allocator
base = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
y = selective_scan(u, delta, A, B, C)
print(rss('VmHWM') - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_memory_does_not_hold_the_full_state_sequence():
    """l = 2^17, d = 64, n = 16: a (b, l, d, n) tensor would be 512 MiB; chunking keeps the peak near a few
    (b, l, d) tensors (32 MiB each)."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 256 * 2**20, f"peak above baseline {peak / 2**20:.0f} MiB"
