"""Causal multi-head / grouped-query self-attention with rotary positions and a preallocated KV cache.

References: Vaswani et al. 2017 (attention), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA).
The cache holds k and v as (b, max_len, kv_heads, head_dim) — the flash_attn layout — and every prefill
or step writes into it in place, so decode never reallocates.

``short_conv`` > 0 puts a causal depthwise convolution of that width over the input, in front of the q/k/v
projections, as in the attention baselines of Zoology (Arora et al. 2023): it hands each position its
predecessors' tokens, which attention alone learns slowly (docs/design.md §9). Its cache adds ``conv_state``
(b, d_model, width), the last inputs, the same layout as Mamba's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqbench.ops import get
from seqbench.ops.conv import fill_conv_state
from seqbench.ops.gemm import Linear


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """Rotation frequencies theta^(-i / (hd/2)), i < hd/2, in float32: (hd/2,)."""
    half = head_dim // 2
    return theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)


def rope_angles(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of position × frequency, each (1, l, 1, hd/2), shared by q and k."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (l, hd/2)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :hd/2], x[..., hd/2:]) by the angles of rope_angles. x: (b, l, h, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        short_conv: int = 0,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        self.rope_theta = rope_theta
        # A plain float32 tensor, not a buffer: model.to(bfloat16) must not round the frequencies.
        self._inv_freq = rope_inv_freq(self.head_dim, rope_theta, device)
        kw = {"device": device, "dtype": dtype}
        self.q_proj = Linear(d_model, n_heads * self.head_dim, bias=False, **kw)
        self.kv_proj = Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False, **kw)
        self.out_proj = Linear(n_heads * self.head_dim, d_model, bias=False, **kw)
        self._attn, self.impl_used = get("attention", impl, device or "cpu", dtype)
        self._attn_step, _ = get("attention_kvcache", impl, device or "cpu", dtype)
        self.conv1d = None
        if short_conv:
            self.conv1d = nn.Conv1d(d_model, d_model, short_conv, groups=d_model, padding=short_conv - 1, **kw)
            self._conv, _ = get("causal_conv1d", impl, device or "cpu", dtype)
            self._conv_update, _ = get("causal_conv1d_update", impl, device or "cpu", dtype)

    def _short_conv(self, x: Tensor, cache: dict[str, Tensor] | None, start: int) -> Tensor:
        """x (b, l, d) -> the causal short convolution of x (b, l, d); advances the cache's conv_state."""
        if self.conv1d is None:
            return x
        xc = x.transpose(1, 2)  # (b, d, l)
        state = cache["conv_state"][: x.shape[0]] if cache is not None else None
        y = self._conv(xc, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                       initial_state=state if start > 0 else None)  # (b, d, l)
        if state is not None:
            if start == 0:
                state.zero_()  # positions before 0 are zeros, as in the convolution's padding
            fill_conv_state(state, xc)
        return y.transpose(1, 2)

    def _qkv(self, x: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim)  # (b, l, h, hd)
        k, v = self.kv_proj(x).view(b, l, 2, self.n_kv_heads, self.head_dim).unbind(2)  # (b, l, kvh, hd)
        # A position tensor (a decode step under a CUDA graph) stays on the device: no host read, static shapes.
        positions = start if isinstance(start, Tensor) else torch.arange(start, start + l, device=x.device)
        cos, sin = rope_angles(positions, self._inv_freq.to(x.device))
        return rope(q, cos, sin), rope(k, cos, sin), v

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, start: int = 0) -> Tensor:
        b, l, _ = x.shape
        if start > 0 and cache is None:
            raise ValueError("a prefill that starts after position 0 needs the cache of the earlier positions")
        q, k, v = self._qkv(self._short_conv(x, cache, start), start)
        if cache is not None:
            cache["k"][:b, start : start + l] = k
            cache["v"][:b, start : start + l] = v
            if start > 0:  # chunked prefill: attend over everything cached so far
                k, v = cache["k"][:b, : start + l], cache["v"][:b, : start + l]
        y = self._attn(q, k, v, causal=True)  # (b, l, h, hd)
        return self.out_proj(y.reshape(b, l, self.d_model))

    def step(self, x: Tensor, cache: dict[str, Tensor], pos: int | Tensor) -> Tensor:
        """One token at position ``pos`` (an int, or a (1,) device tensor for a captured CUDA graph); k and v are
        appended to the cache in place by the same kernel that attends (flash_attn_with_kvcache on the fast path)."""
        b = x.shape[0]
        if self.conv1d is not None:
            x = self._conv_update(x[:, 0], cache["conv_state"][:b], self.conv1d.weight.squeeze(1),
                                  self.conv1d.bias)[:, None]  # (b, 1, d)
        q, k, v = self._qkv(x, pos)  # (b, 1, *, hd)
        y = self._attn_step(q, cache["k"][:b], cache["v"][:b], k, v, pos)  # (b, 1, h, hd)
        return self.out_proj(y.reshape(b, 1, self.d_model))

    def allocate_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, Tensor]:
        shape = (batch, max_len, self.n_kv_heads, self.head_dim)
        cache = {name: torch.zeros(shape, dtype=dtype, device=device) for name in ("k", "v")}
        if self.conv1d is not None:
            cache["conv_state"] = torch.zeros(batch, self.d_model, self.conv1d.kernel_size[0], dtype=dtype,
                                              device=device)
        return cache

    def _proj_flops(self) -> int:
        """Per token: the projections, and the short convolution (2 d w) when there is one."""
        conv = 2 * self.d_model * self.conv1d.kernel_size[0] if self.conv1d is not None else 0
        return conv + 2 * sum(m.in_features * m.out_features for m in (self.q_proj, self.kv_proj, self.out_proj))

    def prefill_flops(self, seq_len: int) -> int:
        # QK^T and AV over the causal triangle: token i attends to i+1 keys -> l(l+1)/2 pairs, 2 matmuls.
        pairs = seq_len * (seq_len + 1) // 2
        return seq_len * self._proj_flops() + 2 * 2 * pairs * self.n_heads * self.head_dim

    def step_flops(self, context_len: int) -> int:
        return self._proj_flops() + 2 * 2 * (context_len + 1) * self.n_heads * self.head_dim
