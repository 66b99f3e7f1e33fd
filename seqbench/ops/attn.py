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
