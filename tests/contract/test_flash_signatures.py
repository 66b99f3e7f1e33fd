"""(c) Every call seqbench makes to flash_attn binds to the installed functions' signatures.

The routed functions bind each call with inspect.signature(real).bind before computing, so a renamed or
misplaced argument raises TypeError here as it would on a GPU."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model
from seqbench.ops import fast


def _flash_names_seqbench_imports() -> set[str]:
    tree = ast.parse(inspect.getsource(fast))
    return {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "flash_attn"
            for a in node.names}


def test_every_flash_attn_call_of_an_attention_model_binds(libs):
    spec = experiment_from_dict({"name": "t", "sweep": {"seq_lens": [8]}, "models": [
        {"name": "a", "kind": "attention", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}]}).models[0]
    model = build_model(spec, dtype=torch.bfloat16).eval()
    assert model.impl_used() == "flash_attn-cuda"
    toks = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.prefill(toks[:, :16])  # flash_attn_func, square causal
        cache = model.allocate_cache(2, 24)
        model.prefill(toks[:, :16], cache, chunk_len=6)  # flash_attn_func over the cache, bottom-right mask
        model.step(toks[:, 16:17], cache)  # flash_attn_with_kvcache, int position
        model.step_at(toks[:, 17:18], cache, torch.tensor([17]))  # ... device-tensor position (CUDA graph form)
    called = set(libs.calls)
    assert _flash_names_seqbench_imports() == {"flash_attn_func", "flash_attn_with_kvcache"}
    assert _flash_names_seqbench_imports() <= called
    kvcache_calls = libs.calls["flash_attn_with_kvcache"]
    assert [c.arguments["cache_seqlens"] if isinstance(c.arguments["cache_seqlens"], int)
            else c.arguments["cache_seqlens"].tolist() for c in kvcache_calls] == [16, 16, [17, 17], [17, 17]]  # 2 layers
    assert all(c.arguments["causal"] is True for c in libs.calls["flash_attn_func"] + kvcache_calls)


def test_a_call_the_real_signature_rejects_fails(libs):
    import flash_attn

    q = torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        flash_attn.flash_attn_with_kvcache(q, q, q, seqlens=3)  # the real parameter is cache_seqlens
