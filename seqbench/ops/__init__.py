"""Kernel registry: ``get(op, impl)`` returns ``(fn, impl_used)``.

Every op has a pure-PyTorch reference (always available, the embedded default) and, for some, a CUDA fast
path from an optional package (``pip install 'seqbench[cuda]'``). Both take the same arguments.

- ``impl="ref"``: the PyTorch reference.
- ``impl="fast"``: the CUDA kernel; raises ``KernelUnavailable`` naming the missing package. Never falls back.
- ``impl="auto"``: the fast kernel when the device is CUDA and its package imports, else the reference.
  The choice is returned as ``impl_used`` and recorded on every result row, so it is never silent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

IMPLS = ("auto", "ref", "fast")


class KernelUnavailable(RuntimeError):
    """A fast kernel was demanded but cannot run here."""


# op -> (module, function, impl label)
_REF: dict[str, tuple[str, str, str]] = {
    "attention": ("seqbench.ops.attn", "attention", "torch-sdpa"),
    "causal_conv1d": ("seqbench.ops.conv", "causal_conv1d", "torch-conv1d"),
    "causal_conv1d_update": ("seqbench.ops.conv", "causal_conv1d_update", "torch-conv1d"),
    "selective_scan": ("seqbench.ops.scan", "selective_scan", "torch-chunked"),
    "selective_state_update": ("seqbench.ops.scan", "selective_state_update", "torch"),
    "ssd": ("seqbench.ops.ssd", "ssd", "torch-ssd-chunked"),
    "fft_conv": ("seqbench.ops.fftconv", "fft_conv", "torch-fft"),
}

_FAST: dict[str, tuple[str, str, str]] = {
    "attention": ("seqbench.ops.fast", "flash_attention", "flash_attn-cuda"),
    "causal_conv1d": ("seqbench.ops.fast", "causal_conv1d", "causal_conv1d-cuda"),
    "causal_conv1d_update": ("seqbench.ops.fast", "causal_conv1d_update", "causal_conv1d-cuda"),
    "selective_scan": ("seqbench.ops.fast", "selective_scan", "mamba_ssm-cuda"),
    "selective_state_update": ("seqbench.ops.fast", "selective_state_update", "mamba_ssm-triton"),
    "ssd": ("seqbench.ops.fast", "ssd", "mamba_ssm-triton"),
}


def _load(entry: tuple[str, str, str]) -> tuple[Callable, str]:
    module, name, label = entry
    return getattr(importlib.import_module(module), name), label


def fast_available(op: str) -> str | None:
    """None when the fast kernel of ``op`` can run here, else the reason it cannot."""
    if op not in _FAST:
        return f"no fast kernel exists for '{op}'"
    from seqbench.ops import fast

    return fast.unavailable_reason(op)


def get(op: str, impl: str = "auto", device: torch.device | str = "cpu") -> tuple[Callable, str]:
    if op not in _REF:
        raise KeyError(f"unknown op '{op}'; known: {', '.join(sorted(_REF))}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got '{impl}'")
    is_cuda = torch.device(device).type == "cuda"
    if impl == "ref" or (impl == "auto" and (not is_cuda or fast_available(op) is not None)):
        return _load(_REF[op])
    reason = fast_available(op)
    if reason is None and not is_cuda:
        reason = f"fast kernels run on CUDA only, but the device is '{torch.device(device)}'"
    if reason is not None:
        raise KernelUnavailable(f"impl 'fast' for op '{op}' is not available: {reason}")
    return _load(_FAST[op])
