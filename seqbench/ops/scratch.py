"""Scratch buffers reused instead of allocated: on a CPU a fresh tensor of many MiB costs a page fault per
4 KiB on its first write (ops/blockwise.py), often more than the arithmetic that fills it."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Scratch:
    """Named flat buffers, each grown to the largest size asked of it. A view returned by ``get`` is valid
    until the next ``get`` of the same name: callers fill it, use it and drop it before asking again."""

    def __init__(self, like: Tensor | None = None):
        self.like, self.flat = like, {}

    def get(self, name: str, *shape: int, like: Tensor | None = None) -> Tensor:
        """A (shape) view of buffer ``name``, in the dtype and on the device of ``like`` (or the constructor's)."""
        like = self.like if like is None else like
        key, n = (name, like.device, like.dtype), math.prod(shape)
        if key not in self.flat or self.flat[key].numel() < n:
            with torch.inference_mode(False):  # a normal tensor: writable both in and outside inference mode
                self.flat[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return self.flat[key][:n].view(shape)

    def clear(self) -> None:
        """Release every buffer (the next ``get`` of each allocates it again)."""
        self.flat.clear()


# Kept for the life of the process, for transients of the references that never leave the call that asked
# for them (calls run one at a time, one thread per process). run/memory.peak_call_bytes releases them
# before a measured call, so that call's peak counts them.
BETWEEN_CALLS = Scratch()
