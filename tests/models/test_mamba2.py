"""The Mamba-2 mixer: mamba_ssm parameter layout, Hugging Face parity, decode and chunked-prefill parity,
causality, cache size, d_state 128, gradients and bfloat16."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from seqbench.models.mamba2 import Mamba2
from seqbench.ops import KernelUnavailable
from seqbench.ops.ssd import block_len

D_MODEL = 32


def make(seed=0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    kw = {"d_state": 16, "headdim": 8, "chunk_size": 8, **kw}
    return Mamba2(D_MODEL, impl="ref", **kw).eval()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_parameter_names_and_shapes_are_mamba_ssm():
    m = make(ngroups=2)
    d_inner, n, g, w = 2 * D_MODEL, 16, 2, 4
    h = d_inner // 8
    conv_dim = d_inner + 2 * g * n
    expected = {
        "in_proj.weight": (2 * d_inner + 2 * g * n + h, D_MODEL),
        "conv1d.weight": (conv_dim, 1, w),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (h,),
        "A_log": (h,),
        "D": (h,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (D_MODEL, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert make(D_has_hdim=True).D.shape == (d_inner,)
    assert "norm.weight" not in make(rmsnorm=False).state_dict()
    assert set(make(bias=True).state_dict()) >= {"in_proj.bias", "out_proj.bias"}


def test_initialisation_scheme():
    m = make(headdim=4, dt_min=0.01, dt_max=0.05)
    A = -torch.exp(m.A_log)
    assert ((A <= -1) & (A >= -16)).all() and A.unique().numel() > 1
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    assert (m.D == 1).all() and (m.norm.weight == 1).all()


def _hf_mixer(m: Mamba2, chunk_size: int):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = transformers.Mamba2Config(
        hidden_size=D_MODEL,
        num_heads=m.nheads,
        head_dim=m.headdim,
        state_size=m.d_state,
        n_groups=m.ngroups,
        expand=2,
        conv_kernel=m.d_conv,
        chunk_size=chunk_size,
        num_hidden_layers=1,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
    )
    torch.manual_seed(123)  # HF draws its own init; it must be overwritten by the loaded weights
    return Mamba2Mixer(cfg, layer_idx=0).eval()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_huggingface_mamba2mixer_parity(batch, ngroups):
    """Same state_dict loaded strict=True both ways; HF's pure-torch path computes the same function
    (also with a different chunk size: chunking is an implementation detail)."""
    m = make(ngroups=ngroups)
    with torch.no_grad():  # make every parameter non-trivial so a mis-wired one cannot hide
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
    x = randn(batch, 29, D_MODEL)
    for hf_chunk in (8, 16):
        hf = _hf_mixer(m, hf_chunk)
        hf.load_state_dict(m.state_dict(), strict=True)
        back = make(seed=7, ngroups=ngroups)
        back.load_state_dict(hf.state_dict(), strict=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y_hf = hf(x)
            y, y_back = m(x), back(x)
        torch.testing.assert_close(y, y_hf, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_back, y, rtol=0, atol=0)


VARIANTS = {
    "default": {},
    "groups": {"ngroups": 2},
    "no_rmsnorm_z_in_scan": {"rmsnorm": False},
    "norm_before_gate_D_hdim": {"norm_before_gate": True, "D_has_hdim": True},
    "d_ssm_mlp_path": {"d_ssm": 32},
    "dt_limit": {"dt_limit": (0.01, 0.05)},
    "d_state_128": {"d_state": 128, "headdim": 16},
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_parity(variant, batch):
    """Full forward == prefill of t tokens then one step per token (tight float32 tolerance)."""
    m = make(**VARIANTS[variant])
    x, t = randn(batch, 21, D_MODEL), 10
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_cache(batch, 21, torch.float32, "cpu")
        outs = [m(x[:, :t], cache)]
        outs += [m.step(x[:, i : i + 1], cache, i) for i in range(t, 21)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("piece", [1, 3, 7, 16])
def test_chunked_prefill_with_start_equals_one_forward(batch, piece):
    """Feeding the prompt in pieces (forward with cache and start > 0), including pieces shorter than the
    conv width, gives the one-forward outputs; a later start=0 prefill on the same cache starts afresh."""
    m = make(ngroups=2)
    x = randn(batch, 37, D_MODEL)
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_cache(batch, 37, torch.float32, "cpu")
        outs = [m(x[:, s : s + piece], cache, s) for s in range(0, 37, piece)]
        torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)
        state_after = {k: v.clone() for k, v in cache.items()}
        cache2 = m.allocate_cache(batch, 37, torch.float32, "cpu")
        m(x, cache2)
        for k in cache:
            torch.testing.assert_close(cache2[k], state_after[k], rtol=1e-4, atol=1e-5)
        # Reused cache, new sequence shorter than the conv width, then decode: nothing of the old one leaks.
        again = [m(x[:, :2], cache, 0)] + [m.step(x[:, i : i + 1], cache, i) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat(again, dim=1), full[:, :6], rtol=1e-4, atol=1e-5)


def test_dt_limit_clamps_delta_in_forward_and_step():
    """With dt_limit = (c, c) every Δ is c: the dt rows of in_proj no longer matter (they do without a limit)."""
    x = randn(2, 13, D_MODEL)
    outs = {}
    for limit in ((0.03, 0.03), (0.0, float("inf"))):
        m = make(dt_limit=limit)
        with torch.no_grad():
            y1 = m(x)
            m.in_proj.weight[-m.nheads :] += 3.0  # the rows that project dt
            cache = m.allocate_cache(2, 13, torch.float32, "cpu")
            y2 = torch.cat([m(x[:, :6], cache)] + [m.step(x[:, i : i + 1], cache, i) for i in range(6, 13)], dim=1)
        outs[limit] = (y1, y2)
    torch.testing.assert_close(*outs[(0.03, 0.03)], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(*outs[(0.0, float("inf"))], rtol=1e-3, atol=1e-3)


def test_start_without_cache_is_an_error():
    with pytest.raises(ValueError, match="cache"):
        make()(randn(1, 4, D_MODEL), None, 4)


@pytest.mark.parametrize("batch", [1, 3])
def test_causality(batch):
    m = make(ngroups=2)
    x, t = randn(batch, 30, D_MODEL), 12
    changed = x.clone()
    changed[:, t + 1 :] += randn(batch, 30 - t - 1, D_MODEL, seed=5)
    with torch.no_grad():
        a, b = m(x), m(changed)
    # The reference's split decay mask scales a whole block by half its total log-decay, so the rounding (not
    # the math) of position i may depend on later Δ in its block: ~1e-7 here, where a real leak is O(1).
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_is_the_state_shapes_and_constant_in_length(dtype):
    m = make(ngroups=2)
    conv_dim = 2 * D_MODEL + 2 * 2 * 16
    for max_len in (16, 1 << 20):
        cache = m.allocate_cache(3, max_len, dtype, "cpu")
        assert set(cache) == {"conv_state", "ssm_state"}
        assert cache["conv_state"].shape == (3, conv_dim, 4)
        assert cache["ssm_state"].shape == (3, m.nheads, 8, 16)
        assert all(v.dtype == dtype for v in cache.values())
        nbytes = sum(v.numel() * v.element_size() for v in cache.values())
        assert nbytes == 3 * (conv_dim * 4 + m.nheads * 8 * 16) * torch.finfo(dtype).bits // 8


def test_gradients_reach_every_parameter():
    m = make(ngroups=2).train()
    x = randn(2, 19, D_MODEL).requires_grad_()
    m(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bfloat16_runs_and_tracks_float32():
    m32 = make(ngroups=2)
    m16 = make(ngroups=2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    for p32, p16 in zip(m32.parameters(), m16.parameters(), strict=True):  # same seed, same draws in either dtype
        torch.testing.assert_close(p16.float(), p32, rtol=1e-2, atol=1e-2)
    x = randn(2, 21, D_MODEL)
    with torch.no_grad():
        ref = m32(x)
        low = m16(x.bfloat16())
        cache = m16.allocate_cache(2, 22, torch.bfloat16, "cpu")
        m16(x[:, :20].bfloat16(), cache)
        step = m16.step(x[:, 20:21].bfloat16(), cache, 20)
    assert low.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (low.float() - ref).abs().max() < 0.05 * scale
    assert (step.float() - ref[:, 20:21]).abs().max() < 0.05 * scale


def test_flop_counts():
    m = make()
    assert m.step_flops(10) == m.step_flops(10_000) > 0
    long = block_len(10_000, m.nheads, m.headdim, m.ngroups, m.d_state)
    assert m.prefill_flops(8 * long) == 2 * m.prefill_flops(4 * long)  # linear in l at whole blocks
    # the reference never pads: its blocks cover exactly l, and within each blocking regime (one block up to
    # `single` positions, blocks of `long` beyond) every extra position costs
    assert all(sum(m.ssd_blocks(l)) == l for l in range(1, 3 * long))
    single = max(l for l in range(1, 3 * long) if m.ssd_blocks(l) == [l])
    assert all(m.prefill_flops(l + 1) > m.prefill_flops(l) for l in range(1, 3 * long) if l != single)
    fused = make()
    fused._ssd_block = fused.chunk_size  # what the fused kernel runs: chunk_size blocks, the last one padded
    pad = fused.prefill_flops(2) - fused.prefill_flops(1)  # within one chunk only the per-token part grows
    assert fused.prefill_flops(fused.chunk_size) - fused.prefill_flops(1) == (fused.chunk_size - 1) * pad
    assert fused.prefill_flops(1) > m.prefill_flops(1)  # one padded chunk against one position
    proj = 2 * (D_MODEL * m.in_proj.out_features + 2 * D_MODEL * D_MODEL)
    assert m.prefill_flops(8) > 8 * proj and m.step_flops(0) > proj


def test_kernel_choice_is_recorded():
    assert make().impl_used == "torch-ssd-chunked+torch-conv1d+torch"


def test_fast_kernels_on_cpu_raise_instead_of_falling_back():
    with pytest.raises(KernelUnavailable):
        Mamba2(D_MODEL, d_state=16, headdim=8, impl="fast", device="cpu")


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(D_MODEL, headdim=12)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(D_MODEL, headdim=16, ngroups=3)


def test_chunk_size_is_the_fast_kernels_and_leaves_the_reference_output_unchanged():
    """configs name chunk_size for the CUDA kernel; the reference blocks by shape, so any value gives the same
    numbers (at l = 50, shorter than most of them and a multiple of none)."""
    x = randn(3, 50, D_MODEL, seed=5)
    with torch.no_grad():
        outs = [make(chunk_size=q)(x) for q in (1, 8, 64, 256)]
    assert all(torch.equal(y, outs[0]) for y in outs[1:])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("start", [0, 5])
def test_inference_prefill_in_pieces_equals_one_forward(batch, start, monkeypatch):
    """A long inference prefill runs PREFILL_PIECE positions at a time; outputs and the state it leaves equal
    the one-call forward (what runs under autograd), with and without a continued cache."""
    import seqbench.models.mamba2 as mamba2_module

    monkeypatch.setattr(mamba2_module, "PREFILL_PIECE", 8)
    m = make(ngroups=2)
    x = randn(batch, 5 + 37, D_MODEL)
    caches = [m.allocate_cache(batch, 42, torch.float32, "cpu") for _ in range(2)]
    outs = []
    for cache, grad in zip(caches, (False, True), strict=True):
        with torch.set_grad_enabled(grad):
            if start:
                m(x[:, :start], cache)
            outs.append(m(x[:, start:], cache, start).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for k in caches[0]:
        torch.testing.assert_close(caches[0][k], caches[1][k], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        in_pieces = m(x)  # no cache: the pieces pass their state through a working cache of their own
    torch.testing.assert_close(in_pieces, m(x).detach(), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # the scratch kept between calls serves both modes, in either order
        assert torch.equal(m(x), in_pieces)


def test_training_gradients_match_huggingface():
    """Every gradient of a training step (the input's and each parameter's) equals the one through
    transformers' Mamba2Mixer torch path holding the same weights: this covers the written-out backwards of
    the conv and the gated norm, and autograd through the reference SSD."""
    m = make(ngroups=2).train()
    with torch.no_grad():
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
    hf = _hf_mixer(m, 8).train()
    hf.load_state_dict(m.state_dict(), strict=True)
    x, weights = randn(2, 29, D_MODEL), randn(2, 29, D_MODEL, seed=3)
    grads = []
    for layer in (m, hf):
        xg = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (layer(xg) * weights).sum().backward()
        grads.append({"x": xg.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-4, msg=name)


def test_separate_input_projections_equal_one_product(monkeypatch):
    """in_proj runs as one product per output part; with a bias and the gated-MLP side path, outputs and
    gradients equal those of the one product then split."""
    m = make(ngroups=2, bias=True, d_ssm=32).train()
    x = randn(2, 13, D_MODEL)
    results = []
    for one_product in (False, True):
        if one_product:
            monkeypatch.setattr(Mamba2, "_in_projections", lambda self, t: self._split(self.in_proj(t)))
        m.zero_grad()
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.square().sum().backward()
        results.append([y.detach(), xg.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
