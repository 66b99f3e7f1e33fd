"""Lazy adapters to the CUDA kernels of flash_attn (Dao 2023, "FlashAttention-2"), causal_conv1d and mamba_ssm
(Gu & Dao 2023, "Mamba"; Dao & Gu 2024, "Transformers are SSMs"), with the signatures of seqbench's references.

Nothing here imports an optional package at module import: each adapter imports its kernel when called, and
``unavailable_reason(op)`` says why an op cannot run (missing package first, since that is the fix a user can
apply, then a missing CUDA device). Where a kernel cannot honour an argument of the reference signature, the
adapter raises ``ValueError`` naming the argument instead of computing something else.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

import torch
from torch import Tensor

INSTALL_HINT = "pip install 'seqbench[cuda]'"

# op -> (distribution / top-level module, module holding the kernel)
_KERNEL_MODULES: dict[str, tuple[str, str]] = {
    "attention": ("flash_attn", "flash_attn"),
    "attention_kvcache": ("flash_attn", "flash_attn"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d"),
    "selective_scan": ("mamba_ssm", "mamba_ssm.ops.selective_scan_interface"),
    "selective_state_update": ("mamba_ssm", "mamba_ssm.ops.triton.selective_state_update"),
    "ssd": ("mamba_ssm", "mamba_ssm.ops.triton.ssd_combined"),
}


@cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install raises more than ImportError (e.g. CUDA symbol errors)
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason(op: str) -> str | None:
    """None when the CUDA kernel of ``op`` can run here, else a message saying why not and how to fix it."""
    if op not in _KERNEL_MODULES:
        return f"no fast kernel exists for '{op}'"
    package, module = _KERNEL_MODULES[op]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    error = _import_error(module)
    if error is not None:
        return f"{package} is installed but {module} failed to import ({error}); reinstall with {INSTALL_HINT}"
    return None


def _half_only(q: Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attn runs in float16/bfloat16 only, got {q.dtype}; use impl='ref' for {q.dtype}")


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """flash_attn_func: q (b, l, h, hd), k/v (b, s, kvh, hd); causal mask aligned bottom-right; fp16/bf16 only."""
    _half_only(q)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=causal)


def flash_attention_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, pos: int | Tensor
) -> Tensor:
    """flash_attn_with_kvcache: appends k/v (b, 1, kvh, hd) at ``pos`` in place and attends over 0..pos in one
    kernel (splitting the keys across blocks for one-token queries). ``pos`` is an int or a device tensor, which
    becomes cache_seqlens (b,) int32, the form a captured CUDA graph can replay."""
    _half_only(q)
    from flash_attn import flash_attn_with_kvcache

    seqlens = pos if isinstance(pos, int) else pos.to(torch.int32).expand(q.shape[0]).contiguous()
    return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True)


def _conv_layout(x: Tensor, channel_last: bool) -> Tensor:
    """x (b, d, l) in a layout causal_conv1d's C++ entry point accepts: contiguous (b, d, l), or channel-last
    (stride 1 along d) with stride(0) and stride(2) multiples of 8 (which needs d % 8 == 0)."""
    if not channel_last:
        return x.contiguous()
    if x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0:
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
) -> Tensor:
    """causal_conv1d_fn. Without an initial state x goes in as contiguous (b, d, l); with one, the kernel
    accepts only the channel-last layout, which needs d % 8 == 0, and takes the state's last w-1 columns."""
    from causal_conv1d import causal_conv1d_fn

    if initial_state is None:
        return causal_conv1d_fn(_conv_layout(x, False), weight, bias, activation=activation)
    if x.shape[1] % 8:
        raise ValueError(
            f"causal_conv1d takes an initial state only in the channel-last layout, which needs channels % 8 == 0 "
            f"(got {x.shape[1]}); use impl='ref' (torch-conv1d) for a prefill that continues a cached state"
        )
    w = weight.shape[-1]
    init = _conv_layout(initial_state[..., initial_state.shape[-1] - (w - 1) :].to(x.dtype), True)
    return causal_conv1d_fn(_conv_layout(x, True), weight, bias, initial_states=init, activation=activation)


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """causal_conv1d's update kernel: x (b, d); conv_state (b, d, w) shifted in place."""
    from causal_conv1d import causal_conv1d_update as update

    return update(x, conv_state, weight, bias, activation)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's selective_scan_fn (CUDA). It always starts from a zero state."""
    if initial_state is not None:
        raise ValueError(
            "mamba_ssm's selective_scan_fn cannot start from an initial state, so a prefill that continues a "
            "cached state (start > 0) cannot use it; use impl='ref' (torch-chunked) for chunked prefill"
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus, return_last_state=return_final_state
    )


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """mamba_ssm's Triton selective_state_update (Mamba-1 and multi-head Mamba-2 layouts); state updated in place."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as update

    return update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


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
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's mamba_chunk_scan_combined (Triton SSD): x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=dt_softplus, return_final_states=return_final_states,
    )
