"""ops.gemm: the oneDNN projection equals float64 products, forward and backward, and is chosen only where
it is meant to run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqbench.ops import gemm

needs_onednn = pytest.mark.skipif(gemm.GEMM != "onednn", reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the products that run on oneDNN, with the size threshold lowered so that small test shapes take it."""
    calls = []
    inner = gemm._onednn

    def counted(x, weight, bias):
        calls.append(tuple(x.shape))
        return inner(x, weight, bias)

    monkeypatch.setattr(gemm, "_onednn", counted)
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    return calls


def _inputs(shape, k, m, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=g)
    w = torch.randn(m, k, generator=g) / k**0.5
    b = torch.randn(m, generator=g) if bias else None
    return x, w, b


def _reference(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@needs_onednn
@pytest.mark.parametrize("shape", [(7,), (3, 11), (2, 5, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_the_float64_product(shape, bias, onednn_calls):
    x, w, b = _inputs(shape, 48, 40, bias)
    y = gemm.linear(x, w, b)
    assert onednn_calls, "the product did not run on oneDNN"
    assert y.shape == (*shape, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_forward_reads_strided_inputs(onednn_calls):
    x, w, b = _inputs((3, 20), 16, 24, True)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (3, 20, 16) with time innermost in memory
    wt = w.t().contiguous().t()  # (24, 16), column-major
    torch.testing.assert_close(gemm.linear(xt, wt, b).double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert onednn_calls


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k, m", [(32, 24), (24, 32)])  # both orientations of the weight gradient
def test_gradients_equal_the_float64_ones(bias, k, m, onednn_calls):
    x, w, b = _inputs((2, 13), k, m, bias, seed=1)
    dy = torch.randn(2, 13, m, generator=torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    gemm.linear(*leaves, *([None] if b is None else [])).backward(dy)
    ref = [t.double().requires_grad_() for t in (x, w, b) if t is not None]
    _reference(*ref, *([None] if b is None else [])).backward(dy.double())
    assert len(onednn_calls) == 3  # the forward, the input gradient and the weight gradient
    for ours, theirs in zip(leaves, ref, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_only_the_gradients_asked_for_are_computed(onednn_calls):
    x, w, _ = _inputs((9,), 16, 8, False)
    w.requires_grad_()
    gemm.linear(x, w).sum().backward()
    assert x.grad is None and w.grad is not None
    assert len(onednn_calls) == 2  # the forward and the weight gradient: none for an x that needs none
    torch.testing.assert_close(w.grad, torch.ones(9, 8).t() @ x, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_out_receives_the_product(onednn_calls):
    x, w, b = _inputs((4, 6), 16, 8, True)
    out = torch.full((4, 6, 8), float("nan"))
    assert gemm.linear(x, w, b, out=out) is out
    torch.testing.assert_close(out.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert onednn_calls


@needs_onednn
def test_inference_mode(onednn_calls):
    x, w, b = _inputs((5,), 16, 8, True)
    with torch.inference_mode():
        y = gemm.linear(x, w, b)
    torch.testing.assert_close(y.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert onednn_calls


def test_small_products_and_other_dtypes_stay_with_torch(monkeypatch):
    """Below the threshold, and in float64 or bfloat16, the result is torch's own, bit for bit."""
    monkeypatch.setattr(gemm, "_onednn", lambda *a: pytest.fail("oneDNN ran a product meant for torch"))
    x, w, b = _inputs((3,), 16, 8, True)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    for dtype in (torch.float64, torch.bfloat16):
        xd, wd, bd = (t.to(dtype) for t in (x, w, b))
        assert torch.equal(gemm.linear(xd, wd, bd), F.linear(xd, wd, bd))
    out = torch.empty(3, 8, dtype=torch.float64)
    assert torch.equal(gemm.linear(x.double(), w.double(), b.double(), out=out), F.linear(x.double(), w.double(), b.double()))


def test_threshold_counts_multiply_adds():
    w = torch.empty(64, 256)
    small, large = torch.empty(8, 256), torch.empty(4096, 256)
    assert not gemm._uses_onednn(small, w)
    assert gemm._uses_onednn(large, w) == (gemm.GEMM == "onednn")
    assert not gemm._uses_onednn(large.double(), w.double())
    assert gemm.gemm_for(large.bfloat16()) == "torch"


def test_linear_module_is_nn_linear_with_its_state_dict():
    torch.manual_seed(3)
    plain = nn.Linear(16, 8)
    torch.manual_seed(3)
    ours = gemm.Linear(16, 8)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)  # the same initialisation from the same seed
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), plain(x))
