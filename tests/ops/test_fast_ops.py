"""Fast CUDA adapters: clear errors where they cannot run (CPU tests) and parity with the references (CUDA)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from seqbench.ops import KernelUnavailable, fast, get

PACKAGE = {
    "attention": "flash_attn", "attention_kvcache": "flash_attn", "causal_conv1d": "causal_conv1d", "causal_conv1d_update": "causal_conv1d",
    "selective_scan": "mamba_ssm", "selective_state_update": "mamba_ssm", "ssd": "mamba_ssm",
}


@pytest.mark.parametrize("op", list(PACKAGE))
def test_fast_without_package_names_the_install_command(op, monkeypatch):
    find_spec = importlib.util.find_spec  # the contract tests install the packages: hide this one
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE[op] else find_spec(name, *a))
    with pytest.raises(KernelUnavailable, match=r"pip install 'seqbench\[cuda\]'") as info:
        get(op, "fast")
    assert PACKAGE[op] in str(info.value)
    assert fast.unavailable_reason(op) == f"{PACKAGE[op]} is not installed: pip install 'seqbench[cuda]'"


@pytest.mark.parametrize("op", list(PACKAGE))
def test_auto_on_cpu_is_the_reference(op):
    _, label = get(op, "auto", "cpu")
    assert label.startswith("torch")


def test_unknown_op_has_a_reason():
    assert "no fast kernel" in fast.unavailable_reason("fft_conv")


def test_arguments_a_kernel_cannot_honour_are_refused_before_any_import():
    u = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="initial state"):
        fast.selective_scan(u, u, torch.zeros(2, 4), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3),
                            initial_state=torch.zeros(1, 2, 4))
    q = torch.zeros(1, 3, 2, 8)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        fast.flash_attention(q, q, q, causal=True)


# ---- parity on CUDA (skipped without a device and the kernels) ---------------------------------------------

def _both(op):
    reason = fast.unavailable_reason(op)
    if reason is not None:
        pytest.skip(reason)
    return get(op, "fast", "cuda")[0], get(op, "ref", "cuda")[0]


def _g(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selective_scan_parity(batch, groups):
    fast_fn, ref_fn = _both("selective_scan")
    g, d, n, l = _g(), 64, 16, 300
    u, z = torch.randn(batch, d, l, device="cuda", generator=g), torch.randn(batch, d, l, device="cuda", generator=g)
    delta = torch.randn(batch, d, l, device="cuda", generator=g)
    A = -torch.rand(d, n, device="cuda", generator=g) * 4
    shape = (batch, groups, n, l) if groups else (batch, n, l)
    B, C = torch.randn(shape, device="cuda", generator=g), torch.randn(shape, device="cuda", generator=g)
    D, bias = torch.randn(d, device="cuda", generator=g), torch.randn(d, device="cuda", generator=g)
    y1, h1 = fast_fn(u, delta, A, B, C, D, z, bias, True, return_final_state=True)
    y2, h2 = ref_fn(u, delta, A, B, C, D, z, bias, True, return_final_state=True)
    torch.testing.assert_close(y1, y2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h1.float(), h2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selective_state_update_parity(layout):
    fast_fn, ref_fn = _both("selective_state_update")
    g, b, n = _g(1), 3, 16
    if layout == "mamba1":
        d = 64
        state, x = torch.randn(b, d, n, device="cuda", generator=g), torch.randn(b, d, device="cuda", generator=g)
        A, B = -torch.rand(d, n, device="cuda", generator=g), torch.randn(b, n, device="cuda", generator=g)
        D = torch.randn(d, device="cuda", generator=g)
    else:
        h, p = 4, 16
        state = torch.randn(b, h, p, n, device="cuda", generator=g)
        x = torch.randn(b, h, p, device="cuda", generator=g)
        A, B = -torch.rand(h, p, n, device="cuda", generator=g), torch.randn(b, 2, n, device="cuda", generator=g)
        D = torch.randn(h, p, device="cuda", generator=g)
    C, dt, z = torch.randn_like(B), torch.randn_like(x), torch.randn_like(x)
    s1, s2 = state.clone(), state.clone()
    y1 = fast_fn(s1, x, dt, A, B, C, D, z, dt_bias=D.abs(), dt_softplus=True)
    y2 = ref_fn(s2, x, dt, A, B, C, D, z, dt_bias=D.abs(), dt_softplus=True)
    torch.testing.assert_close(y1, y2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s1, s2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_causal_conv1d_parity(with_state):
    fast_fn, ref_fn = _both("causal_conv1d")
    g = _g(2)
    x, w = torch.randn(2, 64, 50, device="cuda", generator=g), torch.randn(64, 4, device="cuda", generator=g)
    bias = torch.randn(64, device="cuda", generator=g)
    init = torch.randn(2, 64, 4, device="cuda", generator=g) if with_state else None
    torch.testing.assert_close(
        fast_fn(x, w, bias, "silu", init), ref_fn(x, w, bias, "silu", init), rtol=1e-4, atol=1e-4
    )
    up_fast, up_ref = _both("causal_conv1d_update")
    s1 = torch.randn(2, 64, 4, device="cuda", generator=g)
    s2 = s1.clone()
    torch.testing.assert_close(up_fast(x[..., 0], s1, w, bias, "silu"), up_ref(x[..., 0], s2, w, bias, "silu"))
    torch.testing.assert_close(s1, s2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ssd_parity():
    fast_fn, ref_fn = _both("ssd")
    g, b, l, h, p, gr, n = _g(3), 2, 200, 4, 16, 2, 32
    x = torch.randn(b, l, h, p, device="cuda", generator=g)
    dt = torch.randn(b, l, h, device="cuda", generator=g)
    A = -torch.rand(h, device="cuda", generator=g) * 4
    B, C = (torch.randn(b, l, gr, n, device="cuda", generator=g) for _ in range(2))
    D, bias = torch.randn(h, device="cuda", generator=g), torch.randn(h, device="cuda", generator=g)
    z, h0 = torch.randn_like(x), torch.randn(b, h, p, n, device="cuda", generator=g)
    kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, initial_states=h0, return_final_states=True)
    y1, f1 = fast_fn(x, dt, A, B, C, 64, **kw)
    y2, f2 = ref_fn(x, dt, A, B, C, 64, **kw)
    torch.testing.assert_close(y1, y2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(f1.float(), f2.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_parity(kv_heads):
    fast_fn, ref_fn = _both("attention")
    g = _g(4)
    q = torch.randn(2, 40, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 100, kv_heads, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(fast_fn(q, k, v, causal=True), ref_fn(q, k, v, causal=True), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mamba_layer_fast_equals_ref():
    if any(fast.unavailable_reason(op) for op in ("selective_scan", "causal_conv1d", "selective_state_update")):
        pytest.skip("mamba_ssm / causal_conv1d not usable")
    from seqbench.models.mamba import Mamba

    torch.manual_seed(0)
    ref = Mamba(64, impl="ref", device="cuda")
    quick = Mamba(64, impl="fast", device="cuda")
    quick.load_state_dict(ref.state_dict())
    assert quick.impl_used != ref.impl_used
    x = torch.randn(2, 100, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(quick(x), ref(x), rtol=1e-3, atol=1e-3)
