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
    n_seq, t, d = a.shape
    if n_seq * t == 0:
        return a.new_zeros(d)
    rows = min(t, BLOCK_ROWS)
    seqs = max(1, BLOCK_ROWS // max(t, 1))
    work = a.new_empty(min(n_seq, seqs), rows, d)
    total = a.new_zeros(d)
    for s0 in range(0, n_seq, seqs):
        s1 = min(n_seq, s0 + seqs)
        for t0 in range(0, t, rows):
            t1 = min(t, t0 + rows)
            total += torch.mul(a[s0:s1, t0:t1], b[s0:s1, t0:t1], out=work[: s1 - s0, : t1 - t0]).sum((0, 1))
    return total
