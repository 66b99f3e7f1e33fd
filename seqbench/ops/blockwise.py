"""Reductions that go block by block through one small buffer instead of a product tensor of full size.

On a CPU a freshly allocated tensor of many MiB costs a page fault per 4 KiB on first write, which can cost
more than the arithmetic that fills it; a block-sized buffer is reused from the allocator and stays in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_ROWS = 512  # rows of d channels per block


def channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over every leading dimension of a * b, for a, b (B, T, d) of one shape -> (d,)."""
    return lagged_channel_dots(a, b, 1)[0]


def lagged_channel_dots(g: Tensor, x: Tensor, lags: int) -> Tensor:
    """out[s] = sum over B and t >= s of g[:, t] * x[:, t - s], for s in 0..lags-1 and g, x (B, T, d) ->
    (lags, d). Every lag of a block is taken while the block is in cache: one pass over g and x."""
    n_seq, t, d = g.shape
    total = g.new_zeros(lags, d)
    if n_seq * t == 0:
        return total
    rows = min(t, BLOCK_ROWS)
    seqs = max(1, BLOCK_ROWS // max(t, 1))
    work = g.new_empty(min(n_seq, seqs), rows, d)
    for s0 in range(0, n_seq, seqs):
        s1 = min(n_seq, s0 + seqs)
        for t0 in range(0, t, rows):
            t1 = min(t, t0 + rows)
            for lag in range(lags):
                lo = max(t0, lag)
                if lo < t1:
                    prod = torch.mul(g[s0:s1, lo:t1], x[s0:s1, lo - lag : t1 - lag], out=work[: s1 - s0, : t1 - lo])
                    total[lag] += prod.sum((0, 1))
    return total
