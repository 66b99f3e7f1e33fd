"""S4D: blocked Vandermonde vs naive, decode parity, chunked prefill, state, causality, cache, inits, grads, bf16."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from seqbench.config import ModelSpec
from seqbench.models import build_model
from seqbench.models.s4 import S4D, vandermonde, vandermonde_transpose
from seqbench.ops import KernelUnavailable

D_MODEL, D_STATE = 16, 8


def make(seed: int = 0, **kw) -> S4D:
    torch.manual_seed(seed)
    kw = {"d_state": D_STATE, **kw}
    return S4D(D_MODEL, **kw).eval()


def naive_ssm(m: S4D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dt·A, dA, dB, C in complex128 straight from the parameters (test oracle)."""
    dt = torch.exp(m.log_dt.double())
    A = torch.complex(-torch.exp(m.log_A_real.double()), m.A_imag.double())
    dtA = dt[:, None] * A
    dA = torch.exp(dtA)
    dB = (dA - 1) / A * torch.view_as_complex(m.B.double().contiguous())
    return dtA, dA, dB, torch.view_as_complex(m.C.double().contiguous())


def naive_kernel(m: S4D, length: int) -> torch.Tensor:
    """K[h, l] = 2 Re sum_n C dB dA^l with the whole (H, N/2, L) Vandermonde tensor materialised."""
    dtA, _, dB, C = naive_ssm(m)
    vand = torch.exp(dtA[:, :, None] * torch.arange(length, dtype=torch.float64))  # (h, n2, l)
    return 2 * torch.einsum("hn,hnl->hl", C * dB, vand).real


@pytest.mark.parametrize("length", [1, 5, 37, 300, 5000])
def test_blocked_kernel_equals_naive(length: int) -> None:
    m = make(dt_min=1e-3, dt_max=1e-2)  # slow decay: late taps and large phases are exercised
    with torch.no_grad():
        k = m.kernel(length)
    ref = naive_kernel(m, length)
    assert k.shape == (D_MODEL, length) and k.dtype == torch.float32
    torch.testing.assert_close(k.double(), ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_batched_vandermonde_and_transpose_equal_naive(batch: int) -> None:
    m = make(1)
    dtA, dA, *_ = m._discretize()
    g = torch.Generator().manual_seed(3)
    coef = torch.randn(batch, D_MODEL, D_STATE // 2, dtype=torch.complex64, generator=g)
    v = torch.randn(batch, D_MODEL, 45, generator=g)
    vand = torch.exp(dtA.cdouble()[:, :, None] * torch.arange(45, dtype=torch.float64))  # (h, n2, l)
    ref = 2 * torch.einsum("bhn,hnl->bhl", coef.cdouble(), vand).real
    torch.testing.assert_close(vandermonde(coef, dtA, 45).double(), ref, atol=1e-4, rtol=1e-4)
    ref_t = torch.einsum("bhl,hnl->bhn", v.double().to(torch.complex128), vand)
    torch.testing.assert_close(vandermonde_transpose(v, dtA).cdouble(), ref_t, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_parity(batch: int) -> None:
    m = make(2)
    x = torch.randn(batch, 30, D_MODEL, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_cache(batch, 30, torch.float32, "cpu")
        t = 11
        outs = [m(x[:, :t], cache)] + [m.step(x[:, p : p + 1], cache, p) for p in range(t, 30)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_chunked_prefill_equals_one_forward(batch: int) -> None:
    m = make(3, d_state=16, init="inv")
    x = torch.randn(batch, 70, D_MODEL, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(x)
        one = m.allocate_cache(batch, 70, torch.float32, "cpu")
        m(x, one)
        chunked = m.allocate_cache(batch, 70, torch.float32, "cpu")
        bounds = [0, 1, 9, 40, 70]  # uneven chunks, including a single token
        outs = [m(x[:, s:e], chunked, s) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked["state"], one["state"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_state_equals_stepped_state_and_naive_sum(batch: int) -> None:
    m = make(4)
    x = torch.randn(batch, 25, D_MODEL, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        prefilled = m.allocate_cache(batch, 25, torch.float32, "cpu")
        m(x, prefilled)
        stepped = m.allocate_cache(batch, 25, torch.float32, "cpu")
        for p in range(25):
            m.step(x[:, p : p + 1], stepped, p)
    assert prefilled["state"].abs().max() > 1e-3  # a real, non-trivial state
    torch.testing.assert_close(prefilled["state"], stepped["state"], atol=1e-5, rtol=1e-5)
    _, dA, dB, _ = naive_ssm(m)
    powers = dA[:, :, None] ** torch.arange(24, -1, -1, dtype=torch.float64)  # (h, n2, l): dA^(L-1-k)
    ref = torch.einsum("hnl,bhl->bhn", dB[:, :, None] * powers, x.transpose(1, 2).double().cdouble())
    torch.testing.assert_close(torch.view_as_complex(prefilled["state"]).cdouble(), ref, atol=1e-5, rtol=1e-4)


def test_step_sees_parameter_updates() -> None:
    m = make(11)
    x = torch.randn(2, 12, D_MODEL, generator=torch.Generator().manual_seed(12))

    def stepped() -> torch.Tensor:
        cache = m.allocate_cache(2, 12, torch.float32, "cpu")
        return torch.cat([m.step(x[:, p : p + 1], cache, p) for p in range(12)], 1)

    with torch.no_grad():
        before = stepped()  # fills the discretisation memo
        m.C.mul_(-1.5)  # an in-place update, as an optimizer makes
        m.log_dt.add_(0.3)
        torch.testing.assert_close(stepped(), m(x), atol=1e-5, rtol=1e-5)
        m.load_state_dict(make(12).state_dict())
        torch.testing.assert_close(stepped(), m(x), atol=1e-5, rtol=1e-5)
    assert (before - m(x)).abs().max() > 1e-2


def test_causality() -> None:
    m = make(5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, D_MODEL, generator=g)
    t = 17
    x2 = x.clone()
    x2[:, t + 1 :] = 10 * torch.randn(3, 40 - t - 1, D_MODEL, generator=g)
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-2


def test_cache_bytes_constant_in_length_and_equal_to_shape_arithmetic() -> None:
    m = make(6)
    expected = 3 * D_MODEL * (D_STATE // 2) * 2 * 4  # (b, d, N/2, re/im) float32
    for max_len in (16, 1024, 1 << 20):
        cache = m.allocate_cache(3, max_len, torch.bfloat16, "cpu")
        assert cache["state"].shape == (3, D_MODEL, D_STATE // 2, 2) and cache["state"].dtype == torch.float32
        assert sum(t.numel() * t.element_size() for t in cache.values()) == expected
    spec = ModelSpec(name="s", kind="s4d", d_model=D_MODEL, n_layers=2, d_state=D_STATE, vocab_size=32)
    model = build_model(spec)
    assert model.allocate_cache(3, 64).nbytes() == model.allocate_cache(3, 4096).nbytes() == 2 * expected


@pytest.mark.parametrize("batch", [1, 3])
def test_seqmodel_chunked_prefill_and_decode_parity(batch: int) -> None:
    torch.manual_seed(8)
    spec = ModelSpec(name="s", kind="s4d", d_model=D_MODEL, n_layers=2, d_state=D_STATE, vocab_size=32)
    model = build_model(spec).eval()
    tokens = torch.randint(0, 32, (batch, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(tokens)
        cache = model.allocate_cache(batch, 24)
        last = model.prefill(tokens[:, :15], cache, chunk_len=4)
        torch.testing.assert_close(last, full[:, 14], atol=1e-5, rtol=1e-5)
        for p in range(15, 24):
            torch.testing.assert_close(model.step(tokens[:, p : p + 1], cache), full[:, p], atol=1e-5, rtol=1e-5)
    assert model.impl_used() == "torch-fft"


def test_inits() -> None:
    lin, inv = make(7, init="lin"), make(7, init="inv")
    n = torch.arange(D_STATE // 2, dtype=torch.float32)
    torch.testing.assert_close(lin.A_imag.data, (math.pi * n).expand(D_MODEL, -1))
    torch.testing.assert_close(inv.A_imag.data[0, 0], torch.tensor(D_STATE * (D_STATE - 1) / math.pi))
    closed_form = D_STATE / math.pi * (D_STATE / (2 * n + 1) - 1)  # S4D-Inv: N/π (N/(2n+1) − 1)
    torch.testing.assert_close(inv.A_imag.data, closed_form.expand(D_MODEL, -1))
    assert (inv.A_imag.data[:, 1:] < inv.A_imag.data[:, :-1]).all()  # N/π(N/(2n+1) − 1) decreases in n
    for m in (lin, inv):
        torch.testing.assert_close(-torch.exp(m.log_A_real.data), torch.full((D_MODEL, D_STATE // 2), -0.5))
        torch.testing.assert_close(
            torch.view_as_complex(m.B.data), torch.ones(D_MODEL, D_STATE // 2, dtype=torch.cfloat)
        )
        dt = torch.exp(m.log_dt.data)
        assert (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 0.1 * (1 + 1e-6)).all() and dt.max() / dt.min() > 5
    with torch.no_grad():  # different spectra give different kernels
        assert (lin.kernel(50) - inv.kernel(50)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="init"):
        S4D(D_MODEL, init="legs")
    with pytest.raises(ValueError, match="even"):
        S4D(D_MODEL, d_state=7)


def test_gradients_flow_to_every_parameter() -> None:
    m = make(8).train()
    x = torch.randn(3, 33, D_MODEL, generator=torch.Generator().manual_seed(10), requires_grad=True)
    m(x).pow(2).mean().backward()
    for name, p in [*m.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_bfloat16_runs_and_is_close_to_float32() -> None:
    m32 = make(9)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randn(3, 40, D_MODEL, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y32 = m32(x)
        cache = m16.allocate_cache(3, 40, torch.bfloat16, "cpu")
        y16 = torch.cat(
            [m16(x[:, :30].bfloat16(), cache)]
            + [m16.step(x[:, p : p + 1].bfloat16(), cache, p) for p in range(30, 40)],
            1,
        )
    assert y16.dtype == torch.bfloat16 and cache["state"].dtype == torch.float32
    assert torch.isfinite(y16.float()).all()
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 0.03, rel.item()


def test_impl_selection_and_flops() -> None:
    m = make(10)
    assert m.impl_used == "torch-fft"
    with pytest.raises(KernelUnavailable, match="fft_conv"):
        S4D(D_MODEL, d_state=D_STATE, impl="fast")
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(1, 4, D_MODEL), None, start=4)
    assert m.step_flops(10) == m.step_flops(10_000) > 0
    big = S4D(256, d_state=64)
    r = big.prefill_flops(1 << 16) / big.prefill_flops(1 << 15)
    assert 2.0 < r < 2.2  # O(L log L): a little more than doubling
