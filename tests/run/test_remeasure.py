"""Noisy points are measured again after the grid, interleaved in grid order; points.jsonl stays append-only and
the later line of a point wins in resume, results.csv and the analysis."""

import json

import pandas as pd
import pytest

from seqbench.analysis.runs import load_run
from seqbench.experiment import experiment_from_dict
from seqbench.run.executors import EXECUTORS, SequentialExecutor
from seqbench.run.point import base_row
from seqbench.run.sweep import plan_grid, prepare_run, run_sweep, write_results_csv

# (IQR/median, median ms) of each successive measurement of a point (IQR/median > 0.10 is noisy); points not
# listed are quiet at 1 ms. Every measurement takes SAMPLES samples (2 s at 1 ms) unless listed in BRIEF.
SAMPLES = 2000
BRIEF = {("a", "prefill", 1, 16): 5}  # timed for 5 ms: re-measured although quiet
SCRIPT = {
    ("a", "prefill", 1, 32): [(0.5, 3.0), (0.3, 2.0), (0.02, 2.5)],  # quiet at last, but slower: 2.0 ms kept
    ("b", "prefill", 1, 16): [(0.2, 2.0), (0.4, 1.5), (0.3, 4.0)],  # noisy every time: the fastest is kept
    ("b", "prefill", 1, 32): [(0.3, 5.0), (0.01, 1.0)],  # faster and quiet on the first re-measurement
}


class ScriptedExecutor(SequentialExecutor):
    calls: list = []

    def run(self, spec):
        key = (spec.model, spec.workload, spec.batch, spec.seq_len)
        n = sum(1 for k in self.calls if k == key)
        self.calls.append(key)
        script = SCRIPT.get(key, [])
        iqr, median_ms = script[n] if n < len(script) else (0.01, 1.0)
        row = base_row(spec, "ok")
        row.update(time_median_s=median_ms / 1e3, iqr_ratio=iqr, noisy=iqr > 0.10, remeasure_rounds=0,
                   n_samples=BRIEF.get(key, SAMPLES))
        return row

    def close(self):
        pass


def _exp(remeasure=2):
    return experiment_from_dict({
        "name": "n", "device": "cpu",
        "models": [{"name": "a", "kind": "attention", "d_model": 32, "n_layers": 1, "n_heads": 2},
                   {"name": "b", "kind": "attention", "d_model": 32, "n_layers": 1, "n_heads": 2}],
        "sweep": {"seq_lens": [16, 32, 64], "workloads": ["prefill"]},
        "measure": {"calibrate": False, "remeasure": remeasure},
    })


@pytest.fixture
def scripted(monkeypatch):
    ScriptedExecutor.calls = []
    monkeypatch.setitem(EXECUTORS, "inline", ScriptedExecutor)
    return ScriptedExecutor


def _key(r):
    return (r["model"], r["workload"], r["batch"], r["seq_len"])


def test_noisy_points_are_remeasured_interleaved_and_the_faster_row_kept(tmp_path, scripted):
    exp = _exp()
    state = prepare_run(exp, tmp_path)
    rows = {_key(r): r for r in run_sweep(state)}
    grid = plan_grid(exp)
    # the grid once, then round 1 over the three noisy points and the brief one, in grid order; round 2 over
    # the points whose kept row is still noisy (a32 kept its 2.0 ms noisy one, b16 its 1.5 ms noisy one; b32
    # kept its quiet 1.0 ms one) and the brief one
    round_1 = [k for k in grid if k in SCRIPT or k in BRIEF]
    round_2 = [k for k in grid if k in BRIEF or k in (("b", "prefill", 1, 16), ("a", "prefill", 1, 32))]
    assert scripted.calls == grid + round_1 + round_2
    a32, b16, b32 = (rows[k] for k in SCRIPT)
    assert (a32["time_median_s"], a32["iqr_ratio"], a32["noisy"], a32["remeasure_rounds"]) == (2e-3, 0.3, True, 2)
    assert (b16["time_median_s"], b16["iqr_ratio"], b16["remeasure_rounds"]) == (1.5e-3, 0.4, 2)  # rounds used up
    assert (b32["time_median_s"], b32["iqr_ratio"], b32["remeasure_rounds"]) == (1e-3, 0.01, 1)
    assert rows[("a", "prefill", 1, 16)]["remeasure_rounds"] == 2  # brief: re-measured in every round
    assert rows[("a", "prefill", 1, 64)]["remeasure_rounds"] == rows[("b", "prefill", 1, 64)]["remeasure_rounds"] == 0

    lines = [json.loads(line) for line in (state.run_dir / "points.jsonl").read_text().splitlines()]
    assert len(lines) == len(grid) + len(round_1) + len(round_2)  # appended, never rewritten
    csv = pd.read_csv(write_results_csv(state))
    assert len(csv) == len(grid)
    assert csv.set_index(["model", "seq_len"]).loc[("a", 32), "time_median_s"] == 2e-3
    assert load_run(state.run_dir).set_index(["model", "seq_len"]).loc[("a", 32), "remeasure_rounds"] == 2

    scripted.calls = []  # resuming the finished run measures nothing again and reads the later lines
    resumed = prepare_run(exp, resume=state.run_dir)
    assert resumed.rows[("a", "prefill", 1, 32)]["time_median_s"] == 2e-3
    run_sweep(resumed)
    assert scripted.calls == []


def test_remeasure_zero_keeps_the_first_measurement(tmp_path, scripted):
    state = prepare_run(_exp(remeasure=0), tmp_path)
    rows = {_key(r): r for r in run_sweep(state)}
    assert len(scripted.calls) == len(plan_grid(state.exp))
    assert rows[("a", "prefill", 1, 32)]["noisy"] and rows[("a", "prefill", 1, 32)]["remeasure_rounds"] == 0
