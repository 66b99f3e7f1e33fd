"""Causal long convolution by FFT, the prefill path of S4 / S4D.

A state-space layer with a length-L kernel K computes y = K * u (causal, per channel). Done directly this is
O(L^2); by the convolution theorem it is O(L log L): zero-pad u and K to n >= 2L - 1 so the circular
convolution equals the linear one on the first L outputs, multiply the spectra, and transform back
(Gu, Goel, Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces", §3.3;
Gu, Gupta, Goel, Ré 2022, "On the Parameterization and Initialization of Diagonal State Space Models").

The transform length is rounded up to the next 2^a·3^b·5^c ("fast") size, which pocketFFT and cuFFT handle
with their fastest radices. Arithmetic is float32 (float64 if u is float64) whatever the input dtype: half
precision FFTs lose too much over long kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_fast_len(n: int) -> int:
    """The smallest m >= n whose only prime factors are 2, 3 and 5."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # a power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fft_conv(u: Tensor, k: Tensor, D: Tensor | None = None) -> Tensor:
    """Causal convolution y[..., t] = sum_{s<=t} k[..., s] u[..., t-s] (+ D * u[..., t]).

    u: (b, h, l) input; k: (h, lk) kernel (taps beyond l are ignored, a shorter kernel is zero beyond lk);
    D: (h,) skip connection or None. Returns y (b, h, l) in u's dtype.
    """
    l = u.shape[-1]
    k = k[..., :l]
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    n = next_fast_len(l + k.shape[-1] - 1)  # >= 2l - 1 when lk = l: no circular wrap-around into [0, l)
    u_w = u.to(work)
    k_f = torch.fft.rfft(k.to(work), n=n)  # (h, n//2 + 1)
    y_f = torch.fft.rfft(u_w, n=n)  # (b, h, n//2 + 1)
    y_f.mul_(k_f)
    y = torch.fft.irfft(y_f, n=n)[..., :l]  # (b, h, l), a view into the length-n buffer
    del y_f
    if D is not None:
        y = torch.addcmul(y, u_w, D.to(work)[:, None])  # a fresh (b, h, l) tensor; the n-buffer is released
    return y.to(u.dtype).contiguous()
