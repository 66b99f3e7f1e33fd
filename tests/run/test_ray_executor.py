"""The ray executor on a local Ray instance: the smoke grid lands whole, with inline's statuses."""

import os

import pytest
from conftest import latest_rows, run_smoke_through

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from seqbench.experiment import load_experiment  # noqa: E402
from seqbench.run.sweep import plan_grid  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_smoke_through_ray_has_inline_grid_and_statuses(tmp_path, local_ray):
    config, run, result = run_smoke_through("ray", tmp_path)
    assert result.exit_code == 0, result.output
    latest = latest_rows(run)
    rows = list(latest.values())
    # inline runs this grid with every point ok (tests/cli/test_cli.py::test_smoke_config_runs_and_plots);
    # rows land in any order, so compare as sets; results.csv is written in grid order all the same
    assert sorted(latest) == sorted(plan_grid(load_experiment(config)))
    assert {r["status"] for r in rows} == {"ok"}, [(r["model"], r["status"], r["error"]) for r in rows]
    # the experiment's threads (2) ran each point, and every row says which machine measured it
    assert {r["threads"] for r in rows} == {2}
    assert all(r["host"] for r in rows) and all(r["tokens_per_s"] > 0 for r in rows)
    with open(run / "results.csv") as f:
        assert f.readline().rstrip().split(",")[-1] == "host"


def test_interrupt_keeps_landed_rows_and_resume_finishes_on_ray(tmp_path, local_ray):
    from seqbench.experiment import experiment_from_dict
    from seqbench.run.sweep import Interrupted, prepare_run, read_points, run_sweep

    exp = experiment_from_dict({
        "name": "stop", "device": "cpu", "threads": 1, "executor": "ray",
        "models": [{"name": "m", "kind": "mamba", "preset": "tiny"}],
        "sweep": {"seq_lens": [16, 24, 32, 40, 48, 56], "workloads": ["prefill"]},
        "measure": {"warmup": 1, "min_samples": 2, "min_time_s": 0, "calibrate": False, "remeasure": 0},
    })
    state = prepare_run(exp, tmp_path)

    def ctrl_c_at_the_third_row(key, row, done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_sweep(state, on_done=ctrl_c_at_the_third_row)
    assert len(read_points(state.points_path)) == 3
    rows = run_sweep(prepare_run(exp, resume=state.run_dir))
    keys = [(r["model"], r["seq_len"]) for r in read_points(state.points_path)]
    assert len(rows) == len(keys) == len(set(keys)) == 6 and {r["status"] for r in rows} == {"ok"}
