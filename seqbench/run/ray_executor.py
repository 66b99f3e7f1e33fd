"""The ``ray`` executor: one Ray task per point, placed so that measurements stay honest.

The driver is the scheduler. It keeps the list of live nodes and gives each node a fixed number of slots:
on CPU ``ray.points_per_node`` (default 1, since two points sharing a node's cores or memory bandwidth
would each run slower and both rows would be wrong), on CUDA one per GPU. A task is pinned to its node
(NodeAffinitySchedulingStrategy, soft=False) and asks for the node's CPUs divided by its slots (and one GPU
on CUDA), so Ray keeps other work off those cores too. The worker runs ``threads`` torch threads, else as
many as the CPUs it was granted; the ``threads`` column records it and ``host`` records the node.

Failures are rows, never hangs: Ray's memory monitor killing the worker is ``oom_killed``; a node that
died under its point is ``error: node lost``; a point silent past timeout_s + STARTUP_LIMIT_S is cancelled
and becomes ``timeout``. Tasks are never retried (a retried point would be measured twice without saying
so), except one that could not be placed because its node vanished before it started: it goes to another.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before ray is imported: never phone home

import ray  # noqa: E402
import torch  # noqa: E402
from ray import exceptions as rex  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from seqbench.config import Experiment  # noqa: E402
from seqbench.run.executors import ExecutorUnavailable  # noqa: E402
from seqbench.run.memory import prepare_tracker  # noqa: E402
from seqbench.run.point import PointSpec, base_row, run_point  # noqa: E402

POLL_S = 1.0  # how long one wait() blocks when nothing lands: Ctrl-C and node changes are seen this often
STARTUP_LIMIT_S = 300.0  # worker start-up and model building, on top of the point's own timeout_s


def measure_remote(spec: PointSpec, cpus: int | None) -> dict:
    """A Ray task: measure one point with the experiment's threads, else the CPUs granted."""
    threads = spec.exp.threads or cpus
    if threads:
        torch.set_num_threads(threads)
    prepare_tracker()  # its one-time set-up is not the point's time
    return run_point(spec)


@dataclass
class _Task:
    spec: PointSpec
    node_id: str
    host: str
    cpus: int
    deadline: float


class RayExecutor:
    def __init__(self, exp: Experiment, device: str) -> None:
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:  # tests (and notebooks) may have connected already
            try:
                ray.init(address=exp.ray.address, include_dashboard=False, log_to_driver=False,
                         logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = exp.ray.address or "a local instance"
                raise ExecutorUnavailable(f"Ray: cannot start or reach {where}: {str(e).strip()[:300]}") from None
        self._gpu = device.startswith("cuda")
        self._points_per_node = exp.ray.points_per_node
        self._limit_s = exp.measure.timeout_s + STARTUP_LIMIT_S
        self._remote = ray.remote(max_retries=0)(measure_remote)
        self._tasks: dict[ray.ObjectRef, _Task] = {}
        self._unplaced: list[PointSpec] = []  # their node vanished before they started
        self._nodes: list[dict] = []
        self._refresh_nodes()

    # ---- placement -----------------------------------------------------------------------------------
    def _refresh_nodes(self) -> None:
        self._nodes = [n for n in ray.nodes() if n["Alive"]]

    def _slots(self, node: dict) -> int:
        if self._gpu:
            return int(node["Resources"].get("GPU", 0))
        return self._points_per_node if node["Resources"].get("CPU", 0) >= 1 else 0

    def _free_node(self) -> dict | None:
        busy: dict[str, int] = {}
        for task in self._tasks.values():
            busy[task.node_id] = busy.get(task.node_id, 0) + 1
        for node in self._nodes:
            if busy.get(node["NodeID"], 0) < self._slots(node):
                return node
        return None

    def _place(self, spec: PointSpec, node: dict) -> None:
        cpus = int(node["Resources"].get("CPU", 0)) // self._slots(node)
        if not self._gpu:
            cpus = max(1, cpus)  # more points than cores on a node: the user asked for it
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ref = self._remote.options(num_cpus=cpus, num_gpus=1 if self._gpu else 0,
                                   scheduling_strategy=strategy).remote(spec, cpus)
        host = node.get("NodeManagerHostname") or node.get("NodeManagerAddress", "?")
        self._tasks[ref] = _Task(spec, node["NodeID"], host, cpus, time.monotonic() + self._limit_s)

    # ---- the executor interface --------------------------------------------------------------------
    def has_slot(self) -> bool:
        return not self._unplaced and self._free_node() is not None

    def submit(self, spec: PointSpec) -> None:
        node = self._free_node()
        if node is None:
            raise RuntimeError("submit() without a free slot")
        self._place(spec, node)

    def wait(self) -> list[dict]:
        rows: list[dict] = []
        if self._tasks:
            refs = list(self._tasks)
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                row = self._collect(ref, self._tasks.pop(ref))
                if row is not None:
                    rows.append(row)
            rows += self._cancel_overdue()
        else:
            time.sleep(POLL_S)  # nothing in flight: waiting for a node to join
        self._refresh_nodes()
        while self._unplaced and (node := self._free_node()) is not None:
            self._place(self._unplaced.pop(), node)
        return rows

    def close(self) -> None:
        for ref in self._tasks:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - the task may have finished or its node gone meanwhile
                pass
        self._tasks.clear()
        if self._owns_ray:
            ray.shutdown()

    # ---- failures as rows ----------------------------------------------------------------------------
    def _collect(self, ref: ray.ObjectRef, task: _Task) -> dict | None:
        """The point's row, a row for how its worker died, or None when it never started (placed again)."""
        try:
            return ray.get(ref)
        except rex.TaskUnschedulableError:
            self._unplaced.append(task.spec)
            return None
        except rex.OutOfMemoryError:
            return self._row(task, "oom_killed", "Ray's memory monitor killed the worker (the node ran out of memory)")
        except (rex.NodeDiedError, rex.LocalRayletDiedError):
            return self._row(task, "error", f"node lost: {task.host} died while measuring this point")
        except rex.WorkerCrashedError:
            self._refresh_nodes()
            if all(n["NodeID"] != task.node_id for n in self._nodes):
                return self._row(task, "error", f"node lost: {task.host} died while measuring this point")
            return self._row(task, "error", "the worker died unexpectedly (a crash, or the kernel's OOM killer)")
        except rex.RayError as e:
            first_line = (str(e).splitlines() or [""])[0][:300]
            return self._row(task, "error", f"{type(e).__name__}: {first_line}")

    def _cancel_overdue(self) -> list[dict]:
        now = time.monotonic()
        overdue = [ref for ref, task in self._tasks.items() if now > task.deadline]
        rows = []
        for ref in overdue:
            task = self._tasks.pop(ref)
            ray.cancel(ref, force=True)
            rows.append(self._row(task, "timeout", f"no result within {self._limit_s:g} s; the task was cancelled"))
        return rows

    @staticmethod
    def _row(task: _Task, status: str, error: str) -> dict:
        row = base_row(task.spec, status, error)
        row.update(host=task.host, threads=task.spec.exp.threads or task.cpus)
        return row
