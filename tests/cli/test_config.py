"""Config schema: valid files load, and every user mistake exits 2 with a message naming the key."""

import pytest
from typer.testing import CliRunner

from seqbench.cli import app
from seqbench.config import parse_seq_lens
from seqbench.experiment import load_experiment

GOOD = """
name: t
models:
  - {name: a, kind: attention, d_model: 64, n_layers: 2, n_heads: 4}
sweep: {seq_lens: 16..64 x2}
"""


def test_range_strings():
    assert parse_seq_lens("256..2048 x2") == [256, 512, 1024, 2048]
    assert parse_seq_lens("100..300 +100") == [100, 200, 300]
    assert parse_seq_lens("3..30 x3") == [3, 9, 27]
    assert parse_seq_lens([5, 7]) == [5, 7]
    # a fractional factor: START·FACTOR^k rounded, so √2 steps land back on the powers of two
    assert parse_seq_lens("2048..16384 x1.41421356") == [2048, 2896, 4096, 5793, 8192, 11585, 16384]
    assert parse_seq_lens("10..40 x1.5") == [10, 15, 22, 34]


def test_good_config_loads(write_config):
    exp = load_experiment(write_config(GOOD))
    assert exp.sweep.seq_lens == [16, 32, 64]
    assert exp.models[0].layer_kinds() == ["attention", "attention"]


def test_hybrid_layout_tiles(write_config):
    exp = load_experiment(write_config(GOOD.replace(
        "{name: a, kind: attention, d_model: 64, n_layers: 2, n_heads: 4}",
        "{name: h, kind: hybrid, d_model: 64, n_layers: 8, n_heads: 4, layout: MMMA}")))
    assert exp.models[0].layer_kinds() == ["mamba"] * 3 + ["attention"] + ["mamba"] * 3 + ["attention"]


def test_preset_fills_unset_fields_only(write_config):
    exp = load_experiment(write_config(GOOD.replace(
        "{name: a, kind: attention, d_model: 64, n_layers: 2, n_heads: 4}",
        "{name: m, kind: mamba, preset: small, n_layers: 2}")))
    m = exp.models[0]
    assert (m.d_model, m.n_layers, m.d_state) == (256, 2, 16)


BAD = {
    "syntax error": ("name: t\nmodels: [\n", "invalid YAML at line"),
    "unknown key": (GOOD.replace("n_heads: 4}", "n_heads: 4, d_stat: 4}"), "models[0].d_stat: unknown key 'd_stat' (did you mean 'd_state'?)"),
    "unknown top key": (GOOD + "sweeps: {}\n", "unknown key 'sweeps' (did you mean 'sweep'?)"),
    "wrong type": (GOOD.replace("d_model: 64", "d_model: wide"), "models[0].d_model"),
    "negative length": (GOOD.replace("16..64 x2", "[16, -32]"), "sweep.seq_lens[1]"),
    "empty models": ("name: t\nmodels: []\nsweep: {seq_lens: [16]}\n", "models: must name at least one model"),
    "unknown kind": (GOOD.replace("kind: attention", "kind: mamba3"), "models[0].kind: unknown model kind 'mamba3' (did you mean 'mamba'?)"),
    "bad range": (GOOD.replace("16..64 x2", "'16...64'"), "sweep.seq_lens: bad range '16...64'"),
    "heads do not divide": (GOOD.replace("n_heads: 4", "n_heads: 5"), "models[0]: n_heads (5) must divide d_model (64)"),
    "missing sweep": ("name: t\nmodels:\n  - {name: a, kind: mamba}\n", "sweep: required key is missing"),
    "duplicate names": (GOOD.replace("- {name: a,", "- {name: a, kind: mamba}\n  - {name: a,"), "repeated: a"),
    "bad workload": (GOOD.replace("16..64 x2}", "16..64 x2, workloads: [prefil]}"), "sweep.workloads[0]"),
    "bad layout": (GOOD.replace("kind: attention", "kind: hybrid, layout: MXA"), "layout 'MXA' has unknown letters"),
    "unknown preset": (GOOD.replace("kind: attention", "kind: attention, preset: tinny"), "models[0].preset: unknown preset 'tinny' for kind 'attention' (did you mean 'tiny'?)"),
    "fast kernel missing": (GOOD.replace("n_heads: 4}", "n_heads: 4, impl: fast}"), "asks for impl: fast"),
    "top level list": ("- 1\n- 2\n", "top level must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_with_key(case, write_config):
    text, expected = BAD[case]
    path = write_config(text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    flat = " ".join(output.split())
    assert expected in flat, flat
    assert str(path.name) in flat
    assert "Traceback" not in flat


def test_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such config file" in " ".join(result.output.split())


def test_initialisation_options_reach_the_mixers(write_config):
    import torch

    from seqbench.models import build_model

    text = GOOD.replace("{name: a, kind: attention, d_model: 64, n_layers: 2, n_heads: 4}",
                        "{name: s, kind: s4d, d_model: 16, n_layers: 1, d_state: 8, s4d_init: %s, dt_min: 0.01, dt_max: 0.02}")
    lin = build_model(load_experiment(write_config(text % "lin", "lin.yaml")).models[0]).blocks[0].mixer
    inv = build_model(load_experiment(write_config(text % "inv", "inv.yaml")).models[0]).blocks[0].mixer
    assert not torch.equal(lin.A_imag, inv.A_imag)
    dt = lin.log_dt.exp()
    assert (dt >= 0.01 - 1e-6).all() and (dt <= 0.02 + 1e-6).all()
    bad = CliRunner().invoke(app, ["validate", str(write_config(text.replace("0.02", "0.001") % "lin", "bad.yaml"))])
    assert bad.exit_code == 2 and "dt_min (0.01) must not exceed dt_max (0.001)" in " ".join(bad.output.split())


def test_match_params_resizes_within_tolerance(write_config):
    from seqbench.models import describe_model

    exp = load_experiment(write_config("""
name: matched
models:
  - {name: ref, kind: attention, d_model: 128, n_layers: 2, n_heads: 4}
  - {name: s4, kind: s4d, d_model: 64, n_layers: 2, d_state: 16}
  - {name: narrow, kind: attention, d_model: 32, n_layers: 2, n_heads: 4}
sweep: {seq_lens: [16]}
match_params: {to: ref, tolerance: 0.05}
"""))
    counts = {m.name: describe_model(m, 1)["params_non_embedding"] for m in exp.models}
    assert exp.models[2].d_model == 128  # same architecture -> same size
    assert exp.models[1].d_model != 64
    assert abs(counts["s4"] / counts["ref"] - 1) <= 0.05


def test_match_params_unknown_reference_exits_2(write_config):
    path = write_config(GOOD + "match_params: {to: nobody}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "match_params.to: 'nobody' is not a model" in " ".join(result.output.split())
