"""A simulated two-node Ray cluster loses a node mid-run: its point becomes a row and the run completes."""

import os
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from seqbench.experiment import experiment_from_dict  # noqa: E402
from seqbench.run.sweep import plan_grid, prepare_run, run_sweep  # noqa: E402

LENGTHS = [16, 24, 32, 40, 48, 56]
EXPERIMENT = {
    "name": "node-loss", "device": "cpu", "threads": 1,
    "models": [{"name": "m", "kind": "mamba", "preset": "tiny"}],
    "sweep": {"seq_lens": LENGTHS, "workloads": ["prefill"]},
    "measure": {"warmup": 1, "min_samples": 2, "min_time_s": 3.0, "calibrate": False, "remeasure": 0},  # seconds each
    "executor": "ray",
}


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_a_lost_node_turns_its_point_into_a_row_and_the_run_completes(tmp_path, two_nodes):
    cluster, worker = two_nodes
    exp = experiment_from_dict(EXPERIMENT)
    state = prepare_run(exp, tmp_path)
    started = []

    def on_start(key, done, total):
        started.append(key)
        if len(started) == 2:  # one point in flight on each node (one slot per node)
            time.sleep(2.0)  # let the worker node's task start measuring
            cluster.remove_node(worker)

    rows = run_sweep(state, on_start=on_start)
    assert len(rows) == len(plan_grid(exp)) == len(LENGTHS)
    lost = [r for r in rows if r["status"] == "error"]
    assert len(lost) == 1 and lost[0]["error"].startswith("node lost"), [(r["status"], r["error"]) for r in rows]
    assert [r["status"] for r in rows].count("ok") == len(LENGTHS) - 1
    assert all(r["host"] for r in rows)
    on_disk = (state.run_dir / "points.jsonl").read_text().splitlines()
    assert len(on_disk) == len(LENGTHS)
