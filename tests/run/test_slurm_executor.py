"""The slurm executor through submitit's local cluster: the smoke config runs as one job array into one run folder."""

import json
import os

import pytest
from conftest import latest_rows, run_smoke_through

pytest.importorskip("submitit")

from seqbench.experiment import load_experiment  # noqa: E402
from seqbench.run.sweep import plan_grid  # noqa: E402


def test_smoke_through_submitit_local_lands_in_the_run_folder(tmp_path):
    # five array tasks (one per model) at once on this machine: one thread each keeps the run bounded
    config, run, result = run_smoke_through("slurm", tmp_path, slurm={"cluster": "local", "array_by": "model"},
                                            threads=1)
    assert result.exit_code == 0, result.output
    latest = latest_rows(run)
    assert sorted(latest) == sorted(plan_grid(load_experiment(config)))
    rows = list(latest.values())
    assert {r["status"] for r in rows} == {"ok"}, [(r["model"], r["status"], r["error"]) for r in rows]
    assert all(r["host"] for r in rows) and (run / "results.csv").is_file()
    # one array of five tasks, its per-task row files and submitit's logs inside the run folder
    (rows_dir,) = (run / "slurm").glob("rows-*")
    assert len(list(rows_dir.glob("*.jsonl"))) == 5
    assert list((run / "slurm").glob("*_log.err"))


class _DeadJob:
    """A job as submitit reports one that SLURM ended early."""

    job_id = "42_0"

    def __init__(self, state: str):
        self.state = state

    def result(self):
        raise RuntimeError(f"Job 42_0 (task: 0) with path ... has not produced any output (state: {self.state})")


def test_a_task_that_died_leaves_a_row_for_every_point_it_owed(tmp_path):
    from seqbench.experiment import experiment_from_dict
    from seqbench.run.point import PointSpec
    from seqbench.run.slurm_executor import SlurmExecutor, _Chunk

    exp = experiment_from_dict({"name": "x", "models": [{"name": "m", "kind": "mamba", "preset": "tiny"}],
                                "sweep": {"seq_lens": [16, 32, 64], "workloads": ["prefill", "decode"]}})
    resolved = exp.model_dump(mode="json")
    specs = [PointSpec("r", resolved, "m", w, 1, n, "cpu") for w in ("prefill", "decode") for n in (16, 32, 64)]
    path = tmp_path / "0.jsonl"
    path.write_text(json.dumps({"model": "m", "workload": "prefill", "batch": 1, "seq_len": 16, "status": "ok"}) + "\n"
                    + '{"model": "m", "workl')  # the task died while writing its second row
    for state, first in [("OUT_OF_MEMORY", "oom_killed"), ("NODE_FAIL", "error"), ("CANCELLED", "error")]:
        chunk = _Chunk(_DeadJob(state), specs, path)
        landed = SlurmExecutor._new_rows(chunk)
        rest = SlurmExecutor._rows_for_the_rest(chunk)
        assert [r["seq_len"] for r in landed] == [16]
        got = [(r["workload"], r["seq_len"], r["status"]) for r in rest]
        after = "skipped_after_oom" if first == "oom_killed" else "error"
        assert got == [("prefill", 32, first), ("prefill", 64, after),
                       ("decode", 16, "error"), ("decode", 32, "error"), ("decode", 64, "error")]
        assert ("node lost" in rest[0]["error"]) == (state == "NODE_FAIL")
        assert "CANCELLED" in rest[0]["error"] or state != "CANCELLED"
        assert all(r["error"].startswith("not measured") for r in rest[2:])


def test_the_slurm_block_becomes_sbatch_options(tmp_path, monkeypatch):
    """What a SLURM cluster would receive, checked without one: submitit writes the sbatch file itself."""
    import submitit

    from seqbench.experiment import experiment_from_dict
    from seqbench.run.slurm_executor import submitit_parameters

    fake_srun = tmp_path / "bin" / "srun"  # submitit only checks that srun exists before writing the file
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}:{os.environ['PATH']}")

    def sbatch(slurm: dict, device: str) -> str:
        exp = experiment_from_dict({"name": "big", "threads": 8, "models": [{"name": "m", "kind": "mamba"}],
                                    "sweep": {"seq_lens": [16]}, "slurm": slurm})
        executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
        executor.update_parameters(**submitit_parameters(exp, device))
        return executor._executor._make_submission_file_text("python -m job", "uid")

    gpu = sbatch({"partition": "gpu", "time_min": 240, "mem_gb": 64, "setup": ["source venv/bin/activate"],
                  "additional": {"reservation": "mine"}}, "cuda")
    for line in ("--partition=gpu", "--time=240", "--mem=64GB", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--job-name=seqbench-big", "--reservation=mine", "source venv/bin/activate"):
        assert line in gpu, line
    assert "--exclusive" not in gpu  # one GPU each: several points may share a GPU node
    cpu = sbatch({"account": "lab"}, "cpu")
    assert "--exclusive" in cpu and "--account=lab" in cpu and "gpus" not in cpu  # on CPU a node to itself
