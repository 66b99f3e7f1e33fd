"""The gated RMSNorm of Mamba-2: its defining properties, and its written-out gradient."""

import pytest
import torch
import torch.nn.functional as F

from seqbench.ops.norm import gated_rms_norm


def _inputs(dtype=torch.float64, seed=0, shape=(2, 3, 8)):
    g = torch.Generator().manual_seed(seed)
    y, z = torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)
    return y, z, torch.rand(shape[-1], generator=g, dtype=dtype) + 0.5


@pytest.mark.parametrize("group_size", [4, 8])
def test_each_group_has_unit_mean_square_and_is_scale_free(group_size):
    y, _, _ = _inputs()
    ones = torch.ones(8, dtype=torch.float64)
    out = gated_rms_norm(y, None, ones, 0.0, group_size, False)
    mean_sq = out.unflatten(-1, (-1, group_size)).square().mean(-1)
    torch.testing.assert_close(mean_sq, torch.ones_like(mean_sq))
    factors = torch.tensor([3.0, 0.25], dtype=torch.float64)[: 8 // group_size]  # one per group
    scaled = y * factors.repeat_interleave(group_size)  # scaling a group changes nothing
    torch.testing.assert_close(gated_rms_norm(scaled, None, ones, 0.0, group_size, False), out)


def test_the_gate_acts_before_or_after_the_norm():
    y, z, w = _inputs()
    plain = gated_rms_norm(y, None, w, 1e-5, 4, False)
    torch.testing.assert_close(gated_rms_norm(y, z, w, 1e-5, 4, True), plain * F.silu(z))
    torch.testing.assert_close(gated_rms_norm(y, z, w, 1e-5, 4, False), gated_rms_norm(y * F.silu(z), None, w, 1e-5, 4, False))


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("group_size", [4, 8])
def test_gradients_are_exact(norm_before_gate, gated, group_size):
    y, z, w = (t.requires_grad_() for t in _inputs())

    def norm(y, w, z=None):
        return gated_rms_norm(y, z, w, 1e-5, group_size, norm_before_gate)

    assert torch.autograd.gradcheck(norm, (y, w, z) if gated else (y, w))


def test_inference_and_training_paths_agree_and_keep_the_dtype():
    y, z, w = _inputs(torch.float32, shape=(3, 5, 16))
    with torch.no_grad():
        fast = gated_rms_norm(y, z, w, 1e-5, 8, False)
    tracked = gated_rms_norm(y, z, w.clone().requires_grad_(), 1e-5, 8, False)
    torch.testing.assert_close(fast, tracked.detach(), rtol=0, atol=0)
    low = gated_rms_norm(y.bfloat16(), z.bfloat16(), w.bfloat16(), 1e-5, 8, False)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), fast, rtol=0.03, atol=0.03)
