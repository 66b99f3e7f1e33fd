"""The memory / FLOP calculator: exact against caches seqbench allocates, golden against published figures."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from seqbench.calc import memcalc
from seqbench.config import ModelSpec
from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model
from seqbench.models.published import arch_from_spec, arch_names, get_arch, model_fields

GiB = 1024**3
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
CACHE_KEYS = {"kv": ("k", "v"), "conv": ("conv_state",), "ssm": ("ssm_state",)}


def _meta_model(spec: ModelSpec, dtype: torch.dtype):
    """Full-size model on the meta device: shapes and dtypes only, no memory (the default-device context keeps
    every factory call on meta, including the ones that do not take a device argument)."""
    with torch.device("meta"):
        return build_model(spec, device="meta", dtype=dtype)


def _allocated(model, batch: int, context: int, dtype: torch.dtype, device: str) -> dict[str, int]:
    """Bytes per cache component, summed over the tensors the mixers actually allocated."""
    cache = model.allocate_cache(batch, context, dtype=dtype, device=device)
    out = {part: sum(t.numel() * t.element_size() for layer in cache.layers for key, t in layer.items() if key in keys)
           for part, keys in CACHE_KEYS.items()}
    assert sum(out.values()) == cache.nbytes()  # no tensor outside the three known kinds
    return out


def _analytic(p, batch: int, context: int, dtype: str) -> dict[str, int]:
    m = memcalc.memory(p, context, batch, dtype)
    return {"kv": m.kv_cache_bytes, "conv": m.conv_state_bytes, "ssm": m.ssm_state_bytes}


# ---- exactness against what seqbench allocates ----------------------------------------------------------------


@pytest.mark.parametrize("name", arch_names())
def test_calculator_equals_the_model_for_every_preset(name):
    """One FLOPs implementation: for every published preset, at two contexts, the calculator's FLOPs and cache
    bytes are those of the model seqbench builds for the layout (a mixture of experts set aside: it adds
    experts the dense stack does not have, checked by hand below)."""
    p = dataclasses.replace(get_arch(name), moe=None)
    model = _meta_model(ModelSpec(name=name, impl="ref", **model_fields(p)), torch.bfloat16)
    for context in (4096, 256 * 1024):
        assert memcalc.prefill_flops(p, context) == model.prefill_flops(context)
        assert memcalc.decode_flops(p, context) == model.step_flops(context)
        assert _allocated(model, 2, context, torch.bfloat16, "meta") == _analytic(p, 2, context, "bfloat16")


# Reduced depth (one layout block or two layers), width and context; real tensors on the CPU.
SMALL = {
    "llama-2-70b": {"n_layers": 2, "d_model": 128, "n_heads": 8, "n_kv_heads": 1},
    "mistral-7b": {"layers": 1 / 16, "width": 1 / 32},
    "mamba-1.4b": {"layers": 1 / 24, "width": 1 / 32},
    "falcon-mamba-7b": {"n_layers": 2, "d_model": 64},
    "mamba2-2.7b": {"layers": 1 / 32, "width": 1 / 32, "chunk_size": 16},
    "jamba-v0.1": {"layers": 0.25, "width": 1 / 64},
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(SMALL))
def test_cache_bytes_equal_real_allocation_at_reduced_size(name, dtype):
    raw = {"name": "t", "models": [{"name": "m", "preset": name, "scale": SMALL[name], "vocab_size": 32}],
           "sweep": {"seq_lens": [8]}}
    spec = experiment_from_dict(raw).models[0]
    model = build_model(spec, dtype=DTYPES[dtype])
    got = _allocated(model, 3, 40, DTYPES[dtype], "cpu")
    assert got == _analytic(arch_from_spec(spec), 3, 40, dtype)
    assert sum(got.values()) > 0
    assert model.num_params() == memcalc.param_count(arch_from_spec(spec))
    assert model.param_bytes() == memcalc.param_count(arch_from_spec(spec)) * DTYPES[dtype].itemsize


@pytest.mark.parametrize("kind", ["attention", "mamba", "mamba2", "hybrid"])
def test_any_seqbench_spec_with_defaults_matches_its_allocation(kind):
    """arch_from_spec resolves defaults (heads, d_state) as build_model does, for the kind size presets too."""
    raw = {"name": "t", "models": [{"name": "m", "kind": kind, "preset": "tiny", "n_kv_heads": 2 if kind == "attention"
                                    else None, "mlp_expand": 2.0}], "sweep": {"seq_lens": [8]}}
    spec = experiment_from_dict(raw).models[0]
    model = build_model(spec)
    assert _allocated(model, 2, 24, torch.float32, "cpu") == _analytic(arch_from_spec(spec), 2, 24, "float32")
    assert model.num_params() == memcalc.param_count(arch_from_spec(spec))


@pytest.mark.parametrize("name", ["llama-3-8b", "mamba-370m", "mamba2-2.7b", "jamba-v0.1"])
def test_params_and_flops_equal_the_models_own_accounting(name):
    """For the layout seqbench builds (dense MLP, untied head), the calculator's parameter count and FLOPs
    equal SeqModel.num_params / prefill_flops / step_flops at full size."""
    spec = ModelSpec(name=name, impl="ref", **model_fields(get_arch(name)))
    model = _meta_model(spec, torch.bfloat16)
    arch = arch_from_spec(spec)
    assert memcalc.param_count(arch) == model.num_params()
    for context in (1, 1000, 4096):
        assert memcalc.prefill_flops(arch, context) == model.prefill_flops(context)
        assert memcalc.decode_flops(arch, context) == model.step_flops(context)


def test_moe_counts_all_experts_in_memory_and_active_ones_in_flops():
    d, ff = 4096, 14336
    mixtral = get_arch("mixtral-8x7b")
    dense = arch_from_spec(ModelSpec(name="d", **model_fields(mixtral)))  # one dense MLP per layer, untied head
    # 32 MoE layers, each 7 more SwiGLUs (3·d·ff) and a router (d·8).
    assert memcalc.param_count(mixtral) - memcalc.param_count(dense) == 32 * (7 * 3 * d * ff + d * 8)
    assert memcalc.param_count(mixtral, active=True) - memcalc.param_count(dense) == 32 * (3 * d * ff + d * 8)
    # Per token: one more expert (6·d·ff) and the router (2·d·8) in each of the 32 layers.
    assert memcalc.decode_flops(mixtral, 4096) - memcalc.decode_flops(dense, 4096) == 32 * (6 * d * ff + 2 * d * 8)
    jamba = get_arch("jamba-v0.1")
    jdense = arch_from_spec(ModelSpec(name="j", **model_fields(jamba)))
    # 16 MoE layers (every other one) of 16 experts, top-2; Jamba's dt/B/C norm scales: 28 Mamba layers × (256+16+16).
    extra = 16 * (15 * 3 * d * ff + d * 16) + 28 * (256 + 2 * 16)
    assert memcalc.param_count(jamba) - memcalc.param_count(jdense) == extra
    assert memcalc.decode_flops(jamba, 1) - memcalc.decode_flops(jdense, 1) == 16 * (6 * d * ff + 2 * d * 16)


# ---- golden values from published figures --------------------------------------------------------------------


def test_llama2_7b_kv_cache_at_4k_is_2_gib_in_fp16():
    # K and V · 32 layers · 4096 positions · 32 heads · 128 head dim · 2 bytes = 2·32·4096·4096·2 = 2^31.
    assert memcalc.kv_cache_bytes(get_arch("llama-2-7b"), 4096, 1, "float16") == 2 * 32 * 4096 * 4096 * 2 == 2 * GiB


def test_jamba_paper_table_1_kv_cache_at_256k_in_16_bit():
    # Lieber et al. 2024, Table 1 ("KV cache (256K context, 16bit)"): LLAMA-2 (6.7B) 128GB, Mistral 32GB,
    # Mixtral 32GB, Jamba 4GB. Per token 2 (K, V) · attention layers · KV heads · 128 · 2 bytes, times 2^18:
    ctx = 256 * 1024
    kv = {n: memcalc.kv_cache_bytes(get_arch(n), ctx, 1, "bfloat16") for n in
          ("llama-2-7b", "mistral-7b", "mixtral-8x7b", "jamba-v0.1", "llama-2-70b")}
    assert kv["llama-2-7b"] == 2 * 32 * 32 * 128 * 2 * ctx == 128 * GiB  # 32 layers, 32 KV heads
    assert kv["mistral-7b"] == 2 * 32 * 8 * 128 * 2 * ctx == 32 * GiB  # 32 layers, 8 KV heads
    assert kv["mixtral-8x7b"] == 2 * 32 * 8 * 128 * 2 * ctx == 32 * GiB
    assert kv["jamba-v0.1"] == 2 * 4 * 8 * 128 * 2 * ctx == 4 * GiB  # 4 attention layers of 32
    assert kv["llama-2-70b"] == 2 * 80 * 8 * 128 * 2 * ctx == 80 * GiB  # not in the table: GQA, 80 layers


def test_ssm_state_does_not_grow_with_context_and_matches_hand_arithmetic():
    m = get_arch("mamba-2.8b")
    # 64 layers · batch 1 · d_inner 5120 · (conv width 4 + d_state 16) · 2 bytes = 13,107,200 bytes = 12.5 MiB.
    for ctx in (1, 4096, 1024**2):
        mem = memcalc.memory(m, ctx, 1, "bfloat16")
        assert mem.kv_cache_bytes == 0 and mem.state_bytes == 64 * 5120 * (4 + 16) * 2 == 13_107_200
    # Mamba-2-2.7B: 64 layers · (conv (5120 + 2·128) · 4 + state 80 heads · 64 · 128) · 2 bytes = 82.6 MiB.
    m2 = memcalc.memory(get_arch("mamba2-2.7b"), 4096, 1, "bfloat16")
    assert m2.state_bytes == 64 * ((5120 + 256) * 4 + 80 * 64 * 128) * 2 == 86_638_592
    # Jamba: 28 Mamba layers · 8192 · (4 + 16) · 2 bytes next to 4 attention layers of KV.
    assert memcalc.memory(get_arch("jamba-v0.1"), 1, 1, "bfloat16").state_bytes == 28 * 8192 * 20 * 2


def test_flops_grow_with_context_for_attention_only():
    llama, mamba = get_arch("llama-2-7b"), get_arch("mamba-2.8b")
    assert memcalc.decode_flops(mamba, 1024) == memcalc.decode_flops(mamba, 256 * 1024)
    # Each cached token adds QK and AV for 32 heads · 128 dims in 32 layers: 4 · 4096 · 32 FLOPs.
    assert memcalc.decode_flops(llama, 1001) - memcalc.decode_flops(llama, 1000) == 4 * 4096 * 32
    # Roughly 2 FLOPs per parameter per token at short context (Kaplan et al. 2020).
    ratio = memcalc.decode_flops(llama, 1) / (2 * memcalc.param_count(llama))
    assert 0.95 < ratio < 1.0  # the embedding table is a lookup, not a matmul


def test_parse_contexts():
    assert memcalc.parse_contexts("4k,32k,128k,256k") == [4096, 32768, 131072, 262144]
    assert memcalc.parse_contexts("4096, 1M,1.5k") == [4096, 1024**2, 1536]
    for bad in ("4q", "0", "1.3k", ""):
        with pytest.raises(ValueError):
            memcalc.parse_contexts(bad)


# ---- commands ---------------------------------------------------------------------------------------------------


@pytest.fixture
def cli():
    from seqbench.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_memory_json_has_exact_bytes(cli):
    result = cli("memory", "--preset", "jamba-v0.1", "-p", "mixtral-8x7b", "--context", "256k", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["preset"]: r for r in json.loads(result.stdout)}
    assert rows["jamba-v0.1"]["kv_cache_bytes"] == 4 * GiB and rows["mixtral-8x7b"]["kv_cache_bytes"] == 32 * GiB
    r = rows["jamba-v0.1"]
    assert r["total_bytes"] == r["param_bytes"] + r["kv_cache_bytes"] + r["conv_state_bytes"] + r["ssm_state_bytes"]
    assert r["param_bytes"] == 2 * r["param_count"]


def test_memory_table_and_batch_scale(cli):
    result = cli("memory", "-p", "llama-2-7b", "-c", "4k", "--dtype", "float16", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "llama-2-7b" in result.stdout and "4 GiB" in result.stdout  # 2 sequences × 2 GiB


def test_memory_plot_writes_an_image(cli, tmp_path):
    path = tmp_path / "mem.png"
    result = cli("memory", "-p", "llama-3-70b,jamba-v0.1,mamba-2.8b", "-c", "1k,256k", "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_flops_json(cli):
    result = cli("flops", "-p", "mamba-2.8b", "-c", "4k,256k", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["context"] for r in rows] == [4096, 262144]
    assert rows[0]["decode_flops_per_token"] == rows[1]["decode_flops_per_token"]


@pytest.mark.parametrize("args, message", [
    (("memory", "-p", "lama-2-7b"), "unknown preset 'lama-2-7b' (did you mean 'llama-2-7b'?)"),
    (("flops", "-p", "jamba", "-p", "mamba-2.8b"), "did you mean 'jamba-v0.1'?"),
    (("memory", "-p", "mamba-2.8b", "-c", "4kk"), "bad context '4kk'"),
    (("memory", "-p", "mamba-2.8b", "--dtype", "bf16"), "did you mean 'bfloat16'?"),
    (("memory", "-p", "mamba-2.8b", "--plot", "mem.xyz"), "use an image suffix such as .png"),
])
def test_bad_arguments_exit_2_with_one_message(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split()) and result.stdout == ""
