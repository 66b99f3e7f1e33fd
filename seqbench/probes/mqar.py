"""MQAR: multi-query associative recall (Arora et al. 2023, "Zoology", §3), as token sequences.

A sequence of length ``seq_len`` holds ``n_pairs`` key-value pairs at the start, ``k1 v1 k2 v2 ...``; each
key is then queried exactly once, in a random order, at a random slot of the rest of the sequence: the query
key is followed by its value (so the next query cannot lean on a missing token) and every other position
holds the filler token 0. Keys come from ``[1, vocab/2)`` and values from ``[vocab/2, vocab)``, so the two
never share a token. The label of a query key's position is its value; every other label is ``IGNORE``, so
the loss and the accuracy see the query positions only.

Slots: the query region ``[2D, seq_len)`` is cut into 2-token slots and D of them are drawn without
replacement, so ``seq_len >= 4 * n_pairs``.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # label of a non-query position (torch cross_entropy's ignore_index)
FILLER = 0


def check_shape(seq_len: int, n_pairs: int, vocab_size: int) -> None:
    """Raise ValueError if these sequences cannot be built."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 (got {n_pairs})")
    if seq_len < 4 * n_pairs:
        raise ValueError(f"seq_len {seq_len} is too short for {n_pairs} pairs: MQAR needs seq_len >= 4 * n_pairs")
    if vocab_size // 2 - 1 < n_pairs:
        raise ValueError(f"vocab_size {vocab_size} has {vocab_size // 2 - 1} keys, fewer than {n_pairs} pairs")


def mqar_batch(n: int, seq_len: int, n_pairs: int, vocab_size: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences: tokens (n, seq_len) int64 and labels (n, seq_len) int64 (``IGNORE`` off the queries)."""
    check_shape(seq_len, n_pairs, vocab_size)
    half = vocab_size // 2
    d = n_pairs
    # distinct keys per sequence: the first d of a random permutation of [1, half)
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :d] + 1  # (n, d)
    values = torch.randint(half, vocab_size, (n, d), generator=generator)  # (n, d); values may repeat
    tokens = torch.full((n, seq_len), FILLER, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    tokens[:, 0 : 2 * d : 2] = keys
    tokens[:, 1 : 2 * d : 2] = values
    n_slots = (seq_len - 2 * d) // 2
    slots = torch.rand(n, n_slots, generator=generator).argsort(dim=1)[:, :d]  # (n, d): slot of the i-th key
    query_pos = 2 * d + 2 * slots  # (n, d)
    rows = torch.arange(n).unsqueeze(1).expand(n, d)  # (n, d)
    tokens[rows, query_pos] = keys
    tokens[rows, query_pos + 1] = values
    labels[rows, query_pos] = values
    return tokens, labels
