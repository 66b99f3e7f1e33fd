"""Kernel registry: ``get(op, impl, device, dtype)`` returns ``(fn, impl_used)``.

Every op has a pure-PyTorch reference (always available, the embedded default) and, for some, a CUDA fast
path from an optional package (``pip install 'seqbench[cuda]'``). Both take the same arguments.

- ``impl="ref"``: the PyTorch reference.
- ``impl="fast"``: the CUDA kernel; raises ``KernelUnavailable`` naming the reason. Never falls back.
- ``impl="auto"``: the fast kernel when it can run here (CUDA device, package importable, dtype supported),
  else the reference. The choice is returned as ``impl_used`` and recorded on every result row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

IMPLS = ("auto", "ref", "fast")


def tracks_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors (the references take a cheaper in-place path
    when it would not)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class KernelUnavailable(RuntimeError):
    """A fast kernel was demanded but cannot run here."""


# op -> (module, function, impl label)
_REF: dict[str, tuple[str, str, str]] = {
    "attention": ("seqbench.ops.attn", "attention", "torch-sdpa"),
    "attention_kvcache": ("seqbench.ops.attn", "attention_kvcache", "torch-sdpa"),
    "causal_conv1d": ("seqbench.ops.conv", "causal_conv1d", "torch-conv1d"),
    "causal_conv1d_update": ("seqbench.ops.conv", "causal_conv1d_update", "torch-conv1d"),
    "selective_scan": ("seqbench.ops.scan", "selective_scan", "torch-chunked"),
    "selective_state_update": ("seqbench.ops.state_update", "selective_state_update", "torch"),
    "ssd": ("seqbench.ops.ssd", "ssd", "torch-ssd-chunked"),
    "fft_conv": ("seqbench.ops.fftconv", "fft_conv", "torch-fft"),
}

REF_LABELS = {op: label for op, (_, _, label) in _REF.items()}  # op -> the reference's impl label

_FAST: dict[str, tuple[str, str, str]] = {
    "attention": ("seqbench.ops.fast", "flash_attention", "flash_attn-cuda"),
    "attention_kvcache": ("seqbench.ops.fast", "flash_attention_kvcache", "flash_attn-cuda"),
    "causal_conv1d": ("seqbench.ops.fast", "causal_conv1d", "causal_conv1d-cuda"),
    "causal_conv1d_update": ("seqbench.ops.fast", "causal_conv1d_update", "causal_conv1d-cuda"),
    "selective_scan": ("seqbench.ops.fast", "selective_scan", "mamba_ssm-cuda"),
    "selective_state_update": ("seqbench.ops.fast", "selective_state_update", "mamba_ssm-triton"),
    "ssd": ("seqbench.ops.fast", "ssd", "mamba_ssm-triton"),
}

# flash_attn computes in half precision only; float32 (the default dtype) would be an error on every row.
HALF_ONLY = {"attention", "attention_kvcache"}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _load(entry: tuple[str, str, str]) -> tuple[Callable, str]:
    module, name, label = entry
    return getattr(importlib.import_module(module), name), label


def fast_available(op: str) -> str | None:
    """None when the fast kernel of ``op`` can run on this machine, else the reason it cannot."""
    if op not in _FAST:
        return f"no fast kernel exists for '{op}'"
    from seqbench.ops import fast

    return fast.unavailable_reason(op)


def fast_unusable(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
    """None when the fast kernel of ``op`` can run on ``device`` in ``dtype``, else why not."""
    reason = fast_available(op)
    if reason is None and torch.device(device).type != "cuda":
        reason = f"fast kernels run on CUDA only, but the device is '{torch.device(device)}'"
    if reason is None and op in HALF_ONLY and dtype is not None and dtype not in HALF_DTYPES:
        reason = f"flash_attn runs in float16/bfloat16 only, not {str(dtype).removeprefix('torch.')}"
    return reason


def get(
    op: str, impl: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Callable, str]:
    if op not in _REF:
        raise KeyError(f"unknown op '{op}'; known: {', '.join(sorted(_REF))}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got '{impl}'")
    if impl == "ref":
        return _load(_REF[op])
    reason = fast_unusable(op, device, dtype)
    if reason is None:
        return _load(_FAST[op])
    if impl == "auto":
        return _load(_REF[op])
    raise KernelUnavailable(f"impl 'fast' for op '{op}' is not available: {reason}")
