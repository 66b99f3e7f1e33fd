"""Exponent fits, crossovers, pivots and run loading on synthetic data with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from seqbench.analysis.fits import crossovers, exponent_table, fit_exponent, t_quantile
from seqbench.analysis.runs import RunError, find_runs, load_run, pivot
from seqbench.formatting import fmt_bytes, fmt_metric

POW2 = [2**k for k in range(8, 14)]  # 256 .. 8192


def rows(curves: dict, workload: str = "prefill", spread: float = 0.02, batch: int = 1, status: dict | None = None):
    """A result frame: ``curves`` maps model -> {L: median seconds}; p25/p75 = median * (1 -/+ spread)."""
    out = []
    for model, curve in curves.items():
        for L, t in curve.items():
            st = (status or {}).get((model, L), "ok")
            s = spread(model, L) if callable(spread) else spread
            ok = st == "ok"
            out.append({
                "model": model, "kind": "attention" if model.startswith("t") else "mamba", "workload": workload,
                "batch": batch, "seq_len": L, "status": st, "noisy": False,
                "time_median_s": t if ok else np.nan, "time_p25_s": t * (1 - s) if ok else np.nan,
                "time_p75_s": t * (1 + s) if ok else np.nan, "tokens_per_s": batch * L / t if ok else np.nan,
                "latency_per_token_s": t if ok and workload == "decode" else np.nan,
                "cache_bytes": 1000.0 * L if ok and workload == "decode" else np.nan,
                "peak_mem_bytes": 4096.0 * L if ok else np.nan,
            })
    return pd.DataFrame(out)


# ---- t quantile and fits ------------------------------------------------------------------------------


@pytest.mark.parametrize("dof,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281),
                                          (30, 2.0423), (1000, 1.9623), (10000, 1.9602)])
def test_t_quantile_matches_tables(dof, expected):
    assert t_quantile(0.95, dof) == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_pure_power_laws_are_recovered_exactly(power):
    L = np.array(POW2, dtype=float)
    fit = fit_exponent(L, 3e-6 * L**power)
    assert fit.status == "ok"
    assert fit.slope == pytest.approx(power, abs=1e-9)
    assert fit.ci_low <= power <= fit.ci_high and fit.ci_high - fit.ci_low < 1e-6
    assert fit.r2 == pytest.approx(1.0)
    assert (fit.l_min, fit.l_max, fit.n_points) == (1024, 8192, 4)  # the top three octaves
    assert fit.asymptotic
    assert [s for _, _, s in fit.local_slopes] == pytest.approx([power] * (len(L) - 1))


def test_linear_plus_quadratic_global_slope_misleads_but_largest_lengths_do_not():
    """Attention-like cost a*L + b*L^2 with the quadratic term taking over at L = 4096."""
    L = np.array([2**k for k in range(6, 17)], dtype=float)  # 64 .. 65536
    cost = 1e-6 * L + 1e-6 / 4096 * L**2
    global_fit = fit_exponent(L, cost, fit_from=0)
    top = fit_exponent(L, cost)
    local = [s for _, _, s in top.local_slopes]
    assert global_fit.slope < 1.45  # "roughly linear" would be wrong
    assert top.slope > global_fit.slope + 0.35 and top.slope > 1.75
    assert all(b > a for a, b in zip(local, local[1:], strict=False))  # still bending upwards ...
    assert local[-1] > 1.9
    assert not top.asymptotic  # ... so the fit must not be called asymptotic
    longer = np.array([2**k for k in range(6, 25)], dtype=float)
    far = fit_exponent(longer, 1e-6 * longer + 1e-6 / 4096 * longer**2)
    assert far.asymptotic and far.slope == pytest.approx(2.0, abs=0.02)


def test_noisy_fit_ci_covers_truth_and_has_nominal_coverage():
    L = np.array([2**k for k in range(8, 17)], dtype=float)
    rng = np.random.default_rng(0)
    fit = fit_exponent(L, 2e-9 * L**1.5 * np.exp(0.05 * rng.standard_normal(len(L))))
    assert fit.ci_low < 1.5 < fit.ci_high and abs(fit.slope - 1.5) < 0.1 and fit.r2 > 0.98
    # The t interval on 4 points (2 dof) must cover the true slope ~95% of the time; a normal 1.96 would not.
    covered = 0
    for seed in range(400):
        r = np.random.default_rng(seed)
        f = fit_exponent(L, L**1.5 * np.exp(0.05 * r.standard_normal(len(L))))
        covered += f.ci_low <= 1.5 <= f.ci_high
    assert 0.91 <= covered / 400 <= 0.985


def test_fit_uses_every_length_from_the_fit_start():
    assert fit_exponent([256, 512, 1024], [1, 2, 4]).status == "too few points"
    sqrt2 = fit_exponent([256, 512, 1024, 1448, 2048, 2896, 4096, 5793, 8192], [1.0] * 9)  # √2 steps
    assert (sqrt2.l_min, sqrt2.n_points) == (1024, 7)  # L >= 8192 / 8: every length of the top three octaves
    ok = fit_exponent([256, 2048, 2560, 3072, 4096], [1, 8, 10, 12, 16])
    assert ok.status == "ok" and (ok.l_min, ok.n_points) == (2048, 4) and ok.slope == pytest.approx(1.0)
    moved = fit_exponent([256, 2048, 2560, 3072, 4096], [1, 8, 10, 12, 16], fit_from=256)
    assert (moved.l_min, moved.n_points) == (256, 5) and moved.slope == pytest.approx(1.0)
    dropped = fit_exponent([256, 512, 1024, 2048, 4096], [1, np.nan, 4, 0.0, 16])  # NaN and 0 are unusable
    assert dropped.status == "too few points" and dropped.n_points == 2  # 1024 and 4096 are left from 512 on


def test_exponent_table_per_model_metric_and_failures():
    L = POW2
    df = pd.concat([
        rows({"tfm": {x: 1e-8 * x**2 for x in L}, "ssm": {x: 1e-6 * x for x in L}}, "prefill",
             status={("tfm", 2048): "oom", ("tfm", 4096): "skipped_after_oom", ("tfm", 8192): "skipped_after_oom"}),
        rows({"tfm": {x: 1e-3 for x in L}, "ssm": {x: 1e-3 for x in L}}, "decode"),
    ])
    table = exponent_table(df).set_index(["model", "workload", "metric"])
    assert table.loc[("ssm", "prefill", "time_median_s"), "slope"] == pytest.approx(1.0)
    assert table.loc[("ssm", "prefill", "tokens_per_s"), "slope"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc[("tfm", "prefill", "time_median_s"), "status"] == "too few points"  # 3 ok points left
    assert table.loc[("ssm", "decode", "latency_per_token_s"), "slope"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc[("tfm", "decode", "cache_bytes"), "slope"] == pytest.approx(1.0)
    assert ("tfm", "decode", "time_median_s") not in table.index  # decode time is the latency, listed once


# ---- crossovers ---------------------------------------------------------------------------------------


LONG = [2**k for k in range(6, 15)]  # 64 .. 16384


def test_real_crossover_is_found_and_interpolated():
    df = rows({"tfm": {x: 1e-6 * x**2 for x in LONG}, "ssm": {x: 1.4e-3 * x for x in LONG}})
    res = crossovers(df)
    assert len(res) == 1
    r = res.iloc[0]
    assert r["status"] == "crossover" and (r["l_below"], r["l_above"]) == (1024, 2048)
    assert r["l_cross"] == pytest.approx(1400, rel=0.01)  # the ratio is a power law: log interpolation is exact
    assert (r["faster_before"], r["faster_after"]) == ("tfm", "ssm")


def test_no_crossing_reports_none_in_range():
    df = rows({"a": {x: 2e-6 * x for x in LONG}, "b": {x: 1e-6 * x for x in LONG}})
    r = crossovers(df).iloc[0]
    assert r["status"] == "none in range" and "b faster at every decided length" in r["summary"]
    assert r["ratio_min"] == pytest.approx(2.0) and r["ratio_max"] == pytest.approx(2.0)


def test_noise_level_wiggles_are_not_claimed():
    wiggle = {x: 1e-6 * x * (1.01 if i % 2 else 0.99) for i, x in enumerate(LONG)}
    df = rows({"a": wiggle, "b": {x: 1e-6 * x for x in LONG}}, spread=0.05)  # 1% wiggle inside 5% IQR
    assert crossovers(df).iloc[0]["status"] == "none in range"
    tight = rows({"a": wiggle, "b": {x: 1e-6 * x for x in LONG}}, spread=0.001)  # bands separate, but < margin
    assert crossovers(tight).iloc[0]["status"] == "none in range"
    assert "tied within noise" in crossovers(tight).iloc[0]["summary"]


def test_crossover_bracket_spans_tied_lengths():
    """a is clearly faster at small L, tied at 1024 and 2048 (noisy), clearly slower from 4096."""
    a = {x: 1e-6 * x * (x / 1448) ** 0.5 for x in LONG}
    b = {x: 1e-6 * x for x in LONG}
    noisy = {1024, 2048}
    df = rows({"a": a, "b": b}, spread=lambda m, x: 0.3 if x in noisy else 0.01)
    r = crossovers(df).iloc[0]
    assert r["status"] == "crossover" and (r["l_below"], r["l_above"]) == (512, 4096)
    assert 1024 < r["l_cross"] < 2048
    assert (r["faster_before"], r["faster_after"]) == ("a", "b")


def test_crossovers_use_only_lengths_both_models_measured():
    df = rows({"tfm": {x: 1e-6 * x**2 for x in LONG}, "ssm": {x: 1e-3 * x for x in LONG}},
              status={("tfm", 1024): "oom", ("tfm", 2048): "skipped_after_oom", ("tfm", 4096): "skipped_after_oom",
                      ("tfm", 8192): "skipped_after_oom", ("tfm", 16384): "skipped_after_oom"})
    r = crossovers(df).iloc[0]
    assert r["status"] == "none in range" and r["lengths"] == "64–512"


# ---- tables, loading, units ---------------------------------------------------------------------------


def test_pivot_is_model_by_length_in_run_order_with_failures_as_nan():
    df = rows({"zeta": {x: 1e-6 * x for x in POW2}, "alpha": {x: 2e-6 * x for x in POW2}},
              status={("zeta", 8192): "oom"})
    table = pivot(df, "time_median_s")
    assert list(table.index) == ["zeta", "alpha"] and list(table.columns) == POW2
    assert math.isnan(table.loc["zeta", 8192]) and table.loc["alpha", 8192] == pytest.approx(2e-6 * 8192)
    assert pivot(df, "status").loc["zeta", 8192] == "oom"
    two = pd.concat([df, rows({"zeta": {256: 1.0}, "alpha": {256: 1.0}}, batch=4)])
    assert pivot(two, "time_median_s").index.names == ["model", "batch"]


def test_load_run_prefers_jsonl_tolerates_a_cut_line_and_keeps_the_last_duplicate(tmp_path):
    base = rows({"m": {256: 1.0, 512: 2.0}}).to_dict("records")
    redo = dict(base[1], time_median_s=3.0)
    text = "".join(json.dumps(r) + "\n" for r in [*base, redo]) + '{"model": "m", "seq'  # crash mid-write
    (tmp_path / "points.jsonl").write_text(text)
    pd.DataFrame(base).assign(time_median_s=99.0).to_csv(tmp_path / "results.csv", index=False)
    df = load_run(tmp_path)
    assert len(df) == 2 and df.set_index("seq_len").loc[512, "time_median_s"] == 3.0
    assert "param_bytes" not in base[0]
    assert df["error"].eq("").all() and df["param_bytes"].dtype == float  # missing columns exist, typed
    (tmp_path / "points.jsonl").unlink()
    assert load_run(tmp_path)["time_median_s"].eq(99.0).all()  # falls back to results.csv
    assert find_runs(tmp_path) == [tmp_path]


def test_load_run_errors_are_clear(tmp_path):
    with pytest.raises(RunError, match="no such folder"):
        load_run(tmp_path / "nope")
    with pytest.raises(RunError, match="not a run folder"):
        load_run(tmp_path)
    (tmp_path / "points.jsonl").write_text("")
    with pytest.raises(RunError, match="no points"):
        load_run(tmp_path)


def test_human_units():
    assert fmt_bytes(155648) == "152 KiB" and fmt_bytes(3 * 2**30) == "3 GiB" and fmt_bytes(12) == "12 B"
    assert fmt_metric(0.00155, "latency_per_token_s") == "1.55 ms"
    assert fmt_metric(4970.0, "tokens_per_s") == "4.97 k tok/s"
    assert fmt_metric(float("nan"), "time_median_s") == "–"
