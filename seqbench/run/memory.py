"""Peak memory of one call as a property of the workload, not of the process's history.

``peak_call_bytes(fn, device)`` runs ``fn`` once and returns the peak, above the moment before the call, of the
bytes held by tensors the call creates.

- CUDA: the caching allocator's own counters (``max_memory_allocated`` minus ``memory_allocated`` at entry).
- CPU: a ``TorchDispatchMode`` sees every torch op of the call. The storage of a result that the op's schema
  does not mark as aliasing an argument (views, in-place and out= ops do) is new: its bytes are added to a
  running total, and a ``weakref.finalize`` on the storage takes them off again when the last tensor using it
  dies. The peak of that total is the CPU counterpart of CUDA's figure: exact bytes of live tensors, whatever
  glibc keeps mapped and whatever ran before (the RSS high-water mark, still reported as ``peak_rss_bytes``,
  depends on both). Scratch a kernel allocates and frees inside one op (a pocketfft buffer, a oneDNN
  workspace) is not a tensor and is not counted; the scratch tensors the references keep between calls
  are released before the call, so the call's own allocations of them count. The mode costs tens of µs per
  op (and about a second once per process, to set itself up), so it runs on one extra, untimed call only.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from seqbench.ops.scratch import BETWEEN_CALLS


class LiveTensorBytes(TorchDispatchMode):
    """Running total and peak of the bytes of storages created by ops inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage id -> bytes, for storages created inside the mode and alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _returns_alias(func):  # a view, an in-place or an out= op: its result is an input's storage
            return out
        for t in tree_leaves(out):
            if not _is_real(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._sizes:  # already counted (an op returning the same new storage twice)
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


@functools.cache
def _returns_alias(func) -> bool:
    """Whether the op's schema says a result aliases an argument (``Tensor(a)``, ``Tensor(a!)``)."""
    return any(r.alias_info is not None for r in func._schema.returns)


def _is_real(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


def peak_call_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of the tensors ``fn`` allocates, above those live before the call (the result is dropped).

    The scratch the references keep between calls (ops/scratch.BETWEEN_CALLS) is released first, so the call
    allocates again, and counts, the buffers it uses."""
    BETWEEN_CALLS.clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    tracker = LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak


def available_bytes(device: torch.device, limit: int | None = None) -> int | None:
    """Bytes a new allocation can still get: CUDA's free memory, or the kernel's MemAvailable (capped by
    ``limit``, e.g. memory_limit_gb). None when it cannot be told."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            free = None
    if limit is not None:
        free = limit if free is None else min(free, limit)
    return free


def prepare_tracker() -> None:
    """Pay the tracker's one-time set-up (torch imports its dispatch-mode machinery on first use, seconds on
    a loaded machine) at executor start-up, so it is not charged to the first point's timeout."""
    peak_call_bytes(lambda: torch.zeros(1) + 1, torch.device("cpu"))
