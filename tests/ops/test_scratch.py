"""ops.scratch: named buffers are reused, grow when asked for more, and stay writable in and outside
inference mode (the references' no-autograd paths run under both)."""

import torch

from seqbench.ops.scratch import Scratch


def test_buffers_are_reused_and_grow():
    work = Scratch(torch.empty(0))
    a = work.get("a", 2, 3)
    assert a.shape == (2, 3) and a.dtype == torch.float32
    assert work.get("a", 3, 2).data_ptr() == a.data_ptr()  # the same memory under another shape
    assert work.get("b", 2, 3).data_ptr() != a.data_ptr()  # another name, another buffer
    big = work.get("a", 100)
    assert big.shape == (100,) and big.numel() > a.numel()  # grown: a new, larger buffer
    assert work.get("a", 50).data_ptr() == big.data_ptr()


def test_dtype_and_device_come_from_like():
    work = Scratch()
    f32 = work.get("x", 4, like=torch.empty(0))
    f64 = work.get("x", 4, like=torch.empty(0, dtype=torch.float64))
    assert f32.dtype == torch.float32 and f64.dtype == torch.float64
    assert f32.data_ptr() != f64.data_ptr()


def test_a_buffer_made_in_inference_mode_is_writable_outside_it():
    work = Scratch(torch.empty(0))
    with torch.inference_mode():
        work.get("x", 8).fill_(1.0)
    with torch.no_grad():
        buf = work.get("x", 8)
        buf.add_(1.0)  # an inference tensor would raise here
    torch.testing.assert_close(buf, torch.full((8,), 2.0))
