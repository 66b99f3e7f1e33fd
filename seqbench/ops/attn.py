"""Reference attention op on torch's scaled_dot_product_attention (Vaswani et al., 2017).

Layout and mask semantics follow flash_attn so the fast path is a drop-in: q (b, l, h, hd),
k/v (b, s, kv_h, hd) with h a multiple of kv_h (GQA, Ainslie et al., 2023). With ``causal=True`` and
l < s the mask is aligned bottom-right: query i sits at key position s - l + i, which is what a chunked
prefill or a decode step over a filled cache needs. (SDPA's own ``is_causal`` aligns top-left.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    l, s = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, len, hd)
    gqa = qt.shape[1] != kt.shape[1]
    if not causal or l == 1:
        # A single query at the end of the cache sees every key: no mask needed.
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
    elif l == s:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        q_pos = torch.arange(s - l, s, device=q.device)[:, None]  # (l, 1)
        mask = q_pos >= torch.arange(s, device=q.device)[None, :]  # (l, s), True = attend
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)  # (b, l, h, hd)


def attention_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, pos: int | Tensor) -> Tensor:
    """One decode step over a preallocated cache, the contract of flash_attn_with_kvcache.

    q (b, 1, h, hd); k/v (b, 1, kvh, hd) are written into k_cache/v_cache (b, L, kvh, hd) at position ``pos``
    in place, then q attends to positions 0..pos. ``pos`` is an int, or a device tensor (1,) or (b,) so that
    the step has static shapes and no host read (what a CUDA graph needs): then every cached position is read
    and those after ``pos`` are masked.
    """
    if isinstance(pos, int):
        k_cache[:, pos : pos + 1] = k
        v_cache[:, pos : pos + 1] = v
        return attention(q, k_cache[:, : pos + 1], v_cache[:, : pos + 1], causal=True)
    b, max_len = k_cache.shape[:2]
    where = pos.long().expand(b)  # (b,)
    rows = torch.arange(b, device=q.device)
    k_cache[rows, where] = k[:, 0]
    v_cache[rows, where] = v[:, 0]
    visible = torch.arange(max_len, device=q.device)[None, :] <= where[:, None]  # (b, L)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))  # (b, heads, len, hd)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible[:, None, None, :],
                                         enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2)  # (b, 1, h, hd)
