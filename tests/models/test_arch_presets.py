"""Published-architecture presets: the shapes, their parameter counts, and scaled-down use in run configs."""

import pytest
import torch

from seqbench.calc.memcalc import param_count
from seqbench.config import ConfigError, ModelSpec
from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model
from seqbench.models.presets import apply_presets
from seqbench.models.published import arch_from_spec, arch_names, find_arch, get_arch, load_presets, model_fields

REQUIRED = ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b", "mixtral-8x7b", "mamba-130m",
            "mamba-370m", "mamba-1.4b", "mamba-2.8b", "mamba2-2.7b", "falcon-mamba-7b", "jamba-v0.1"]


def test_every_required_preset_is_shipped_with_a_source():
    assert set(REQUIRED) <= set(arch_names())
    for p in load_presets().values():
        assert "arXiv:" in p.source and "huggingface.co/" in p.source, p.name
        assert p.published_params, p.name


def test_lookup_by_title_and_did_you_mean():
    assert get_arch("Mamba-2-2.7B").name == "mamba2-2.7b"
    assert find_arch("LLAMA-3-8B").name == "llama-3-8b"
    with pytest.raises(ValueError, match=r"did you mean 'llama-3-70b'\?"):
        get_arch("lama-3-70b")


def test_jamba_layout_matches_the_paper():
    # Jamba section 3: blocks of l = 8 layers, a:m = 1:7, MoE every e = 2 layers, 16 experts, top-2;
    # config.json: attn_layer_offset 4, expert_layer_offset 1, 8 KV heads.
    j = get_arch("jamba-v0.1")
    kinds = j.layer_kinds()
    assert [i for i, k in enumerate(kinds) if k == "attention"] == [4, 12, 20, 28]
    assert [i for i in range(32) if j.moe_layer(i)] == list(range(1, 32, 2))
    assert (j.moe.experts, j.moe.top_k, j.n_kv_heads, j.head_dim, j.d_state) == (16, 2, 8, 128, 16)


def test_shapes_are_self_consistent():
    # Literal values from the model cards' config.json (load_presets itself checks divisibility).
    l70 = get_arch("llama-3-70b")
    assert (l70.n_heads, l70.n_kv_heads, l70.head_dim) == (64, 8, 128)
    assert get_arch("mamba-130m").dt_rank_value == 48 and get_arch("mamba-2.8b").dt_rank_value == 160
    assert get_arch("mamba2-2.7b").mamba2_heads == 80
    assert get_arch("falcon-mamba-7b").dt_rank_value == 256


@pytest.mark.parametrize("name", REQUIRED)
def test_parameter_count_lands_near_the_published_total(name):
    p = get_arch(name)
    assert param_count(p) == pytest.approx(p.published_params, rel=0.03)
    if p.published_active_params:
        assert param_count(p, active=True) == pytest.approx(p.published_active_params, rel=0.03)


def test_exact_parameter_counts_of_checkpoints():
    # Llama-2-7B: embed + head 2·32000·4096 = 262,144,000; per layer attention 4·4096² = 67,108,864,
    # SwiGLU 3·4096·11008 = 135,266,304, two norms 8,192 -> 202,383,360 × 32 = 6,476,267,520; final norm 4,096.
    assert param_count(get_arch("llama-2-7b")) == 262_144_000 + 32 * 202_383_360 + 4096 == 6_738_415_616
    # Mistral-7B: attention 2·4096² + 2·4096·1024 = 41,943,040, SwiGLU 3·4096·14336 = 176,160,768, norms 8,192
    # -> 218,112,000 × 32 = 6,979,584,000; + 262,144,000 + 4,096.
    assert param_count(get_arch("mistral-7b")) == 6_979_584_000 + 262_144_000 + 4096 == 7_241_732_096
    # Llama-3-8B: the same layers, vocab 128256: 2·128256·4096 = 1,050,673,152.
    assert param_count(get_arch("llama-3-8b")) == 6_979_584_000 + 1_050_673_152 + 4096 == 8_030_261_248
    # Mixtral-8x7B: per layer 41,943,040 + 8·176,160,768 + router 4096·8 + norms 8,192 = 1,451,270,144.
    assert param_count(get_arch("mixtral-8x7b")) == 32 * 1_451_270_144 + 262_144_000 + 4096 == 46_702_792_704


def test_model_fields_build_the_same_layout():
    j = get_arch("jamba-v0.1")
    spec = ModelSpec(name="j", **model_fields(j))
    assert spec.layer_kinds() == j.layer_kinds()
    assert round(spec.mlp_expand * spec.d_model) == 14336  # one expert's size (config.json) as the dense MLP
    back = arch_from_spec(spec)
    assert (back.layout, back.n_kv_heads, back.head_dim, back.d_state, back.moe) == ("MMMMAMMM", 8, 128, 16, None)


def _raw(model: dict) -> dict:
    return {"name": "t", "models": [model], "sweep": {"seq_lens": [16]}}


SCALED = {
    "llama-3-8b": {"layers": 1 / 16, "width": 1 / 32},
    "mixtral-8x7b": {"n_layers": 2, "d_model": 128, "n_heads": 4, "n_kv_heads": 1},
    "mamba-130m": {"layers": 1 / 12, "width": 1 / 12},
    "falcon-mamba-7b": {"n_layers": 2, "d_model": 64},
    "mamba2-2.7b": {"layers": 1 / 32, "width": 1 / 32, "chunk_size": 16},
    "jamba-v0.1": {"layers": 0.25, "width": 1 / 64},
}


@pytest.mark.parametrize("name", list(SCALED))
def test_scaled_presets_validate_and_build_at_tiny_size(name):
    exp = experiment_from_dict(_raw({"name": "mini", "preset": name, "scale": SCALED[name], "vocab_size": 64}))
    spec = exp.models[0]
    arch = get_arch(name)
    assert spec.kind == arch.kind and spec.vocab_size == 64
    assert spec.layer_kinds() == [k for k in arch.layer_kinds()][: spec.n_layers]  # the layout survives
    torch.manual_seed(0)
    model = build_model(spec)
    tokens = torch.randint(0, 64, (1, 12))
    logits = model(tokens)
    assert logits.shape == (1, 12, 64) and torch.isfinite(logits).all()
    assert model.num_params() == param_count(arch_from_spec(spec))


def test_scaled_jamba_keeps_one_attention_layer_per_block_and_the_head_counts():
    spec = experiment_from_dict(_raw({"name": "jm", "preset": "jamba-v0.1", "scale": {"layers": 0.5, "width": 0.0625},
                                      "vocab_size": 256})).models[0]
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads) == (16, 256, 32, 8)
    assert [i for i, k in enumerate(spec.layer_kinds()) if k == "attention"] == [4, 12]
    assert spec.mlp_expand == 3.5  # dense MLP of one expert's size; MoE is not built


def test_fields_outside_scale_win_and_scale_never_reaches_modelspec():
    out = apply_presets(_raw({"name": "m", "preset": "mamba-2.8b", "scale": {"n_layers": 4}, "n_layers": 2}))
    model = out["models"][0]
    assert "scale" not in model and model["n_layers"] == 2 and model["kind"] == "mamba" and model["d_model"] == 2560


BAD = {
    "bad factor": ({"preset": "jamba-v0.1", "scale": {"width": 0.3}},
                   "models[0].scale.width: d_model 4096 × 0.3 = 1228.8 is not a positive whole number"),
    "layout broken": ({"preset": "jamba-v0.1", "scale": {"layers": 0.125}},
                      "models[0].scale.layers: 4 layers is not a whole number of 8-layer blocks"),
    "unknown scale key": ({"preset": "llama-2-7b", "scale": {"widht": 0.5}},
                          "models[0].scale: unknown key 'widht' (did you mean 'width'?)"),
    "unknown preset": ({"preset": "jamba-v1"}, "models[0].preset: unknown architecture preset 'jamba-v1' "
                                                "(did you mean 'jamba-v0.1'?)"),
    "kind clash": ({"kind": "mamba", "preset": "llama-2-7b"}, "models[0].kind: preset 'llama-2-7b' is a 'attention'"),
    "scale on size preset": ({"kind": "mamba", "preset": "small", "scale": {"layers": 0.5}},
                             "models[0].scale: applies to published-architecture presets"),
    "scale without preset": ({"kind": "mamba", "scale": {"layers": 0.5}}, "models[0].scale: needs a published"),
    "non-integer size": ({"preset": "llama-2-7b", "scale": {"n_layers": 2.5}},
                         "models[0].scale.n_layers: must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_scaled_presets_name_the_key(case):
    model, message = BAD[case]
    with pytest.raises(ConfigError) as info:
        experiment_from_dict(_raw({"name": "x", **model}), source="exp.yaml")
    assert f"exp.yaml: {message}" in str(info.value)


def test_explicit_sizes_in_scale_override_the_width_factor():
    # width 0.1 alone fails (headdim 64 × 0.1 = 6.4); an explicit headdim in the same scale takes its place.
    spec = experiment_from_dict(_raw({"name": "m2", "preset": "mamba2-2.7b", "vocab_size": 64,
                                      "scale": {"layers": 1 / 32, "width": 0.1, "headdim": 16}})).models[0]
    assert (spec.n_layers, spec.d_model, spec.headdim, spec.d_state) == (2, 256, 16, 128)
    with pytest.raises(ConfigError, match=r"scale.width: Mamba-2 headdim 64 × 0.1 = 6.4"):
        experiment_from_dict(_raw({"name": "m2", "preset": "mamba2-2.7b", "scale": {"width": 0.1}}))
