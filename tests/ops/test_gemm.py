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
    """The product in float64, through torch's own autograd."""
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _grads(fn, tensors, wants, dy):
    """Gradients of (fn(*leaves) * dy).sum() for the leaves in ``wants`` (None for the others)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(want) for t, want in zip(tensors, wants, strict=True)]
    fn(*leaves).backward(dy)
    return [None if t is None or not want else t.grad for t, want in zip(leaves, wants, strict=True)]


@needs_onednn
@pytest.mark.parametrize("shape", [(), (7,), (3, 11), (2, 5, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_the_float64_product(shape, bias, onednn_calls):
    x, w, b = _inputs(shape, 48, 40, bias)
    y = gemm.linear(x, w, b)
    assert onednn_calls, "the product did not run on oneDNN"
    assert y.shape == (*shape, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_forward_takes_strided_inputs(onednn_calls):
    x, w, b = _inputs((3, 20), 16, 24, True)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (3, 20, 16) with time innermost in memory
    wt = w.t().contiguous().t()  # (24, 16), column-major
    torch.testing.assert_close(gemm.linear(xt, wt, b).double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert onednn_calls


@needs_onednn
@pytest.mark.parametrize("k, m", [(32, 24), (24, 32)])  # both orientations of the weight gradient
@pytest.mark.parametrize(
    "wants", [(True, True, True), (True, True, False), (True, False, False), (False, True, False), (False, False, True)]
)
def test_gradients_equal_the_float64_ones(k, m, wants, onednn_calls):
    """Every combination of x, weight and bias asking for a gradient; each gradient that is computed equals
    the float64 one, and none is computed that was not asked for."""
    x, w, b = _inputs((2, 13), k, m, True, seed=1)
    dy = torch.randn(2, 13, m, generator=torch.Generator().manual_seed(2))
    ours = _grads(gemm.linear, (x, w, b), wants, dy)
    theirs = _grads(_reference, (x.double(), w.double(), b.double()), wants, dy.double())
    assert len(onednn_calls) == 1 + wants[0] + wants[1]  # the forward, then dx and dW only when asked for
    for a, e in zip(ours, theirs, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_expanded_output_gradient(onednn_calls):
    """The gradient of a sum arrives as a zero-stride view; both weight-gradient orientations read it."""
    for k, m in ((16, 8), (8, 16)):
        x, w, _ = _inputs((10,), k, m, False)
        ours = _grads(lambda x, w: gemm.linear(x, w).sum(), (x, w), (True, True), torch.tensor(1.0))
        theirs = _grads(lambda x, w: _reference(x, w, None).sum(), (x.double(), w.double()), (True, True),
                        torch.tensor(1.0, dtype=torch.float64))
        for a, e in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_without_autograd(context, onednn_calls):
    x, w, b = _inputs((5,), 16, 8, True)
    w.requires_grad_()
    with context():
        y = gemm.linear(x, w, b)
    assert not y.requires_grad
    torch.testing.assert_close(y.double(), _reference(x, w.detach(), b), rtol=1e-5, atol=1e-5)
    assert onednn_calls


def test_small_products_and_other_dtypes_stay_with_torch(monkeypatch):
    """Below the threshold, and in float64 or bfloat16, the result is torch's own, bit for bit."""
    monkeypatch.setattr(gemm, "_onednn", lambda *a: pytest.fail("oneDNN ran a product meant for torch"))
    x, w, b = _inputs((3,), 16, 8, True)
    assert gemm.gemm_used(x, w) == "torch"
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    for dtype in (torch.float64, torch.bfloat16):
        xd, wd, bd = (t.to(dtype) for t in (x, w, b))
        assert gemm.gemm_used(xd, wd) == "torch"
        assert torch.equal(gemm.linear(xd, wd, bd), F.linear(xd, wd, bd))


def test_threshold_counts_multiply_adds():
    w = torch.empty(64, 256)
    assert gemm.gemm_used(torch.empty(8, 256), w) == "torch"  # 8 * 256 * 64 = 131k multiply-adds
    assert gemm.gemm_used(torch.empty(4096, 256), w) == gemm.GEMM  # 67M
    assert gemm.gemm_used(torch.empty(2, 2048, 256), w) == gemm.GEMM  # leading dimensions count as rows


@needs_onednn
def test_linear_module_is_nn_linear_on_the_faster_gemm(onednn_calls):
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
    assert onednn_calls == [(5, 16)]  # the module's product ran on oneDNN
