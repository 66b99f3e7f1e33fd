"""Timers, sample statistics, the one-benchmark-at-a-time lock and peak-memory trackers
(docs/design.md, "What a point measures").

CPU timing uses ``time.perf_counter``; CUDA timing uses CUDA events recorded on the current stream and read
after a synchronize. Events measure the GPU's timeline, which includes the gaps while it waits for the host to
launch the next kernel: a launch-bound call (a decode step) is timed with its launch overhead, which is why
decode on CUDA replays a captured graph (run/cudagraph.py). ``PeakMemory`` is the
process view (the ``peak_rss_bytes`` column): the kernel's own high-water mark, after writing ``5`` to
``/proc/self/clear_refs`` (resets VmHWM to the current RSS), minus the baseline ``VmRSS``. It depends on what
glibc kept from earlier points; the workload's own peak (``peak_mem_bytes``) is counted in seqbench/run/memory.py.
"""

from __future__ import annotations

import fcntl
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

NOISY_IQR_RATIO = 0.10


class PointTimeout(Exception):
    """The point used up its time budget."""


# ---- statistics ---------------------------------------------------------------------------------------


def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted samples (numpy's default method)."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass
class TimingStats:
    n_samples: int
    time_median_s: float
    time_p25_s: float
    time_p75_s: float
    time_min_s: float
    time_p90_s: float
    iqr_ratio: float
    noisy: bool

    def as_row(self) -> dict:
        return asdict(self)


def summarize(samples: list[float]) -> TimingStats:
    if not samples:
        raise ValueError("no timing samples")
    xs = sorted(samples)
    med = statistics.median(xs)
    p25, p75 = quantile(xs, 0.25), quantile(xs, 0.75)
    iqr_ratio = (p75 - p25) / med if med > 0 else math.inf
    return TimingStats(len(xs), med, p25, p75, xs[0], quantile(xs, 0.90), iqr_ratio, iqr_ratio > NOISY_IQR_RATIO)


# ---- clocks -------------------------------------------------------------------------------------------


class Clock:
    """Times one call of ``fn``. CPU: perf_counter. CUDA: events around the call, synchronized before reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms -> s
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@dataclass
class TimingPolicy:
    warmup: int = 2
    min_samples: int = 10
    max_samples: int = 1000
    min_time_s: float = 0.5


def warm_up(fn: Callable[[], object], clock: Clock, calls: int, deadline: float = math.inf) -> float | None:
    """Make ``calls`` untimed calls; return the first one's time (first_call_s), or None when there are none."""
    clock.sync()
    first_call_s = None
    for i in range(calls):
        _check(deadline)
        t = clock.time(fn)
        first_call_s = t if i == 0 else first_call_s
    return first_call_s


def sample(fn: Callable[[], object], clock: Clock, policy: TimingPolicy, deadline: float = math.inf) -> list[float]:
    """Time calls until both ``min_samples`` and ``min_time_s`` are reached (or ``max_samples``).
    Raises PointTimeout past ``deadline``."""
    clock.sync()
    samples: list[float] = []
    while len(samples) < policy.max_samples and (len(samples) < policy.min_samples or sum(samples) < policy.min_time_s):
        _check(deadline)
        samples.append(clock.time(fn))
    return samples


def time_repeated(
    fn: Callable[[], object], clock: Clock, policy: TimingPolicy, deadline: float = math.inf
) -> tuple[float | None, list[float]]:
    """``policy.warmup`` untimed calls (the first one's time returned as first_call_s), then ``sample``."""
    first_call_s = warm_up(fn, clock, policy.warmup, deadline)
    return first_call_s, sample(fn, clock, policy, deadline)


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise PointTimeout("per-point time budget exhausted")


# ---- one benchmark at a time --------------------------------------------------------------------------


@contextmanager
def exclusive_machine(on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold a machine-wide lock while measuring: two sweeps at once would disturb each other's figures.

    If another seqbench sweep holds it, call ``on_wait`` and block until it is released.
    """
    path = os.path.join(tempfile.gettempdir(), f"seqbench-{os.getuid()}.lock")
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- memory -------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim) so the baseline RSS holds only live memory;
    otherwise pages freed by earlier points are reused silently and later peaks read too low."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Context manager: ``peak_bytes`` = peak memory inside the block above the memory at entry.

    CUDA: torch.cuda.reset_peak_memory_stats / max_memory_allocated (allocator-level, exact), and
    ``reserved_bytes``: the most the caching allocator held from the device meanwhile (max_memory_reserved).
    CPU (Linux): VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS at entry (page-level).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.reserved_bytes: int | None = None  # CUDA only

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            gc.collect()
            release_free_memory()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kib("VmRSS") * 1024
        return self

    def reset_peak(self) -> None:
        """Forget the peak so far but keep the baseline: what stays allocated above it still counts."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._base)
            self.reserved_bytes = torch.cuda.max_memory_reserved()
        else:
            self.peak_bytes = max(0, _proc_status_kib("VmHWM") * 1024 - self._base)
