"""The ``slurm`` executor: the grid as one SLURM job array, submitted through submitit.

Each array task takes one series (model, workload, batch), or one model with ``slurm.array_by: model``, and
measures its points in ascending length in one process: the model is built once, and the sweep's rule holds
inside the task (after an OOM or a timeout the longer lengths of the series become skipped rows). A task
appends every row to ``<run>/slurm/rows-<stamp>/<i>.jsonl`` as soon as it has it; the driver moves new lines
into points.jsonl as they appear, so progress is per point and nothing measured is lost if the job dies.
The run folder must therefore be on a filesystem the nodes share (submitit needs that for its own files).
When a task ends without rows for all of its points, the point it was on gets a row from the job's state
(``oom_killed``, ``timeout``, ``error: node lost``, ...) and the points after it say they were not measured.

Resources: ``cpus_per_task`` defaults to ``threads``; on CPU a task has its node to itself unless
``slurm.exclusive: false`` (two points sharing a node would each run slower); on CUDA it asks for one GPU.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from seqbench.config import Experiment
from seqbench.run.executors import InlineExecutor
from seqbench.run.point import SKIP_AFTER, SKIPPED_BECAUSE, PointSpec, base_row

POLL_S = {"slurm": 10.0, "local": 1.0}  # squeue/sacct are not to be hammered
JOB_STATES = {  # SLURM's end state of a task that left points without rows -> (status, error)
    "OUT_OF_MEMORY": ("oom_killed", "SLURM killed the job: it exceeded its memory (slurm.mem_gb)"),
    "NODE_FAIL": ("error", "node lost: the job's node failed"),
    "TIMEOUT": ("timeout", "the job reached its wall-clock limit (slurm.time_min)"),
}


def run_chunk(specs: list[PointSpec], rows_path: str) -> int:
    """An array task: measure specs in order, appending each row to rows_path; returns the number of rows."""
    import torch

    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
    threads = specs[0].exp.threads or cpus
    if threads:
        torch.set_num_threads(threads)
    executor = InlineExecutor()
    failed: dict[tuple[str, str, int], str] = {}
    with open(rows_path, "a") as f:
        for spec in specs:
            series = (spec.model, spec.workload, spec.batch)
            if series in failed:
                row = base_row(spec, SKIP_AFTER[failed[series]], SKIPPED_BECAUSE)
            else:
                row = executor.run(spec)
                if row["status"] in SKIP_AFTER:
                    failed[series] = row["status"]
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return len(specs)


def submitit_parameters(exp: Experiment, device: str) -> dict:
    """The ``slurm:`` block as submitit's AutoExecutor parameters (unset ones left to the cluster)."""
    s = exp.slurm
    gpus = s.gpus_per_task if s.gpus_per_task is not None else int(device.startswith("cuda"))
    exclusive = s.exclusive if s.exclusive is not None else gpus == 0
    params = {
        "name": f"seqbench-{exp.name}", "timeout_min": s.time_min, "cpus_per_task": s.cpus_per_task or exp.threads,
        "gpus_per_node": gpus or None, "mem_gb": s.mem_gb, "slurm_partition": s.partition,
        "slurm_account": s.account, "slurm_qos": s.qos, "slurm_constraint": s.constraint,
        "slurm_exclusive": exclusive or None, "slurm_array_parallelism": s.array_parallelism,
        "slurm_setup": s.setup or None, "slurm_additional_parameters": s.additional or None,
    }
    return {k: v for k, v in params.items() if v is not None}


@dataclass
class _Chunk:
    job: object  # submitit.Job
    specs: list[PointSpec]
    rows_path: Path
    offset: int = 0  # bytes of rows_path already read
    landed: set = field(default_factory=set)


def _key(spec_or_row) -> tuple:
    if isinstance(spec_or_row, dict):
        return spec_or_row["model"], spec_or_row["workload"], spec_or_row["batch"], spec_or_row["seq_len"]
    return spec_or_row.model, spec_or_row.workload, spec_or_row.batch, spec_or_row.seq_len


class SlurmExecutor:
    def __init__(self, exp: Experiment, device: str, run_dir: Path) -> None:
        import submitit

        folder = Path(run_dir).resolve() / "slurm"
        self._rows_dir = folder / f"rows-{time.strftime('%Y%m%dT%H%M%S')}"
        self._rows_dir.mkdir(parents=True, exist_ok=True)
        s = exp.slurm
        self._executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
        self._executor.update_parameters(**submitit_parameters(exp, device))
        self._array_by = s.array_by
        self._poll_s = POLL_S[s.cluster]
        self._pending: list[PointSpec] = []
        self._chunks: list[_Chunk] = []

    def has_slot(self) -> bool:
        return True  # the whole grid goes out as one array; SLURM queues what cannot run yet

    def submit(self, spec: PointSpec) -> None:
        self._pending.append(spec)

    def wait(self) -> list[dict]:
        if self._pending:
            self._submit_array()
        time.sleep(self._poll_s)
        rows: list[dict] = []
        for chunk in list(self._chunks):
            finished = chunk.job.done()  # before reading: rows written before the end are all on disk then
            rows += self._new_rows(chunk)
            if finished:
                rows += self._rows_for_the_rest(chunk)
            if finished or len(chunk.landed) == len(chunk.specs):  # a task with all its rows is left to exit
                self._chunks.remove(chunk)
        return rows

    def close(self) -> None:
        """Cancel the tasks that still owe rows (Ctrl-C); those that delivered all of theirs are left alone."""
        for chunk in self._chunks:
            chunk.job.cancel(check=False)
        self._chunks.clear()

    def _submit_array(self) -> None:
        groups: dict[tuple, list[PointSpec]] = {}
        for spec in self._pending:  # submitted in grid order, so each group's lengths ascend
            key = (spec.model,) if self._array_by == "model" else (spec.model, spec.workload, spec.batch)
            groups.setdefault(key, []).append(spec)
        chunks = list(groups.values())
        paths = [self._rows_dir / f"{i}.jsonl" for i in range(len(chunks))]
        jobs = self._executor.map_array(run_chunk, chunks, [str(p) for p in paths])
        self._chunks += [_Chunk(job, specs, path) for job, specs, path in zip(jobs, chunks, paths, strict=True)]
        self._pending = []

    @staticmethod
    def _new_rows(chunk: _Chunk) -> list[dict]:
        if not chunk.rows_path.exists():
            return []
        with open(chunk.rows_path, "rb") as f:
            f.seek(chunk.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        chunk.offset += len(complete)
        rows = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
        chunk.landed.update(_key(r) for r in rows)
        return rows

    @staticmethod
    def _rows_for_the_rest(chunk: _Chunk) -> list[dict]:
        missing = [s for s in chunk.specs if _key(s) not in chunk.landed]
        if not missing:
            return []
        state = str(getattr(chunk.job, "state", "UNKNOWN")).split()[0]
        try:
            chunk.job.result()
            reason = "the job ended without measuring it"
        except Exception as e:  # noqa: BLE001 - any way the job failed is recorded on its points
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        status, error = JOB_STATES.get(state, ("error", f"job {chunk.job.job_id} ended ({state}): {reason}"))
        first = missing[0]
        rows = [base_row(first, status, error)]
        for spec in missing[1:]:
            if (spec.model, spec.workload, spec.batch) == (first.model, first.workload, first.batch) \
                    and status in SKIP_AFTER:
                rows.append(base_row(spec, SKIP_AFTER[status], SKIPPED_BECAUSE))
            else:
                rows.append(base_row(spec, "error", f"not measured: job {chunk.job.job_id} ended ({state}) first"))
        return rows
