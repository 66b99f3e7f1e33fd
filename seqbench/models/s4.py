"""S4D: the diagonal structured state-space layer, with FFT prefill, chunked continuation and O(1) decode.

References: Gu, Gupta, Goel, Ré 2022, "On the Parameterization and Initialization of Diagonal State Space
Models" (S4D); Gupta, Gu, Berant 2022, "Diagonal State Spaces are as Effective as Structured State Spaces"
(DSS); Gu, Goel, Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces" (S4).

Each of the d channels is an independent single-input single-output SSM with N = d_state:
    x'(t) = A x(t) + B u(t),   y(t) = C x(t) + D u(t),   A diagonal complex.
Only N/2 modes are stored; the other N/2 are their complex conjugates, so the real output is 2·Re of the sum
over the kept half. Zero-order hold with step dt = exp(log_dt): dA = exp(dt·A), dB = (dA − 1)/A · B, giving
    h_t = dA·h_{t-1} + dB·u_t,   y_t = 2·Re(C·h_t) + D·u_t,   K[l] = 2·Re Σ_n C_n dB_n dA_n^l.
Inits: S4D-Lin A_n = −1/2 + iπn; S4D-Inv A_n = −1/2 + i(N/π)(N/(2n+1) − 1); B = 1, C ~ CN(0, 1).
The real part is kept negative as −exp(log_A_real), so every mode decays.

Blocked Vandermonde (no (h, N/2, L) tensor ever exists): write l = j·c + i with block length c ≈ √L. Then
dA^l = dA^(j·c) · dA^i, and Σ_n W_n dA_n^l is a real batched matmul per channel of the block coefficients
(L/c, N) by the in-block powers (N, c). Each power is a product of two exponentials of dt·A·l (never a chain of
l products), so rounding errors do not grow with l.
The same product, transposed and over the reversed input, gives the state a prefill leaves:
h_{l-1} = Σ_k dA^(l-1-k) dB u_k (+ dA^l h_init when continuing) — no Python loop over time.

Layer: y = K * u + D·u (``fft_conv``, O(L log L)) -> GELU -> Linear(d, 2d) -> GLU, the output layer of the S4D
reference design. There is no input projection (the block's norm feeds the SSM directly).

Precision: the SSM part (discretisation, kernel, FFT, state) is computed in float32 whatever the model dtype;
parameters are stored in the model dtype. The recurrent state is stored as the real view (b, d, N/2, 2) of a
complex (b, d, N/2) tensor, by default in float32 even for bf16 models because a bf16 state would drift over a
million decode steps; ``state_dtype=None`` keeps it in the model dtype instead (config ``state_dtype: model``),
as Mamba and Mamba-2 do, so cache bytes can be compared like for like (each row records ``cache_dtype``).
The model is time-invariant, so ``step`` reuses dA, dB between calls (recomputed whenever a parameter changes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqbench.ops import get
from seqbench.ops.fftconv import next_fast_len
from seqbench.ops.gemm import Linear

INITS = ("lin", "inv")


def s4d_imag_init(init: str, d_state: int) -> Tensor:
    """Imaginary parts of the N/2 kept eigenvalues for S4D-Lin or S4D-Inv (float32, (N/2,))."""
    n = torch.arange(d_state // 2, dtype=torch.float32)
    if init == "lin":
        return math.pi * n
    if init == "inv":
        return d_state / math.pi * (d_state / (2 * n + 1) - 1)
    raise ValueError(f"init must be one of {INITS}, got '{init}'")


def _block_len(length: int) -> int:
    """Block length c ≈ √L (a power of two in [8, 1024]) so both Vandermonde factors stay small."""
    return min(1024, max(8, 1 << math.ceil(math.log2(max(length, 1)) / 2)))


def _cexp(z: Tensor) -> Tensor:
    """exp of a complex tensor from real exp, cos and sin (vectorised; torch's complex exp on CPU is ~30x slower)."""
    mag = torch.exp(z.real)
    return torch.complex(mag * torch.cos(z.imag), mag * torch.sin(z.imag))


def _powers(dtA: Tensor, count: int, stride: int) -> Tensor:
    """exp(dtA · stride · i) for i < count, as stacked real parts (h, 2, n2, count): [:, 0] real, [:, 1] imaginary.

    With i = a·r + s and r ≈ √count, only the r + count/r anchors are exponentials; each power is then one
    complex product of two of them, so its error is a couple of ulps whatever i is. The (re, im) axis sits
    before n2 because the matmuls below contract over the stacked (re/im, n2) axis.
    """
    r = math.isqrt(max(count - 1, 0)) + 1  # ceil(sqrt(count))
    a = -(-count // r)
    idx = torch.arange(max(r, a), device=dtA.device, dtype=torch.float32) * stride
    rate_r, rate_i = dtA.real[:, None, :, None], dtA.imag[:, None, :, None]  # (h, 1, n2, 1)
    mag, ang = torch.exp(rate_r * idx[:r]), rate_i * idx[:r]  # (h, 1, n2, r)
    f_r, f_i = mag * torch.cos(ang), mag * torch.sin(ang)
    fine = torch.cat([f_r, f_i], dim=1)[:, :, :, None, :]  # (h, 2, n2, 1, r): exp(dtA·s)
    fine_rot = torch.cat([-f_i, f_r], dim=1)[:, :, :, None, :]  # (h, 2, n2, 1, r): i·exp(dtA·s)
    mag, ang = torch.exp(rate_r * (idx[:a] * r)), rate_i * (idx[:a] * r)  # (h, 1, n2, a)
    c_r, c_i = (mag * torch.cos(ang))[..., None], (mag * torch.sin(ang))[..., None]  # (h, 1, n2, a, 1)
    out = torch.addcmul(c_r * fine, c_i, fine_rot)  # (h, 2, n2, a, r): (c_r + i·c_i)·f = c_r·f + c_i·(i·f)
    return out.flatten(-2)[..., :count]  # (h, 2, n2, count)


def vandermonde(coef: Tensor, dtA: Tensor, length: int) -> Tensor:
    """out[..., h, l] = 2·Re Σ_n coef[..., h, n] · exp(dtA[h, n] · l) for l < length, blocked over l.

    coef: (h, n2) or (b, h, n2) complex; dtA: (h, n2) complex. Returns float32 (h, length) or (b, h, length).
    """
    unbatched = coef.dim() == 2
    coef = coef[None] if unbatched else coef  # (b, h, n2)
    b, h, n2 = coef.shape
    c = _block_len(length)
    nb = -(-length // c)
    v = _powers(dtA, c, 1).reshape(h, 2 * n2, c)  # (h, 2*n2, c): dA^i within a block
    p = _powers(dtA, nb, c).transpose(2, 3).contiguous()[:, :, None, :, None, :]  # (h, 2, 1, nb, 1, n2): dA^(j·c)
    k_r, k_i = 2 * coef.real.transpose(0, 1), 2 * coef.imag.transpose(0, 1)  # (h, b, n2)
    # Block coefficients w = 2·coef·dA^(j·c); Re(w·v) = w_r·v_r − w_i·v_i, so stack (w_r, −w_i) and contract
    # over (re/im, n2) in one real matmul: w_r = k_r·p_r − k_i·p_i and −w_i = −k_i·p_r − k_r·p_i.
    k1 = torch.stack([k_r, -k_i], dim=2)[:, :, None]  # (h, b, 1, 2, n2)
    k2 = torch.stack([-k_i, -k_r], dim=2)[:, :, None]  # (h, b, 1, 2, n2)
    w = torch.addcmul(p[:, 0] * k1, p[:, 1], k2)  # (h, b, nb, 2, n2)
    out = torch.bmm(w.view(h, b * nb, 2 * n2), v).view(h, b, nb * c)[..., :length]  # (h, b, length)
    return out[:, 0].contiguous() if unbatched else out.transpose(0, 1).contiguous()


def vandermonde_transpose(v: Tensor, dtA: Tensor) -> Tensor:
    """out[b, h, n] = Σ_l v[b, h, l] · exp(dtA[h, n] · l), blocked over l. v: (b, h, l) real -> (b, h, n2) complex."""
    b, h, length = v.shape
    n2 = dtA.shape[1]
    c = _block_len(length)
    nb = -(-length // c)
    powers = _powers(dtA, c, 1).reshape(h, 2 * n2, c)  # (h, 2*n2, c)
    p = _powers(dtA, nb, c).transpose(2, 3).contiguous()[:, :, None]  # (h, 2, 1, nb, n2)
    v = F.pad(v, (0, nb * c - length))  # (b, h, nb*c); zero taps add nothing
    v = v.view(b, h, nb, c).transpose(0, 1).reshape(h, b * nb, c)  # (h, b*nb, c)
    s = torch.bmm(v, powers.transpose(1, 2)).view(h, b, nb, 2, n2)  # per-block sums, (re, im) stacked
    s_r, s_i = s[..., 0, :], s[..., 1, :]  # (h, b, nb, n2)
    re = (s_r * p[:, 0] - s_i * p[:, 1]).sum(2)  # (h, b, n2)
    im = (s_r * p[:, 1] + s_i * p[:, 0]).sum(2)  # (h, b, n2)
    return torch.complex(re, im).transpose(0, 1)  # (b, h, n2)


class S4D(nn.Module):
    """Diagonal state-space mixer (S4D). forward/step/allocate_cache follow seqbench.models.base."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        init: str = "lin",
        dropout: float = 0.0,
        impl: str = "auto",
        state_dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be even and >= 2 (N/2 conjugate pairs), got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.n_modes = d_model, d_state, d_state // 2
        h, n2 = d_model, d_state // 2
        log_dt = torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # log-uniform dt
        b_init = torch.zeros(h, n2, 2)
        b_init[..., 0] = 1.0
        kw = {"device": device, "dtype": dtype}
        self.log_dt = nn.Parameter(log_dt.to(**kw))
        self.log_A_real = nn.Parameter(torch.full((h, n2), math.log(0.5)).to(**kw))  # Re A = -1/2
        self.A_imag = nn.Parameter(s4d_imag_init(init, d_state).expand(h, n2).clone().to(**kw))
        self.B = nn.Parameter(b_init.to(**kw))  # complex (h, n2) stored as (h, n2, re/im)
        self.C = nn.Parameter((torch.randn(h, n2, 2) * math.sqrt(0.5)).to(**kw))  # E|C|^2 = 1
        self.D = nn.Parameter(torch.randn(h).to(**kw))
        self.dropout = nn.Dropout(dropout)
        self.out_proj = Linear(d_model, 2 * d_model, **kw)
        self._fft_conv, self.impl_used = get("fft_conv", impl, device or "cpu")
        self.state_dtype = state_dtype  # None: the dtype allocate_cache is given (the model's)
        self._step_memo: tuple | None = None

    # --- the SSM in float32 -----------------------------------------------------------------------
    def _discretize(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ZOH: returns dt·A, dA, dB, C, all complex64 (h, n2)."""
        dt = torch.exp(self.log_dt.float())  # (h,)
        A = torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float())  # (h, n2)
        dtA = dt[:, None] * A
        dA = _cexp(dtA)
        dB = (dA - 1) / A * torch.view_as_complex(self.B.float().contiguous())
        return dtA, dA, dB, torch.view_as_complex(self.C.float().contiguous())

    def _discretized_for_step(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """_discretize(), reused across decode steps while no parameter changes (the SSM is time-invariant).

        The memo keeps the parameters' storages alive and records their version counters, so an optimizer step,
        load_state_dict or .to() is always seen. With gradients enabled it is bypassed.
        """
        if torch.is_grad_enabled():
            return self._discretize()
        params = (self.log_dt, self.log_A_real, self.A_imag, self.B, self.C)
        try:
            key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        except RuntimeError:  # parameters created under inference_mode have no version counter
            return self._discretize()
        if self._step_memo is None or self._step_memo[0] != key:
            self._step_memo = (key, [p.detach() for p in params], self._discretize())
        return self._step_memo[2]

    def kernel(self, length: int) -> Tensor:
        """The convolution kernel K[l] = 2·Re Σ_n C_n dB_n dA_n^l, float32 (h, length)."""
        dtA, _, dB, C = self._discretize()
        return vandermonde(C * dB, dtA, length)

    def _output(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        y = self.dropout(F.gelu(y)).to(dtype)  # (b, l, d)
        return F.glu(self.out_proj(y), dim=-1)  # (b, l, d)

    # --- contract ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, start: int = 0) -> Tensor:
        b, l, _ = x.shape
        if start > 0 and cache is None:
            raise ValueError("a prefill that starts after position 0 needs the cache holding the earlier state")
        dtA, dA, dB, C = self._discretize()
        # One contiguous float32 copy: pocketfft along a strided axis is ~30% slower than the copy costs.
        u = x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format).contiguous()  # (b, d, l)
        y = self._fft_conv(u, vandermonde(C * dB, dtA, l), self.D.float())  # (b, d, l)
        if cache is not None:
            buf = cache["state"][:b]  # (b, d, n2, re/im) in the state dtype
            new_state = dB * vandermonde_transpose(u.flip(-1), dtA)  # Σ_k dA^(l-1-k) dB u_k
            if start > 0:
                h0 = torch.view_as_complex(buf.to(torch.float32, copy=True))  # (b, d, n2)
                y = y + vandermonde(C * dA * h0, dtA, l)  # 2·Re Σ_n C_n dA_n^(k+1) h0_n
                new_state = new_state + _cexp(dtA * l) * h0
            buf.copy_(torch.view_as_real(new_state.detach()))
        return self._output(y.transpose(1, 2), x.dtype)

    def step(self, x: Tensor, cache: dict[str, Tensor], pos: int) -> Tensor:
        b = x.shape[0]
        _, dA, dB, C = self._discretized_for_step()
        u = x[:, 0].float()  # (b, d)
        buf = cache["state"][:b]  # (b, d, n2, re/im) in the state dtype
        state = torch.view_as_complex(buf.float())  # (b, d, n2); a float32 state is a view, updated in place
        state.mul_(dA.detach()).add_((dB * u[:, :, None]).detach())  # decode state carries no gradient
        if buf.dtype != torch.float32:
            buf.copy_(torch.view_as_real(state))  # rounded to the model dtype, as the config asked
        y = 2 * (C * state).real.sum(-1) + self.D.float() * u  # (b, d)
        return self._output(y[:, None], x.dtype)  # (b, 1, d)

    def allocate_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, Tensor]:
        """The state (b, d, N/2, re/im) in ``state_dtype`` (float32 unless set to None: then ``dtype``); its size
        does not depend on max_len."""
        state_dtype = self.state_dtype or dtype
        return {"state": torch.zeros(batch, self.d_model, self.n_modes, 2, dtype=state_dtype, device=device)}

    # --- accounting (2 FLOPs per multiply-add; elementwise activations and exps not counted) -------
    def _proj_flops(self) -> int:
        return 2 * self.out_proj.in_features * self.out_proj.out_features

    def prefill_flops(self, seq_len: int) -> int:
        """Kernel 2·d·N·L (the blocked Vandermonde matmul) + per channel three real FFTs of n = next_fast_len(2L−1)
        at 2.5·n·log2(n) each, the spectral product 6·(n/2+1), the D skip 2·L, + output projection 4·d²·L,
        + the final state left in the cache, another 2·d·N·L (the transposed Vandermonde product)."""
        h, big_n, l = self.d_model, self.d_state, seq_len
        n = next_fast_len(2 * l - 1)
        fft = 3 * 2.5 * n * math.log2(max(n, 2)) + 6 * (n // 2 + 1) + 2 * l
        return int(2 * 2 * h * big_n * l + h * fft + l * self._proj_flops())

    def step_flops(self, context_len: int) -> int:
        """Per channel and mode: h = dA·h + dB·u (10) and Re(C·h) summed (4); + D skip (3) per channel;
        + the projection. Independent of context_len."""
        return self.d_model * (7 * self.d_state + 3) + self._proj_flops()
