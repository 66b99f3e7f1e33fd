"""fft_conv against a direct O(L^2) causal convolution, and next_fast_len against brute force."""

from __future__ import annotations

import pytest
import torch

from seqbench.ops import get
from seqbench.ops.fftconv import fft_conv, next_fast_len


def direct_causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """y[b, h, t] = sum_{s <= t} k[h, s] u[b, h, t - s] (+ D[h] u[b, h, t]), by explicit sums (test-only)."""
    b, h, l = u.shape
    y = torch.zeros(b, h, l, dtype=torch.float64)
    u64, k64 = u.double(), k.double()
    for t in range(l):
        taps = min(t + 1, k.shape[-1])
        y[..., t] = (k64[:, :taps] * u64[..., t - torch.arange(taps)]).sum(-1)
    if D is not None:
        y = y + D.double()[:, None] * u64
    return y


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 7, 37, 64, 250])
def test_fft_conv_matches_direct(batch: int, length: int) -> None:
    g = torch.Generator().manual_seed(length * 10 + batch)
    h = 5
    u = torch.randn(batch, h, length, generator=g)
    k = torch.randn(h, length, generator=g) * torch.exp(-0.05 * torch.arange(length))
    D = torch.randn(h, generator=g)
    for d in (None, D):
        y = fft_conv(u, k, d)
        ref = direct_causal_conv(u, k, d)
        assert y.shape == (batch, h, length) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)


def test_fft_conv_float64_is_exact_and_shorter_kernel_is_zero_padded() -> None:
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)
    k = torch.randn(3, 9, generator=g, dtype=torch.float64)
    y = fft_conv(u, k)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, direct_causal_conv(u, k), atol=1e-11, rtol=1e-11)
    # A kernel longer than the input: taps beyond l cannot reach any output.
    k_long = torch.randn(3, 100, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fft_conv(u, k_long), direct_causal_conv(u, k_long[:, :40]), atol=1e-11, rtol=1e-11)


def test_fft_conv_is_causal_and_has_no_wraparound() -> None:
    # An impulse at the last position must produce nothing before it (a too-short FFT would wrap it around).
    u = torch.zeros(1, 2, 33)
    u[..., -1] = 1.0
    k = torch.ones(2, 33)
    y = fft_conv(u, k)
    assert y[..., :-1].abs().max() < 1e-5
    torch.testing.assert_close(y[..., -1], torch.ones(1, 2))


def test_fft_conv_bfloat16_keeps_dtype() -> None:
    g = torch.Generator().manual_seed(2)
    u = torch.randn(1, 4, 50, generator=g)
    k = torch.randn(4, 50, generator=g) * 0.1
    y = fft_conv(u.bfloat16(), k)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), direct_causal_conv(u.bfloat16().float(), k).float(), atol=2e-2, rtol=2e-2)


def _is_fast(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_next_fast_len_is_the_smallest_5_smooth_size() -> None:
    for n in range(1, 400):
        m = next_fast_len(n)
        assert m >= n and _is_fast(m)
        assert not any(_is_fast(j) for j in range(n, m)), n
    assert next_fast_len(2 * 65536 - 1) == 2 * 65536


def test_registry_label() -> None:
    fn, label = get("fft_conv", "auto", "cpu")
    assert fn is fft_conv and label == "torch-fft"
