"""(a) seqbench's fast adapters, called exactly as on a GPU, give what seqbench's references give.

The libraries' kernels run as their own references here (see conftest.py); what is checked is seqbench's side
of the contract: argument order and names, layouts, dtypes, in-place state updates and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from seqbench.ops import attn, conv, fast, get, scan, ssd, state_update


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("groups", [0, 2])
def test_selective_scan(libs, groups):
    g, b, d, n, l = _g(0), 2, 16, 8, 40
    u, z, delta = (torch.randn(b, d, l, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) * 4
    shape = (b, groups, n, l) if groups else (b, n, l)
    B, C = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y1, h1 = fast.selective_scan(u, delta, A, B, C, D, z, bias, True, return_final_state=True)
    y2, h2 = scan.selective_scan(u, delta, A, B, C, D, z, bias, True, return_final_state=True)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h1.float(), h2, rtol=1e-4, atol=1e-4)
    assert len(libs.calls["selective_scan_fn"]) == 1


def test_selective_scan_refuses_an_initial_state(libs):
    u = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="initial state"):
        fast.selective_scan(u, u, torch.zeros(2, 4), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3),
                            initial_state=torch.zeros(1, 2, 4))
    assert "selective_scan_fn" not in libs.calls


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_selective_state_update(libs, layout):
    g, b, n = _g(1), 3, 8
    if layout == "mamba1":
        d = 16
        state, x = torch.randn(b, d, n, generator=g), torch.randn(b, d, generator=g)
        A, B, D = -torch.rand(d, n, generator=g), torch.randn(b, n, generator=g), torch.randn(d, generator=g)
    else:
        h, p = 4, 8
        state, x = torch.randn(b, h, p, n, generator=g), torch.randn(b, h, p, generator=g)
        A, B, D = -torch.rand(h, p, n, generator=g), torch.randn(b, 2, n, generator=g), torch.randn(h, p, generator=g)
    C, dt, z = torch.randn_like(B), torch.randn_like(x), torch.randn_like(x)
    s1, s2 = state.clone(), state.clone()
    y1 = fast.selective_state_update(s1, x, dt, A, B, C, D, z, dt_bias=D.abs(), dt_softplus=True)
    y2 = state_update.selective_state_update(s2, x, dt, A, B, C, D, z, dt_bias=D.abs(), dt_softplus=True)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)  # both update the state in place


def _channel_last_slice(b: int, d: int, l: int, row: int, g: torch.Generator) -> torch.Tensor:
    """(b, d, l) with stride 1 along d, cut from rows of width ``row``: how Mamba-2 hands over in_proj's output."""
    return torch.randn(b, l, row, generator=g)[..., :d].transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "channel-last, row 296", "channel-last, row 292"])
def test_causal_conv1d_without_state(libs, layout):
    g, d = _g(2), 24
    x = {"contiguous": lambda: torch.randn(2, d, 30, generator=g),
         "channel-last, row 296": lambda: _channel_last_slice(2, d, 30, 296, g),
         "channel-last, row 292": lambda: _channel_last_slice(2, d, 30, 292, g)}[layout]()  # 292: strides % 8 != 0
    w, bias = torch.randn(d, 4, generator=g), torch.randn(d, generator=g)
    torch.testing.assert_close(fast.causal_conv1d(x, w, bias, "silu"), conv.causal_conv1d(x, w, bias, "silu"))


def test_the_kernel_stub_rejects_what_the_cuda_kernel_rejects(libs):
    """The layout check is real: the unfixed call (a channel-last slice with strides % 8 != 0) fails."""
    from causal_conv1d import causal_conv1d_fn

    g = _g(3)
    x, w = _channel_last_slice(2, 24, 30, 292, g), torch.randn(24, 4, generator=g)
    with pytest.raises(Exception, match="multiples of 8"):
        causal_conv1d_fn(x, w, None, activation="silu")


@pytest.mark.parametrize("state_width", [3, 4])
def test_causal_conv1d_with_state(libs, state_width):
    g, d = _g(4), 24
    x, w, bias = torch.randn(2, d, 30, generator=g), torch.randn(d, 4, generator=g), torch.randn(d, generator=g)
    init = torch.randn(2, d, state_width, generator=g)  # seqbench's cache holds w columns; the kernel takes w-1
    torch.testing.assert_close(fast.causal_conv1d(x, w, bias, "silu", init), conv.causal_conv1d(x, w, bias, "silu", init))


def test_causal_conv1d_with_state_needs_channels_divisible_by_8(libs):
    g = _g(5)
    x, w = torch.randn(1, 12, 9, generator=g), torch.randn(12, 4, generator=g)
    with pytest.raises(ValueError, match="% 8"):
        fast.causal_conv1d(x, w, None, "silu", torch.zeros(1, 12, 4))


def test_causal_conv1d_update(libs):
    g, d = _g(6), 24
    x, w, bias = torch.randn(2, d, generator=g), torch.randn(d, 4, generator=g), torch.randn(d, generator=g)
    s1 = torch.randn(2, d, 4, generator=g)
    s2 = s1.clone()
    torch.testing.assert_close(fast.causal_conv1d_update(x, s1, w, bias, "silu"),
                               conv.causal_conv1d_update(x, s2, w, bias, "silu"))
    torch.testing.assert_close(s1, s2)


@pytest.mark.parametrize("with_state", [False, True])
def test_ssd(libs, with_state):
    g, b, l, h, p, gr, n = _g(7), 2, 45, 4, 8, 2, 16  # l is not a multiple of the chunk
    x, dt = torch.randn(b, l, h, p, generator=g), torch.randn(b, l, h, generator=g)
    A = -torch.rand(h, generator=g) * 4
    B, C = (torch.randn(b, l, gr, n, generator=g) for _ in range(2))
    D, bias, z = torch.randn(h, generator=g), torch.randn(h, generator=g), torch.randn_like(x)
    h0 = torch.randn(b, h, p, n, generator=g) if with_state else None
    kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, initial_states=h0, return_final_states=True)
    y1, f1 = fast.ssd(x, dt, A, B, C, 16, **kw)
    y2, f2 = ssd.ssd(x, dt, A, B, C, 16, **kw)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f1.float(), f2.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_attention(libs, kv_heads):
    g = _g(8)
    q = torch.randn(2, 12, 4, 16, generator=g).bfloat16()
    k, v = (torch.randn(2, 20, kv_heads, 16, generator=g).bfloat16() for _ in range(2))
    torch.testing.assert_close(fast.flash_attention(q, k, v, causal=True), attn.attention(q, k, v, causal=True),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("position", ["int", "tensor"])
def test_flash_attention_kvcache_appends_in_place(libs, position):
    g, b, L, pos = _g(9), 2, 24, 10
    q = torch.randn(b, 1, 4, 16, generator=g).bfloat16()
    k, v = (torch.randn(b, 1, 2, 16, generator=g).bfloat16() for _ in range(2))
    caches = [torch.randn(b, L, 2, 16, generator=g).bfloat16() for _ in range(2)]
    fast_caches, ref_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    at = pos if position == "int" else torch.tensor([pos])
    y1 = fast.flash_attention_kvcache(q, *fast_caches, k, v, at)
    y2 = attn.attention_kvcache(q, *ref_caches, k, v, at)
    torch.testing.assert_close(y1, y2, rtol=2e-2, atol=2e-2)
    for a, r in zip(fast_caches, ref_caches, strict=True):
        torch.testing.assert_close(a, r)  # position pos written, nothing else touched
    assert torch.equal(fast_caches[0][:, pos], k[:, 0])


def test_auto_picks_flash_attn_only_in_half_precision(libs):
    assert get("attention", "auto", "cuda", torch.float32)[1] == "torch-sdpa"
    assert get("attention", "auto", "cuda", torch.bfloat16)[1] == "flash_attn-cuda"
    assert get("attention_kvcache", "auto", "cuda", torch.float16)[1] == "flash_attn-cuda"


def test_gpu_check_parity_passes_against_the_libraries_references(libs):
    """`seqbench gpu-check`'s parity table, run on the CPU with the references standing in for the kernels:
    every case must reach a real comparison and pass, so on a GPU a FAIL means the kernel, not the check."""
    from seqbench.run.gpu_check import kernel_parity

    results = kernel_parity("cpu")
    assert {r.op for r in results} == {"selective_scan", "selective_state_update", "ssd", "causal_conv1d",
                                       "causal_conv1d_update", "attention", "attention_kvcache"}
    assert [r.line() for r in results if not r.ok] == []
