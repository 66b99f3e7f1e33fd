"""Executors run a PointSpec and return its row. ``inline`` measures in this process (fast; models are
built once and reused across lengths); ``process`` measures each point in a spawned worker in its own
process group, so a crash, a kernel OOM kill or a hang costs one point, not the sweep. A cluster engine
(Ray, SLURM) fits beside these: it only needs ``run(spec) -> row`` and ``close()``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

from seqbench.run.memory import prepare_tracker
from seqbench.run.point import PointSpec, base_row, run_point


class InlineExecutor:
    def __init__(self) -> None:
        self._models: dict[str, object] = {}  # built once (inside the first point's timeout), reused across lengths
        prepare_tracker()

    def run(self, spec: PointSpec) -> dict:
        return run_point(spec, self._models)

    def close(self) -> None:
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


class ProcessExecutor:
    """One spawned worker per point. The worker enforces timeout_s itself; the parent kills the worker's
    process group if no row arrives within timeout_s + KILL_GRACE_S. The parent never imports CUDA state."""

    STARTUP_LIMIT_S = 300.0
    KILL_GRACE_S = 5.0

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")

    def run(self, spec: PointSpec) -> dict:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_worker, args=(spec, child_conn), daemon=True)
        proc.start()
        child_conn.close()
        timeout_s = spec.exp.measure.timeout_s
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

    def close(self) -> None:
        pass


EXECUTORS = {"inline": InlineExecutor, "process": ProcessExecutor}
