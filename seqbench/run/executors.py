"""Executors take PointSpecs and hand back rows. ``inline`` measures in this process (fast; models are
built once and reused across lengths); ``process`` measures each point in a spawned worker in its own
process group, so a crash, a kernel OOM kill or a hang costs one point, not the sweep. ``ray`` and
``slurm`` (their own modules, imported by the sweep only when chosen) run points on other machines.

Every executor has the same four methods, so the sweep drives them all with one loop:
``has_slot()`` (may another point be submitted now?), ``submit(spec)``, ``wait()`` (block until rows land,
or a poll interval passes; return the rows that landed, in any order) and ``close()`` (cancel whatever is
still in flight). inline and process have one slot and measure inside ``wait()``, so they run the grid in
order, one point at a time.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import shutil
import signal

from seqbench.config import EXECUTOR_KINDS, Experiment
from seqbench.run.memory import prepare_tracker
from seqbench.run.point import PointSpec, base_row, run_point


class SequentialExecutor:
    """One point at a time, measured when the sweep waits for it; subclasses define ``run(spec) -> row``."""

    def __init__(self) -> None:
        self._pending: PointSpec | None = None

    def has_slot(self) -> bool:
        return self._pending is None

    def submit(self, spec: PointSpec) -> None:
        self._pending = spec

    def wait(self) -> list[dict]:
        spec, self._pending = self._pending, None
        return [] if spec is None else [self.run(spec)]

    def run(self, spec: PointSpec) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        self._pending = None


class InlineExecutor(SequentialExecutor):
    def __init__(self) -> None:
        super().__init__()
        self._models: dict[str, object] = {}  # built once (inside the first point's timeout), reused across lengths
        prepare_tracker()

    def run(self, spec: PointSpec) -> dict:
        return run_point(spec, self._models)

    def close(self) -> None:
        super().close()
        self._models.clear()


def _worker(spec: PointSpec, conn) -> None:
    os.setpgrp()  # the parent kills the whole group on timeout; Ctrl-C in the terminal reaches only the parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    threads = spec.exp.threads
    if threads:
        torch.set_num_threads(threads)
    prepare_tracker()
    conn.send(("ready", None))  # the point's clock starts now: building the model is part of its time
    conn.send(("row", run_point(spec)))
    conn.close()


class ProcessExecutor(SequentialExecutor):
    """One spawned worker per point. The worker enforces timeout_s itself; the parent kills the worker's
    process group if no row arrives within timeout_s + KILL_GRACE_S. The parent never imports CUDA state."""

    STARTUP_LIMIT_S = 300.0
    KILL_GRACE_S = 5.0

    def __init__(self) -> None:
        super().__init__()
        self._ctx = mp.get_context("spawn")

    def run(self, spec: PointSpec) -> dict:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_worker, args=(spec, child_conn), daemon=True)
        proc.start()
        child_conn.close()
        timeout_s = spec.timeout_s
        try:
            row = None
            if self._receive(parent_conn, self.STARTUP_LIMIT_S) == "ready":
                if not parent_conn.poll(timeout_s + self.KILL_GRACE_S):
                    self._kill(proc)
                    return base_row(spec, "timeout", f"worker exceeded timeout_s={timeout_s:g}; killed")
                row = self._receive(parent_conn, 0)
            proc.join(10)
            if isinstance(row, dict):
                return row
            if proc.exitcode == -signal.SIGKILL:
                return base_row(spec, "oom_killed", "worker was killed by SIGKILL (the kernel's OOM killer)")
            self._kill(proc)
            return base_row(spec, "error", f"worker exited with code {proc.exitcode} without a result")
        except BaseException:
            self._kill(proc)
            raise
        finally:
            parent_conn.close()

    @staticmethod
    def _receive(conn, timeout: float):
        """'ready', a row dict, or None when the worker died or stayed silent."""
        if not conn.poll(timeout):
            return None
        try:
            kind, payload = conn.recv()
        except EOFError:
            return None
        return kind if kind == "ready" else payload

    @staticmethod
    def _kill(proc) -> None:
        if proc.is_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # not yet its own group leader
                proc.kill()
            proc.join(10)


EXECUTORS = {"inline": InlineExecutor, "process": ProcessExecutor}  # the ones on this machine


class ExecutorUnavailable(RuntimeError):
    """The cluster the experiment names cannot be reached; raised before any point is submitted."""


ENGINES = {"ray": ("ray", "seqbench[ray]"), "slurm": ("submitit", "seqbench[slurm]")}


def choose_executor(exp: Experiment, executor: str | None, address: str | None) -> str:
    """Apply ``--executor`` / ``--address`` to exp and return the executor kind; ValueError says what is wrong."""
    if executor is not None:
        if executor not in EXECUTOR_KINDS:
            raise ValueError(f"--executor must be one of {', '.join(EXECUTOR_KINDS)} (got '{executor}')")
        exp.executor = executor
    kind = exp.executor or exp.measure.isolation
    if address is not None:
        if kind != "ray":
            raise ValueError(f"--address names a Ray cluster; it needs --executor ray (the executor is {kind})")
        exp.ray.address = address
    if kind in ENGINES and importlib.util.find_spec(ENGINES[kind][0]) is None:
        raise ValueError(f"the {kind} executor needs {ENGINES[kind][0]}: pip install '{ENGINES[kind][1]}'")
    if kind == "slurm" and exp.slurm.cluster == "slurm" and shutil.which("srun") is None:
        raise ValueError("the slurm executor found no SLURM here (no srun on PATH); run it on a login node, "
                         "or set slurm: {cluster: local} to run the job array on this machine")
    return kind
