"""What a point measures: the workload's own peak memory, serving prefill, FLOPs and bytes, warmup 0, the build
inside the timeout, and parameters that cannot fit."""

import pytest
import torch

from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model
from seqbench.run.memory import peak_call_bytes
from seqbench.run.point import PointSpec, run_point
from seqbench.run.workloads import decode, prefill

CPU = torch.device("cpu")
MIB = 2**20
SSMS = {
    "mamba": {"name": "mamba", "kind": "mamba", "d_model": 64, "n_layers": 2, "d_state": 16},
    "mamba2": {"name": "mamba2", "kind": "mamba2", "d_model": 64, "n_layers": 2, "d_state": 16, "headdim": 16},
    "s4d": {"name": "s4d", "kind": "s4d", "d_model": 64, "n_layers": 2, "d_state": 32},
}
ATTN = {"name": "tfm", "kind": "attention", "d_model": 64, "n_layers": 2, "n_heads": 4}


def _exp(models, **measure):
    return experiment_from_dict({
        "name": "w", "device": "cpu", "threads": 2, "models": models,
        "sweep": {"seq_lens": [64], "workloads": ["prefill", "decode"], "new_tokens": 4},
        "measure": {"warmup": 1, "min_samples": 2, "min_time_s": 0.0, "calibrate": False, **measure},
    })


def _row(exp, name, workload, seq_len, models=None):
    return run_point(PointSpec("r", exp.model_dump(), name, workload, 1, seq_len, "cpu"), models)


def test_live_tensor_peak_counts_every_intermediate_once():
    n = 256 * 1024  # 1 MiB of float32

    def call():
        a = torch.ones(n)  # 1 MiB
        b = a * 2  # 2 MiB live
        view = b[: n // 2]  # a view allocates nothing
        del a
        c = b + 1  # 2 MiB live again (a freed)
        c[: n // 2].add_(view)  # in place into a view: nothing new
        return c.sum()

    assert peak_call_bytes(call, CPU) == 2 * MIB + 4  # two 1 MiB tensors at once, then the 4-byte sum


def test_peak_counts_scratch_the_references_keep_between_calls():
    """Buffers kept between calls (ops/scratch.BETWEEN_CALLS) are live during a call that uses them, so
    its peak counts them however many calls came before."""
    from seqbench.ops.scratch import BETWEEN_CALLS

    def call():
        BETWEEN_CALLS.get("test", 256 * 1024, like=torch.empty(0)).fill_(1.0)  # 1 MiB, kept after the call

    peaks = [peak_call_bytes(call, CPU) for _ in range(3)]
    assert peaks == [MIB] * 3
    BETWEEN_CALLS.clear()


@pytest.mark.parametrize("kind", sorted(SSMS))
def test_ssm_decode_peak_is_independent_of_context_and_of_the_points_before(kind):
    exp = _exp([SSMS[kind]])
    models: dict = {}
    # a long prefill first leaves glibc holding freed pages: the old RSS figure then depended on the order
    assert _row(exp, kind, "prefill", 4096, models)["status"] == "ok"
    rows = [_row(exp, kind, "decode", L, models) for L in (2048, 64, 512)]
    assert all(r["status"] == "ok" for r in rows)
    assert len({r["peak_mem_bytes"] for r in rows}) == 1  # the same bytes at every context, in any order
    cache = rows[0]["cache_bytes"]
    assert cache == rows[1]["cache_bytes"] > 0
    assert cache <= rows[0]["peak_mem_bytes"] <= cache + MIB


def test_attention_decode_peak_grows_by_its_kv_bytes():
    exp = _exp([ATTN])
    models: dict = {}
    short, long = (_row(exp, "tfm", "decode", L, models) for L in (256, 4096))
    kv_per_token = 2 * 2 * 64 * 4  # (k, v) · layers · d_model · float32
    assert long["cache_bytes"] - short["cache_bytes"] == (4096 - 256) * kv_per_token
    grown = long["peak_mem_bytes"] - short["peak_mem_bytes"]
    assert grown == pytest.approx((4096 - 256) * kv_per_token, rel=0.01)
    assert long["peak_mem_bytes"] >= long["cache_bytes"]


def test_prefill_writes_the_cache_and_chunking_leaves_the_same_one():
    spec = _exp([{"name": "h", "kind": "hybrid", "d_model": 32, "n_layers": 4, "n_heads": 2, "d_state": 16,
                  "headdim": 16, "chunk_size": 16, "layout": "AMDS"}]).models[0]
    torch.manual_seed(0)
    model = build_model(spec)
    whole = prefill(model, 2, 96, CPU, seed=1)
    chunked = prefill(model, 2, 96, CPU, seed=1, prefill_chunk=40)
    logits_whole, logits_chunked = whole.call(), chunked.call()
    assert logits_whole.shape == (2, spec.vocab_size)  # the last position's logits only
    torch.testing.assert_close(logits_chunked, logits_whole, atol=1e-4, rtol=1e-4)
    assert whole.cache.seqlen == chunked.cache.seqlen == 96
    for a, b in zip(whole.cache.tensors(), chunked.cache.tensors(), strict=True):
        assert a.abs().sum() > 0  # K/V written, final state kept
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    before = [t.clone() for t in whole.cache.tensors()]
    torch.testing.assert_close(whole.call(), logits_whole)  # a second call overwrites from position 0
    for a, b in zip(before, whole.cache.tensors(), strict=True):
        torch.testing.assert_close(b, a)


def test_flops_and_decode_bytes_of_a_tiny_transformer_by_hand():
    spec = _exp([{"name": "t", "kind": "attention", "d_model": 8, "n_layers": 1, "n_heads": 2,
                  "vocab_size": 16}]).models[0]
    model = build_model(spec)
    # per token: q 8x8, k+v 8x16, out 8x8 -> 2 * 256 = 512 FLOPs; head 8x16 -> 256 FLOPs
    # prefill of 4 tokens: 4 * 512 + causal pairs (1+2+3+4 = 10) * (QK^T + AV = 2) * 2 FLOPs * 8 dims + one head
    assert model.prefill_flops(4) == 4 * 512 + 10 * 2 * 2 * 8 + 256 == 2624
    # a step with 4 cached tokens attends over 5 keys
    assert model.step_flops(4) == 512 + 5 * 2 * 2 * 8 + 256 == 928
    # training's forward computes the logits of all 4 positions
    assert model.forward_flops(4) == 2624 + 3 * 256
    work = prefill(model, 3, 4, CPU, seed=0)
    assert work.flops_per_call == 3 * 2624 and work.tokens_per_call == 12
    # a step reads every weight but the embedding table (16x8), of which one row of 8 per sequence:
    # norms 8 + 8, q 64, kv 128, out 64, head 128 = 400 floats, + 2 rows = 416 floats; + K/V of 4 positions
    step = decode(model, 2, 4, CPU, seed=0)
    assert step.bytes_per_call == 416 * 4 + 2 * 2 * 4 * 8 * 4


@pytest.mark.parametrize("workload", ["prefill", "decode"])
def test_warmup_zero_measures(workload):
    exp = _exp([SSMS["mamba"], ATTN], warmup=0)
    for name in ("mamba", "tfm"):
        row = _row(exp, name, workload, 64)
        assert row["status"] == "ok", row["error"]
        assert row["first_call_s"] is None  # no untimed call was timed
        if workload == "decode":
            assert row["n_samples"] == 4


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_a_build_longer_than_the_timeout_is_a_timeout_row(isolation):
    from seqbench.run.executors import EXECUTORS

    exp = _exp([{"name": "deep", "kind": "mamba", "d_model": 16, "n_layers": 200_000}], timeout_s=1.0,
               isolation=isolation)
    executor = EXECUTORS[isolation]()
    try:
        row = executor.run(PointSpec("r", exp.model_dump(), "deep", "prefill", 1, 64, "cpu"))
    finally:
        executor.close()
    assert row["status"] == "timeout", row["error"]


def test_parameters_beyond_available_memory_are_an_oom_row_without_building(monkeypatch):
    import seqbench.run.point as point

    built_on = []
    real_build = point.build_model

    def spy(spec, device="cpu", dtype=torch.float32):
        built_on.append(str(device))
        return real_build(spec, device=device, dtype=dtype)

    monkeypatch.setattr(point, "build_model", spy)
    wide = {"name": "wide", "kind": "attention", "d_model": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 65536}
    exp = _exp([wide], memory_limit_gb=0.01)
    row = _row(exp, "wide", "prefill", 64)
    params = 2 * 65536 * 64 + 64 * 64 * 3 + 2 * 64 + 64 * 64  # embedding + head, q/k/v, two norms, out
    assert row["status"] == "oom"
    assert f"{params * 4:,} bytes" in row["error"]
    assert built_on == ["meta"]


@pytest.mark.parametrize(("state_dtype", "element_bytes"), [("float32", 4), ("model", 2)])
def test_s4d_state_dtype_is_a_recorded_choice(state_dtype, element_bytes):
    s4d = {**SSMS["s4d"], "state_dtype": state_dtype}
    exp = experiment_from_dict({**_exp([s4d]).model_dump(), "dtype": "bfloat16"})
    row = _row(exp, "s4d", "decode", 64)
    assert row["status"] == "ok", row["error"]
    assert row["cache_dtype"] == ("float32" if state_dtype == "float32" else "bfloat16")
    assert row["cache_bytes"] == 2 * 64 * (32 // 2) * 2 * element_bytes  # layers · d · N/2 · (re, im)
