import json

import pytest
from typer.testing import CliRunner

from seqbench.cli import app
from seqbench.config import ConfigError
from seqbench.experiment import experiment_from_dict, load_experiment
from seqbench.run.sweep import plan_grid

MODELS = """
models:
  - {name: attn, kind: attention, d_model: 16, n_layers: 1, n_heads: 2, vocab_size: 32}
  - {name: s4d, kind: s4d, d_model: 16, n_layers: 1, d_state: 4, vocab_size: 32}
"""

RUN = f"""
name: probe
device: cpu
threads: 1
{MODELS}
sweep: {{seq_lens: [16], workloads: [decode], new_tokens: 2}}
measure: {{warmup: 1, min_samples: 2, min_time_s: 0, calibrate: false, remeasure: 0}}  # one line per point
probes:
  mqar: {{n_pairs: [2, 3], seq_lens: [12, 16]}}
  extrapolation: {{n_pairs: 1, train_len: 8, test_lens: [16, 32]}}
  steps: 4
  batch: 8
  eval_sequences: 8
"""


def exp_dict(**probes) -> dict:
    import yaml

    raw = yaml.safe_load(RUN)
    raw["probes"].update(probes)
    return raw


def test_probe_grid_holds_every_feasible_pair_count_once_per_model():
    grid = plan_grid(experiment_from_dict(exp_dict()))
    probes = [k for k in grid if len(k) == 5]
    assert sorted(k[1:] for k in probes if k[0] == "attn") == [
        ("extrapolation", 8, 8, 1), ("mqar", 8, 12, 2), ("mqar", 8, 12, 3), ("mqar", 8, 16, 2), ("mqar", 8, 16, 3)]
    assert len(probes) == 2 * 5 and len(set(probes)) == len(probes)
    assert [k for k in grid if len(k) == 4] == [("attn", "decode", 1, 16), ("s4d", "decode", 1, 16)]


def test_probes_models_restricts_the_probe_grid():
    grid = plan_grid(experiment_from_dict(exp_dict(models=["s4d"])))
    assert {k[0] for k in grid if len(k) == 5} == {"s4d"}


@pytest.mark.parametrize(("probes", "message"), [
    ({"models": ["atn"]}, "probes.models: no model named 'atn' (did you mean 'attn'?)"),
    ({"mqar": {"n_pairs": [2, 5], "seq_lens": [16]}}, "probes.mqar: n_pairs [5] need seq_len >= 4 * n_pairs"),
    ({"mqar": {"n_pairs": [2], "seq_len": [16]}}, "probes.mqar.seq_len: unknown key 'seq_len' (did you mean 'seq_lens'?)"),
    ({"mqar": {"n_pairs": [20], "seq_lens": [128]}}, "model 'attn' has vocab_size 32, too few keys for 20 pairs"),
    ({"mqar": None, "extrapolation": None}, "name at least one task: mqar or extrapolation"),
])
def test_probe_config_mistakes_name_the_key(probes, message):
    with pytest.raises(ConfigError) as e:
        experiment_from_dict(exp_dict(**probes))
    assert message in str(e.value)


def test_validate_exits_2_on_a_probe_mistake(write_config):
    path = write_config(RUN.replace("steps: 4", "stepz: 4"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "probes.stepz: unknown key 'stepz' (did you mean 'steps'?)" in result.output


def test_probe_rows_land_in_the_run_and_resume_retrains_only_the_missing_points(tmp_path, write_config):
    config = write_config(RUN)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = next(out.iterdir())
    points = run / "points.jsonl"
    rows = [json.loads(line) for line in points.read_text().splitlines()]
    probe_rows = [r for r in rows if r["workload"] in ("mqar", "extrapolation")]
    assert len(probe_rows) == 10 and all(r["status"] == "ok" for r in rows)
    for r in probe_rows:
        assert 0 <= r["accuracy"] <= 1 and r["train_steps"] == 4 and r["n_pairs"] in (1, 2, 3)
    extrap = [r for r in probe_rows if r["workload"] == "extrapolation"]
    assert all(set(json.loads(r["accuracy_by_len"])) == {"8", "16", "32"} for r in extrap)
    # the cache bytes of a probe row are those the decode workload counts at the same length
    decode = {r["model"]: r["cache_bytes"] for r in rows if r["workload"] == "decode"}
    assert all(r["cache_bytes"] == decode[r["model"]] for r in probe_rows if r["seq_len"] == 16)
    assert "recall" in result.output  # the terminal summary shows the probes

    # drop the last three rows as if the run had been interrupted, then resume
    lines = points.read_text().splitlines()
    points.write_text("\n".join(lines[:-3]) + "\n")
    resumed = CliRunner().invoke(app, ["run", str(config), "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    again = [json.loads(line) for line in points.read_text().splitlines()]
    keys = [(r["model"], r["workload"], r["batch"], r["seq_len"], r.get("n_pairs")) for r in again]
    assert len(keys) == len(set(keys)) == len(plan_grid(load_experiment(config)))
    # retrained from the seed in a fresh model, the resumed points give the same numbers as the first run
    for first, redone in zip(rows[-3:], again[-3:], strict=True):
        assert (first["model"], first["n_pairs"], first["accuracy"], first["final_loss"]) == \
               (redone["model"], redone["n_pairs"], redone["accuracy"], redone["final_loss"])


def test_a_probe_over_its_time_budget_is_a_timeout_row(tmp_path):
    from seqbench.run.sweep import prepare_run, run_sweep

    raw = exp_dict(timeout_s=0.001, steps=100000, extrapolation=None, models=["attn"])
    raw["probes"]["mqar"] = {"n_pairs": [2], "seq_lens": [8, 16]}
    rows = run_sweep(prepare_run(experiment_from_dict(raw), tmp_path))
    probes = [r for r in rows if r["workload"] == "mqar"]
    assert [(r["seq_len"], r["n_pairs"], r["status"]) for r in probes] == [
        (8, 2, "timeout"), (16, 2, "skipped_after_timeout")]
