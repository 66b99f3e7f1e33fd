"""One grid point: a picklable ``PointSpec`` and ``run_point(spec) -> row``, the only code that measures.

Executors (inline, process, and later cluster engines) call ``run_point`` and never touch measurement code.
Failures are data: an allocator failure becomes ``status: oom``, an exhausted time budget ``timeout``, any
other exception ``error``, each with its message in ``error``.
"""

from __future__ import annotations

import math
import resource
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch

from seqbench.config import Experiment, ModelSpec
from seqbench.models import DTYPES, build_model
from seqbench.models.base import SeqModel
from seqbench.run.measure import Clock, PeakMemory, PointTimeout, TimingPolicy, sample, summarize, warm_up
from seqbench.run.memory import available_bytes, peak_call_bytes
from seqbench.run.workloads import WORKLOADS

STATUSES = ("ok", "oom", "oom_killed", "timeout", "error", "skipped_after_oom", "skipped_after_timeout")
# after one of these, the longer lengths of the same (model, workload, batch) series are not measured
SKIP_AFTER = {"oom": "skipped_after_oom", "oom_killed": "skipped_after_oom", "timeout": "skipped_after_timeout"}
SKIPPED_BECAUSE = "a shorter length of this series failed"

MEASUREMENT_COLUMNS = (  # docs/design.md column order, then the extras
    "n_samples", "first_call_s", "time_median_s", "time_p25_s", "time_p75_s", "time_min_s", "iqr_ratio", "noisy",
    "tokens_per_s", "latency_per_token_s", "cache_bytes", "peak_mem_bytes", "param_count", "param_bytes",
    "flops_per_token", "achieved_flops_per_s", "achieved_bytes_per_s",
    "time_p90_s", "latency_p90_s", "param_count_non_embedding", "frac_peak_flops", "frac_peak_bytes",
    "peak_rss_bytes", "cache_dtype", "remeasure_rounds", "cuda_graph", "peak_reserved_bytes",
)
COLUMNS = (
    "run_id", "model", "kind", "layout", "impl_used", "device", "dtype", "threads", "workload", "batch", "seq_len",
    "new_tokens", "status", "error", *MEASUREMENT_COLUMNS, "host",
)


@dataclass(frozen=True)
class PointSpec:
    """Everything a worker needs to measure one point; plain data, so it pickles to another process or host."""

    run_id: str
    experiment: dict  # Experiment.model_dump()
    model: str
    workload: str
    batch: int
    seq_len: int
    device: str
    calibration: dict | None = None
    n_pairs: int | None = None  # recall probes only (seqbench/probes): key-value pairs per sequence

    @cached_property
    def exp(self) -> Experiment:
        """The validated experiment, parsed once per spec (and once more in a worker after unpickling)."""
        return Experiment.model_validate(self.experiment)

    @property
    def model_spec(self) -> ModelSpec:
        return next(m for m in self.exp.models if m.name == self.model)

    @property
    def is_probe(self) -> bool:
        return self.n_pairs is not None

    @property
    def timeout_s(self) -> float:
        return self.exp.probes.timeout_s if self.is_probe else self.exp.measure.timeout_s


def base_row(spec: PointSpec, status: str, error: str | None = None) -> dict:
    exp, m = spec.exp, spec.model_spec
    row = {c: None for c in COLUMNS}
    layout = m.layout if isinstance(m.layout, str) or m.layout is None else ",".join(m.layout)
    row.update(
        run_id=spec.run_id, model=m.name, kind=m.kind, layout=layout, device=spec.device, dtype=exp.dtype,
        threads=torch.get_num_threads(), workload=spec.workload, batch=spec.batch, seq_len=spec.seq_len,
        new_tokens=exp.sweep.new_tokens if spec.workload == "decode" else None, status=status, error=error,
        host=socket.gethostname(),
    )
    if spec.is_probe:
        row["n_pairs"] = spec.n_pairs
    return row


class ParamsExceedMemory(MemoryError):
    """The parameters alone need more memory than the device has free: the model is not built."""


def build(spec: PointSpec) -> SeqModel:
    """Build the point's model; first check, on the meta device (no memory), that its parameters fit."""
    dtype = DTYPES[spec.exp.dtype]
    need = build_model(spec.model_spec.model_copy(update={"impl": "ref"}), device="meta", dtype=dtype).param_bytes()
    limit = spec.exp.measure.memory_limit_gb
    free = available_bytes(torch.device(spec.device), None if limit is None else int(limit * 2**30))
    if free is not None and need > free:
        raise ParamsExceedMemory(f"the parameters alone need {need:,} bytes; {free:,} bytes are available")
    torch.manual_seed(spec.exp.seed)  # every model gets the same seed, whatever the order it is built in
    return build_model(spec.model_spec, device=spec.device, dtype=dtype)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


@contextmanager
def memory_cap(limit_gb: float | None):
    """Cap this process's address space at (current size + limit) so an over-large point fails like an OOM.

    Used to make OOM behaviour testable on a machine with plenty of RAM; restored afterwards (inline mode).
    """
    if limit_gb is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + int(limit_gb * 2**30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def alarm(timeout_s: float):
    """Raise PointTimeout in the main thread after timeout_s (between torch ops; inline mode's hard stop)."""

    def _raise(signum, frame):
        raise PointTimeout(f"point exceeded timeout_s={timeout_s:g}")

    try:
        previous = signal.signal(signal.SIGALRM, _raise)
    except ValueError:  # not the main thread: rely on the deadline checks alone
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_point(spec: PointSpec, models: dict[str, SeqModel] | None = None) -> dict:
    """Measure one point and return its row. Never raises for a failure of the point itself.

    Building the model counts against the point's timeout. ``models`` (inline executor) keeps built models by
    name so the next length of the same model reuses them. A recall probe (``spec.is_probe``) never uses
    them: it trains a fresh model from the seed."""
    exp = spec.exp
    ms = exp.measure
    t_start = time.monotonic()
    try:
        with memory_cap(ms.memory_limit_gb), alarm(spec.timeout_s):
            if spec.is_probe:
                from seqbench.probes.points import run_probe

                row = base_row(spec, "ok")
                row.update(run_probe(spec, deadline=t_start + spec.timeout_s))
                return row
            model = None if models is None else models.get(spec.model)
            if model is None:
                model = build(spec)
                if models is not None:
                    models[spec.model] = model
            return _measure(spec, exp, model, deadline=t_start + ms.timeout_s)
    except (PointTimeout, TimeoutError) as e:  # TimeoutError: a recall probe's training deadline
        return base_row(spec, "timeout", str(e))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        first_line = (str(e).splitlines() or [""])[0][:300]  # MemoryError() has no message at all
        return base_row(spec, "oom" if is_oom(e) else "error", f"{type(e).__name__}: {first_line}")
    finally:
        if torch.device(spec.device).type == "cuda":
            torch.cuda.empty_cache()


def _measure(spec: PointSpec, exp: Experiment, model: SeqModel, deadline: float) -> dict:
    device = torch.device(spec.device)
    ms = exp.measure
    clock = Clock(device)
    # decode on CUDA replays one captured step unless measure.cuda_graph is off ("on" without CUDA is refused
    # before the sweep)
    graphed = spec.workload == "decode" and device.type == "cuda" and ms.cuda_graph != "off"
    opts = {"prefill_chunk": ms.prefill_chunk, "cuda_graph": graphed}
    with PeakMemory(device) as rss:
        workload = WORKLOADS[spec.workload](model, spec.batch, spec.seq_len, device, exp.seed, **opts)
        if workload.per_step:
            # decode: exclude the untimed prefill's transient; the cache stays counted (allocated above baseline)
            rss.reset_peak()
            policy = TimingPolicy(ms.warmup, exp.sweep.new_tokens, exp.sweep.new_tokens, 0.0)
        else:
            policy = TimingPolicy(ms.warmup, ms.min_samples, ms.max_samples, ms.min_time_s)
        first_call_s = warm_up(workload.call, clock, policy.warmup, deadline)
        if policy.warmup == 0:
            workload.call()  # one-time set-up of a first call (e.g. S4D's step memo) is not the workload's peak
        # One extra, untimed call under the live-tensor tracker: the workload's peak. The cache was allocated
        # before the call and stays live through it, so it is added back.
        held = workload.cache.nbytes() if workload.cache is not None else 0
        peak_mem_bytes = held + peak_call_bytes(workload.call, device)
        samples = sample(workload.call, clock, policy, deadline)
    stats = summarize(samples)
    row = base_row(spec, "ok")
    row.update(stats.as_row())
    t = stats.time_median_s
    cal = spec.calibration or {}
    flops_per_s = workload.flops_per_call / t
    bytes_per_s = workload.bytes_per_call / t if workload.bytes_per_call is not None else None
    row.update(
        impl_used=model.impl_used(),
        first_call_s=first_call_s,
        tokens_per_s=workload.tokens_per_call / t,
        latency_per_token_s=t if workload.per_step else None,
        latency_p90_s=stats.time_p90_s if workload.per_step else None,
        cache_bytes=workload.cache_bytes,
        cache_dtype=workload.cache.dtype_label() if workload.cache is not None else None,
        peak_mem_bytes=peak_mem_bytes,
        peak_rss_bytes=rss.peak_bytes,
        peak_reserved_bytes=rss.reserved_bytes,
        cuda_graph=graphed,
        param_count=model.num_params(),
        param_count_non_embedding=model.num_params(non_embedding=True),
        param_bytes=model.param_bytes(),
        flops_per_token=workload.flops_per_call / workload.tokens_per_call,
        achieved_flops_per_s=flops_per_s,
        achieved_bytes_per_s=bytes_per_s,
        frac_peak_flops=flops_per_s / cal["peak_flops_per_s"] if cal.get("peak_flops_per_s") else None,
        frac_peak_bytes=bytes_per_s / cal["peak_bytes_per_s"] if cal.get("peak_bytes_per_s") and bytes_per_s else None,
        remeasure_rounds=0,
    )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
