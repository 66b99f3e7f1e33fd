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


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """flash_attn_func: q (b, l, h, hd), k/v (b, s, kvh, hd); causal mask aligned bottom-right; fp16/bf16 only."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attn runs in float16/bfloat16 only, got {q.dtype}; use impl='ref' for {q.dtype}")
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=causal)


def _channel_last(t: Tensor) -> Tensor:
    """(b, d, l) with stride 1 along d, the layout causal_conv1d needs for initial states."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
) -> Tensor:
    """causal_conv1d_fn; initial_state (b, d, >= w-1) is passed as its last w-1 columns, channel-last."""
    from causal_conv1d import causal_conv1d_fn

    if initial_state is None:
        return causal_conv1d_fn(x, weight, bias, activation=activation)
    w = weight.shape[-1]
    init = _channel_last(initial_state[..., initial_state.shape[-1] - (w - 1) :].to(x.dtype))
    return causal_conv1d_fn(_channel_last(x), weight, bias, initial_states=init, activation=activation)


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
