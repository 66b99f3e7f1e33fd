"""Mamba-1 mixer: interoperability with transformers' MambaMixer, decode parity, causality, cache, gradients."""

from __future__ import annotations

import os

import pytest
import torch

from seqbench.models.mamba import Mamba
from seqbench.ops import KernelUnavailable

D_MODEL, D_STATE, D_CONV = 16, 4, 4


def _model(seed: int = 0, **kw) -> Mamba:
    torch.manual_seed(seed)
    m = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV, **kw)
    with torch.no_grad():  # move D and A away from their init so a wrong use of either shows
        m.D.uniform_(-1, 1)
        m.A_log.add_(torch.rand_like(m.A_log))
    return m.eval()


def _x(batch: int, l: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, l, D_MODEL, generator=torch.Generator().manual_seed(seed))


def test_parameter_names_shapes_and_init_follow_mamba_ssm():
    m = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV, dt_min=0.01, dt_max=0.05)
    e, r = 2 * D_MODEL, 1
    expected = {
        "in_proj.weight": (2 * e, D_MODEL), "conv1d.weight": (e, 1, D_CONV), "conv1d.bias": (e,),
        "x_proj.weight": (r + 2 * D_STATE, e), "dt_proj.weight": (e, r), "dt_proj.bias": (e,),
        "A_log": (e, D_STATE), "D": (e,), "out_proj.weight": (D_MODEL, e),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, D_STATE + 1).expand(e, -1))
    dt0 = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt0.min() >= 0.01 * 0.999 and dt0.max() <= 0.05 * 1.001
    assert m.dt_proj.weight.abs().max() <= r**-0.5
    assert torch.equal(m.D, torch.ones(e))


def _hf_mixer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config in code; never download
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = transformers.MambaConfig(
        hidden_size=D_MODEL, state_size=D_STATE, conv_kernel=D_CONV, expand=2, time_step_rank=1,
        num_hidden_layers=1, use_bias=False, use_conv_bias=True, use_mambapy=False,
    )
    return MambaMixer(config, layer_idx=0).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_transformers_mamba_mixer_on_the_same_weights(batch):
    ours = _model(seed=2)
    hf = _hf_mixer()
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = _x(batch, 37)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-4, atol=1e-5)
    # and the other way round: an HF layer's weights load strictly into ours
    back = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV)
    back.load_state_dict(hf.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), hf(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("t", [1, 3, 20])
def test_prefill_then_step_equals_full_forward(batch, t):
    m, x = _model(), _x(batch, 30)
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_cache(batch, 30, torch.float32, "cpu")
        ptrs = {k: v.data_ptr() for k, v in cache.items()}
        outs = [m(x[:, :t], cache)]
        for pos in range(t, 30):
            outs.append(m.step(x[:, pos : pos + 1], cache, pos))
    assert {k: v.data_ptr() for k, v in cache.items()} == ptrs
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_chunked_prefill_equals_one_forward(batch):
    m, x = _model(), _x(batch, 60)
    sizes = [7, 2, 1, 3, 25, 22]  # chunks shorter and longer than the conv width
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_cache(batch, 60, torch.float32, "cpu")
        outs, start = [], 0
        for size in sizes:
            outs.append(m(x[:, start : start + size], cache, start))
            start += size
        one = m.allocate_cache(batch, 60, torch.float32, "cpu")
        m(x, one)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    for k in cache:  # the state left by the chunks is the state left by one prefill
        torch.testing.assert_close(cache[k], one[k], rtol=1e-5, atol=1e-6)


def test_prefill_at_start_zero_ignores_a_stale_cache():
    m, x = _model(), _x(2, 12)
    with torch.no_grad():
        stale, fresh = (m.allocate_cache(2, 12, torch.float32, "cpu") for _ in range(2))
        m(_x(2, 12, seed=9), stale)  # leaves a state behind
        ys = [m(x[:, :2], c) for c in (stale, fresh)]  # a new prompt, shorter than the conv width
        ys += [m.step(x[:, 2:3], c, 2) for c in (stale, fresh)]
    torch.testing.assert_close(ys[0], ys[1])
    torch.testing.assert_close(ys[2], ys[3])
    for k in fresh:
        torch.testing.assert_close(stale[k], fresh[k])


@pytest.mark.parametrize("batch", [1, 3])
def test_causality(batch):
    m, x = _model(), _x(batch, 40)
    x2 = x.clone()
    x2[:, 25:] = torch.randn_like(x2[:, 25:])
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :25], y2[:, :25], rtol=0, atol=0)
    assert not torch.allclose(y[:, 25:], y2[:, 25:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_constant_in_length_and_equal_to_shapes(dtype):
    m = _model()
    e, size = 2 * D_MODEL, torch.tensor([], dtype=dtype).element_size()
    for batch in (1, 3):
        sizes = []
        for max_len in (16, 4096, 1 << 20):
            cache = m.allocate_cache(batch, max_len, dtype, "cpu")
            assert set(cache) == {"conv_state", "ssm_state"}
            assert cache["conv_state"].shape == (batch, e, D_CONV) and cache["ssm_state"].shape == (batch, e, D_STATE)
            sizes.append(sum(t.numel() * t.element_size() for t in cache.values()))
        assert sizes == [batch * e * (D_CONV + D_STATE) * size] * 3


def test_gradients_reach_every_parameter():
    m = _model().train()
    x = _x(3, 50)
    loss = m(x).pow(2).mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bfloat16_forward_is_close_to_float32():
    m = _model()
    x = _x(2, 40)
    with torch.no_grad():
        y32 = m(x)
        mb = _model().to(torch.bfloat16)
        yb = mb(x.bfloat16())
        cache = mb.allocate_cache(2, 41, torch.bfloat16, "cpu")
        mb(x[:, :39].bfloat16(), cache)
        yb_step = mb.step(x[:, 39:40].bfloat16(), cache, 39)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    err = (yb.float() - y32).abs().max() / y32.abs().max()
    assert err < 0.05, err
    assert (yb_step.float() - y32[:, 39:40]).abs().max() / y32.abs().max() < 0.05


def test_flops_formula():
    m = _model()
    d, e, n, r, w = D_MODEL, 2 * D_MODEL, D_STATE, 1, D_CONV
    per_token = 2 * (d * 2 * e + e * (r + 2 * n) + r * e + e * d) + 2 * e * w + 9 * e * n
    assert m.step_flops(0) == m.step_flops(10_000) == per_token
    assert m.prefill_flops(1000) == 1000 * per_token


def test_impl_labels_and_fast_request():
    assert _model().impl_used == "torch-chunked"
    with pytest.raises(KernelUnavailable, match="seqbench\\[cuda\\]|CUDA"):
        Mamba(D_MODEL, impl="fast")


def test_start_without_cache_is_an_error():
    with pytest.raises(ValueError, match="cache"):
        _model()(_x(1, 4), None, 5)
