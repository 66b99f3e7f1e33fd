"""(b) seqbench's Mamba / Mamba2 and mamba_ssm's own modules load each other's state_dicts (strict=True) and
compute the same forward and the same decode steps; (a) at model level: every kind built with the fast kernels
gives what the reference build gives, including the auto fallback of a continued prefill."""

from __future__ import annotations

import pytest
import torch

from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model
from seqbench.models.mamba import Mamba
from seqbench.models.mamba2 import Mamba2

MAMBA = dict(d_model=32, d_state=8)
MAMBA2 = dict(d_model=64, d_state=16, headdim=16, ngroups=2, chunk_size=16)  # 8 heads: their conv input is 8-aligned


def _theirs(kind: str):
    if kind == "mamba":
        from mamba_ssm.modules.mamba_simple import Mamba as Theirs

        return Theirs(**MAMBA, use_fast_path=False, layer_idx=0)  # the fused path has no CPU reference
    from mamba_ssm.modules.mamba2 import Mamba2 as Theirs

    return Theirs(**MAMBA2, use_mem_eff_path=False, layer_idx=0)


def _ours(kind: str, impl: str):
    return Mamba(**MAMBA, impl=impl) if kind == "mamba" else Mamba2(**MAMBA2, impl=impl)


@pytest.mark.parametrize("impl", ["ref", "fast"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_state_dicts_load_both_ways_and_the_layers_agree(libs, kind, impl):
    from mamba_ssm.utils.generation import InferenceParams

    torch.manual_seed(0)
    theirs, ours = _theirs(kind).eval(), _ours(kind, impl).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.manual_seed(1)
    _ours(kind, impl).load_state_dict(ours.state_dict(), strict=True)  # and ours has exactly their keys
    theirs.load_state_dict(_ours(kind, impl).state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    b, l, steps = 2, 20, 4
    x = torch.randn(b, l + steps, ours.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:, :l]), theirs(x[:, :l]), rtol=1e-4, atol=1e-4)
        # prefill with a cache, then step: outputs and both states agree after every step
        params = InferenceParams(max_seqlen=l + steps, max_batch_size=b)
        theirs_state = theirs.allocate_inference_cache(b, l + steps)
        params.key_value_memory_dict[0] = theirs_state
        cache = ours.allocate_cache(b, l + steps, torch.float32, "cpu")
        torch.testing.assert_close(ours(x[:, :l], cache), theirs(x[:, :l], inference_params=params),
                                   rtol=1e-4, atol=1e-4)
        for i in range(l, l + steps):
            y_theirs, *_ = theirs.step(x[:, i : i + 1], *theirs_state)
            torch.testing.assert_close(ours.step(x[:, i : i + 1], cache, i), y_theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache["conv_state"], theirs_state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache["ssm_state"], theirs_state[1], rtol=1e-4, atol=1e-4)


SPECS = {
    "mamba": {"kind": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8},
    "mamba2": {"kind": "mamba2", "d_model": 64, "n_layers": 2, "d_state": 16, "headdim": 32, "chunk_size": 16},
    "attention": {"kind": "attention", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
    "hybrid": {"kind": "hybrid", "d_model": 64, "n_layers": 4, "n_heads": 4, "d_state": 16, "headdim": 32,
               "chunk_size": 16, "layout": "MDSA"},
}


def _model(name: str, impl: str, dtype: torch.dtype):
    spec = experiment_from_dict({"name": "t", "models": [{"name": name, **SPECS[name], "impl": impl}],
                                 "sweep": {"seq_lens": [8]}}).models[0]
    torch.manual_seed(0)
    return build_model(spec, dtype=dtype).eval()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fast_build_equals_reference_build(libs, name):
    """Prefill, chunked prefill (auto) and decode of the fast build against the reference build. The Mamba-2
    here has 4 heads, so its in_proj rows are not 8-aligned: the conv input layout fix is exercised."""
    dtype = torch.bfloat16 if name in ("attention", "hybrid") else torch.float32  # flash_attn: half precision only
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    ref, quick = _model(name, "ref", dtype), _model(name, "auto", dtype)
    assert "torch" not in quick.impl_used().replace("torch-fft", ""), quick.impl_used()  # S4D has no fast kernel
    toks = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(quick.prefill(toks[:, :32]).float(), ref.prefill(toks[:, :32]).float(), **tol)
        chunked = quick.prefill(toks[:, :32], chunk_len=12).float()
        torch.testing.assert_close(chunked, ref.prefill(toks[:, :32]).float(), **tol)
        caches = [m.allocate_cache(2, 40) for m in (quick, ref)]
        for m, c in zip((quick, ref), caches, strict=True):
            m.prefill(toks[:, :32], c)
        for i in range(32, 40):
            torch.testing.assert_close(quick.step(toks[:, i : i + 1], caches[0]).float(),
                                       ref.step(toks[:, i : i + 1], caches[1]).float(), **tol)


def test_mamba_continued_prefill_falls_back_under_auto_and_says_so(libs):
    model = _model("mamba", "auto", torch.float32)
    toks = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.prefill(toks)
        assert model.impl_used() == "causal_conv1d-cuda+mamba_ssm-cuda+mamba_ssm-triton"
        model.prefill(toks, chunk_len=10)
        assert model.impl_used() == "causal_conv1d-cuda+mamba_ssm-cuda+torch-chunked+mamba_ssm-triton"
        model.prefill(toks)  # the next point starts a fresh sequence: the label follows what ran
        assert "torch-chunked" not in model.impl_used()


def test_mamba_fast_refuses_a_continued_prefill(libs):
    model = _model("mamba", "fast", torch.float32)
    toks = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), pytest.raises(ValueError, match="initial state"):
        model.prefill(toks, chunk_len=10)
