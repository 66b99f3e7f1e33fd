"""Expand the grid, run its points through an executor, and keep every row on disk as it is measured.

Order: for each workload and batch, lengths ascend; within a length the models alternate direction
(A B C, then C B A) so slow drift of the machine is not confounded with architecture. After an OOM or a
timeout, the larger lengths of that (model, workload, batch) series are recorded as skipped, never missing.
After the grid, points flagged noisy or timed only briefly are measured again, in grid order, up to
``measure.remeasure`` rounds; the faster measurement of a point is kept.
Cluster executors have many points in flight: a point is skipped if a shorter length of its series had
already failed when the point was due to be submitted; one already in flight runs and keeps its own row.

points.jsonl is append-only: a re-measured point is appended again, and the later line for a key wins
everywhere it is read (resume, results.csv, plots).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from seqbench.config import Experiment
from seqbench.models import DTYPES
from seqbench.probes.points import probe_grid
from seqbench.run.calibration import calibrate
from seqbench.run.executors import EXECUTORS
from seqbench.run.measure import exclusive_machine
from seqbench.run.point import COLUMNS, SKIP_AFTER, SKIPPED_BECAUSE, PointSpec, base_row
from seqbench.run.provenance import resolve_device, snapshot

Key = tuple  # (model, workload, batch, seq_len), and n_pairs after them for a recall probe


def describe_key(key: Key) -> str:
    """The progress label of a point; a recall probe's key ends in n_pairs (D)."""
    return f"{key[0]:>12} {key[1]:<7} b={key[2]} L={key[3]}" + (f" D={key[4]}" if len(key) > 4 else "")


def row_key(row: dict) -> Key:
    key = (row["model"], row["workload"], row["batch"], row["seq_len"])
    return key + (row["n_pairs"],) if row.get("n_pairs") is not None else key


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; finished points are on disk."""


def plan_grid(exp: Experiment) -> list[Key]:
    names = [m.name for m in exp.models]
    grid: list[Key] = []
    for spec in exp.sweep.grids():
        for workload in spec.workloads:
            for batch in spec.batch:
                for i, seq_len in enumerate(spec.seq_lens):
                    order = names if i % 2 == 0 else names[::-1]
                    grid.extend((name, workload, batch, seq_len) for name in order)
    return list(dict.fromkeys(grid)) + probe_grid(exp)  # a point two grids share is measured once


def new_run_dir(exp: Experiment, out: str | Path | None = None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(out or exp.output_dir) / f"{exp.name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def read_points(path: Path) -> list[dict]:
    """Rows of points.jsonl; a torn last line (crash mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class SweepState:
    run_dir: Path
    exp: Experiment
    rows: dict[Key, dict] = field(default_factory=dict)

    @property
    def points_path(self) -> Path:
        return self.run_dir / "points.jsonl"

    def record(self, row: dict) -> None:
        self.rows[row_key(row)] = row
        with open(self.points_path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def failed_series(self, key: Key) -> str | None:
        """The skip status for key if a shorter length of its series hit an OOM or a timeout.

        A series is the key without its length (key[3]): (model, workload, batch[, n_pairs])."""
        for other, row in self.rows.items():
            if other[:3] + other[4:] == key[:3] + key[4:] and other[3] < key[3] and row["status"] in SKIP_AFTER:
                return SKIP_AFTER[row["status"]]
        return None


def prepare_run(exp: Experiment, out: str | Path | None = None, resume: Path | None = None) -> SweepState:
    """Create the run folder (or reopen one to resume) with its resolved config and env.json."""
    resolved = exp.model_dump(mode="json")
    if resume is not None:
        saved = yaml.safe_load((resume / "config.yaml").read_text())
        if _measured(saved) != _measured(resolved):
            raise ValueError(f"{resume}: the config differs from the one this run was started with; "
                             f"resume with the run's own {resume / 'config.yaml'}")
        state = SweepState(resume, exp)
        rows = read_points(state.points_path)
        state.points_path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))  # drop a torn line
        for r in rows:
            state.rows[row_key(r)] = r
        return state
    run_dir = new_run_dir(exp, out)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return SweepState(run_dir, exp)


def _measured(config: dict) -> dict:
    """The config without where it runs: a run may be resumed on another executor."""
    return {k: v for k, v in config.items() if k not in ("executor", "ray", "slurm")}


def make_executor(exp: Experiment, device: str, run_dir: Path):
    """The executor the experiment asks for; the cluster engines are imported here, and only when chosen."""
    kind = exp.executor or exp.measure.isolation
    if kind == "ray":
        from seqbench.run.ray_executor import RayExecutor

        return RayExecutor(exp, device)
    if kind == "slurm":
        from seqbench.run.slurm_executor import SlurmExecutor

        return SlurmExecutor(exp, device, run_dir)
    return EXECUTORS[kind]()


def run_sweep(
    state: SweepState,
    on_start: Callable[[Key, int, int], None] | None = None,
    on_done: Callable[[Key, dict, int, int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> list[dict]:
    """Run every grid point not yet in ``state``; return all rows in grid order.

    Raises Interrupted on SIGINT/SIGTERM; every finished point is already on disk."""
    try:
        with exclusive_machine(on_wait):
            return _run_sweep(state, on_start, on_done)
    except KeyboardInterrupt:  # arrived while waiting for the lock
        raise Interrupted from None


def probe_device(device: str, dtype: str, seed: int, threads: int | None, calibrate_peaks: bool):
    """The environment snapshot and, if asked, the roofline calibration (both touch the device)."""
    if threads:
        torch.set_num_threads(threads)
    env = snapshot(torch.device(device), dtype, seed)
    return env, calibrate(torch.device(device), DTYPES[dtype]) if calibrate_peaks else None


def _run_sweep(state: SweepState, on_start, on_done) -> list[dict]:
    exp = state.exp
    if exp.threads:
        torch.set_num_threads(exp.threads)
    on_this_machine = (exp.executor or exp.measure.isolation) in ("inline", "process")
    if on_this_machine or exp.device != "cuda":
        device = driver_device = resolve_device(exp.device)
    else:  # the nodes have the GPUs; env.json describes the driver as it is
        device, driver_device = torch.device("cuda"), resolve_device("auto")
    torch.manual_seed(exp.seed)
    env_path = state.run_dir / "env.json"
    if env_path.exists():  # a resumed run keeps its first environment and records each later one beside it
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        env_path = state.run_dir / f"env-resumed-{stamp}.json"
    cal_path = state.run_dir / "calibration.json"
    calibration = json.loads(cal_path.read_text()) if cal_path.exists() else None
    calibrate_here = calibration is None and exp.measure.calibrate and on_this_machine  # the driver's peaks fit no node
    args = (str(driver_device), exp.dtype, exp.seed, exp.threads, calibrate_here)
    if (exp.executor or exp.measure.isolation) != "inline":  # the parent never creates a CUDA context
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            env, measured = pool.submit(probe_device, *args).result()
    else:
        env, measured = probe_device(*args)
    env_path.write_text(json.dumps(env, indent=2))
    if measured is not None:
        calibration = measured
        cal_path.write_text(json.dumps(calibration, indent=2))

    grid = plan_grid(exp)
    executor = make_executor(exp, str(device), state.run_dir)
    resolved = exp.model_dump(mode="json")
    run_id = state.run_dir.name
    done = sum(1 for k in grid if k in state.rows)

    def land(row: dict) -> None:
        nonlocal done
        state.record(row)
        done += 1
        if on_done:
            on_done(row_key(row), row, done, len(grid))

    def started(key: Key) -> None:
        if on_start:
            on_start(key, done, len(grid))

    def _on_term(signum, frame):
        raise KeyboardInterrupt

    def spec_of(key: Key) -> PointSpec:
        model, workload, batch, seq_len, *n_pairs = key  # a recall probe's key ends in n_pairs
        return PointSpec(run_id, resolved, model, workload, batch, seq_len, str(device), calibration, *n_pairs)

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        for row in stream(executor, [k for k in grid if k not in state.rows], spec_of, started, state.failed_series):
            land(row)
        for round_ in range(1, exp.measure.remeasure + 1):
            keys = [k for k in grid if needs_remeasure(state.rows.get(k), round_)]  # grid order: interleaved
            for row in stream(executor, keys, spec_of, started):
                state.record(better_of(state.rows[row_key(row)], row, round_))
    except KeyboardInterrupt:
        raise Interrupted from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        executor.close()  # cancels points still in flight; the rows that landed are on disk
    return ordered_rows(state)



def stream(executor, keys: list[Key], spec_of: Callable[[Key], PointSpec], started: Callable[[Key], None],
           skip_status: Callable[[Key], str | None] = lambda key: None) -> Iterator[dict]:
    """Submit keys in order while the executor has a free slot; yield each row as it lands, in any order.

    A key whose ``skip_status`` is set when its turn comes yields a skip row instead of being submitted. The
    caller records every row before asking for the next, so that decision sees all rows landed so far."""
    queue = list(reversed(keys))  # pop() takes the next key in order
    in_flight: set[Key] = set()
    while queue or in_flight:
        while queue and executor.has_slot():
            key = queue.pop()
            skip = skip_status(key)
            if skip:
                yield base_row(spec_of(key), skip, SKIPPED_BECAUSE)
                continue
            executor.submit(spec_of(key))
            in_flight.add(key)
            started(key)
        for row in executor.wait():
            in_flight.discard(row_key(row))
            yield row


# A point timed for less than this can sit inside one slow episode of a shared machine, which then slows all
# its samples alike: its IQR cannot show the episode, so it is re-measured whether flagged noisy or not.
BRIEF_POINT_S = 1.0


def needs_remeasure(row: dict | None, round_: int) -> bool:
    """A measured point that has had fewer than ``round_`` re-measurements and is flagged noisy or was timed
    for less than BRIEF_POINT_S in all (a decode point's steps take tens of milliseconds)."""
    if not row or row["status"] != "ok" or (row.get("remeasure_rounds") or 0) >= round_:
        return False
    timed_s = (row.get("n_samples") or 0) * (row.get("time_median_s") or 0.0)  # a recall probe has no timing
    return bool(row.get("noisy")) or 0 < timed_s < BRIEF_POINT_S


def better_of(old: dict, new: dict, round_: int) -> dict:
    """The faster of two measurements of one point (smaller median), marked with the rounds taken.

    Interference on a shared machine (another process, the host of a VM) only ever slows a call down, and it
    comes in episodes that can cover a whole point; so the lower median is the less disturbed measurement.
    A re-measurement that failed (e.g. timed out on a loaded machine) never replaces a measured row."""
    keep = new if new["status"] == "ok" and new["time_median_s"] < old["time_median_s"] else old
    return {**keep, "remeasure_rounds": round_}


def ordered_rows(state: SweepState) -> list[dict]:
    grid = plan_grid(state.exp)
    return [state.rows[k] for k in grid if k in state.rows]


def write_results_csv(state: SweepState) -> Path:
    """results.csv (the documented columns first, in grid order), for whatever rows exist."""
    import pandas as pd

    rows = ordered_rows(state)
    df = pd.DataFrame(rows, columns=list(COLUMNS) if not rows else None)
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df.reindex(columns=list(COLUMNS) + extra)
    csv_path = state.run_dir / "results.csv"
    df.to_csv(csv_path, index=False)
    return csv_path
