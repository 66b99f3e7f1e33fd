"""channel_dot and lagged_channel_dots: the blockwise reductions equal the plain ones across block boundaries."""

import pytest
import torch

from seqbench.ops import blockwise


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 4), (2, 30, 6), (9, 2, 5), (3, 0, 4)])
def test_channel_dot_equals_the_sum_of_products(shape, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_ROWS", 8)  # many blocks over batch and time
    g = torch.Generator().manual_seed(sum(shape))
    a, b = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(blockwise.channel_dot(a, b), (a * b).sum((0, 1)))


def test_channel_dot_reads_strided_views():
    x = torch.randn(4, 20, 6, dtype=torch.float64)
    a, b = x[:, 3:], x.transpose(0, 1).contiguous().transpose(0, 1)[:, :17]
    torch.testing.assert_close(blockwise.channel_dot(a, b), (a * b).sum((0, 1)))


@pytest.mark.parametrize("shape, lags", [((2, 30, 5), 4), ((9, 3, 2), 4), ((1, 17, 3), 1), ((3, 2, 4), 3)])
def test_lagged_channel_dots_equal_the_shifted_sums(shape, lags, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_ROWS", 8)  # lags reach across block boundaries
    g = torch.Generator().manual_seed(lags)
    a, b = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    t = shape[1]
    expected = torch.stack([(a[:, s:] * b[:, : t - s]).sum((0, 1)) for s in range(lags)])
    torch.testing.assert_close(blockwise.lagged_channel_dots(a, b, lags), expected)


def test_lagged_channel_dots_read_strided_views(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_ROWS", 8)
    x = torch.randn(3, 25, 12, dtype=torch.float64)
    a, b = x[..., ::2], x.transpose(0, 1).contiguous().transpose(0, 1)[..., 6:]  # (3, 25, 6) each, strided
    expected = torch.stack([(a[:, s:] * b[:, : 25 - s]).sum((0, 1)) for s in range(4)])
    torch.testing.assert_close(blockwise.lagged_channel_dots(a, b, 4), expected)
