"""The reference causal depthwise conv1d against a loop over taps, in both memory layouts it takes."""

import pytest
import torch

from seqbench.ops.conv import causal_conv1d


def loop_conv(x, weight, bias, initial_state):
    """y[:, :, t] = bias + sum_k weight[:, k] x[:, :, t - (w-1) + k], earlier inputs from initial_state or 0."""
    b, d, l = x.shape
    w = weight.shape[1]
    before = torch.zeros(b, d, w - 1, dtype=torch.float64) if initial_state is None else initial_state[..., -(w - 1) :]
    xp = torch.cat([before.double()[..., : w - 1], x.double()], dim=-1)  # (b, d, w-1+l)
    y = torch.zeros(b, d, l, dtype=torch.float64)
    for t in range(l):
        for k in range(w):
            y[:, :, t] += weight[:, k].double() * xp[:, :, t + k]
    return y if bias is None else y + bias.double()[:, None]


def _time_major(b, d, l, g):
    return torch.randn(b, l, d, generator=g).transpose(1, 2)  # (b, d, l) with stride 1 along d


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_equals_loop_in_both_layouts(width, layout, with_state):
    g = torch.Generator().manual_seed(width)
    b, d, l = 2, 6, 11
    x = torch.randn(b, d, l, generator=g) if layout == "contiguous" else _time_major(b, d, l, g)
    weight, bias = torch.randn(d, width, generator=g), torch.randn(d, generator=g)
    state = torch.randn(b, d, width, generator=g) if with_state and width > 1 else None  # cache width: w columns
    y = causal_conv1d(x, weight, bias, initial_state=state)
    torch.testing.assert_close(y.double(), loop_conv(x, weight, bias, state), rtol=1e-5, atol=1e-5)
    assert (y.stride(1) == 1) == (layout == "time-major")  # the output keeps the input's layout


def test_time_major_silu_and_low_precision():
    g = torch.Generator().manual_seed(0)
    x, weight = _time_major(3, 16, 20, g), torch.randn(16, 4, generator=g)
    y = causal_conv1d(x, weight, None, activation="silu")
    torch.testing.assert_close(y, causal_conv1d(x.contiguous(), weight, None, activation="silu"))
    low = causal_conv1d(x.bfloat16(), weight.bfloat16(), None, activation="silu")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), y, rtol=0.05, atol=0.05)


def test_time_major_is_causal():
    g = torch.Generator().manual_seed(1)
    x, weight = _time_major(1, 8, 30, g), torch.randn(8, 4, generator=g)
    changed = x.clone()
    changed[:, :, 20:] += 1.0
    y0, y1 = causal_conv1d(x, weight), causal_conv1d(changed, weight)
    torch.testing.assert_close(y0[..., :20], y1[..., :20], rtol=0, atol=0)
    assert not torch.allclose(y0[..., 20:], y1[..., 20:])


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 11])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_time_major_gradients_are_exact(width, length, with_state, activation):
    """The time-major path's written-out backward against finite differences of its own forward (float64),
    for every input including the initial state, and for sequences shorter than the filter."""
    g = torch.Generator().manual_seed(width * 10 + length)
    b, d = 2, 5
    x = torch.randn(b, length, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    weight = torch.randn(d, width, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = [x, weight, bias]
    if with_state and width > 1:
        inputs.append(torch.randn(b, d, width, generator=g, dtype=torch.float64, requires_grad=True))

    def conv(x, weight, bias, state=None):
        assert x.stride(1) == 1  # the time-major path is the one under test
        return causal_conv1d(x, weight, bias, activation=activation, initial_state=state)

    assert torch.autograd.gradcheck(conv, inputs)


def test_time_major_gradients_match_the_conv1d_layout():
    """Gradients through the time-major path equal autograd through F.conv1d on the contiguous layout, over
    more positions than one block of the tap-gradient reduction."""
    g = torch.Generator().manual_seed(5)
    x_tm = torch.randn(3, 700, 16, generator=g).transpose(1, 2)
    weight, bias, state = torch.randn(16, 4, generator=g), torch.randn(16, generator=g), torch.randn(3, 16, 4, generator=g)
    grads = []
    for x in (x_tm, x_tm.contiguous()):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, state)]
        y = causal_conv1d(*leaves[:3], activation="silu", initial_state=leaves[3])
        (y * torch.linspace(-1, 1, 700)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
