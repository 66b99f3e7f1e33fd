"""Contract tests: seqbench against the real Python code of mamba_ssm, causal_conv1d and flash_attn, on a CPU.

``make test`` installs the pinned packages with their CUDA builds skipped (see the Makefile). Here their compiled
extension modules become stubs and the kernels behind the entry points seqbench calls run the libraries' own
pure-PyTorch references:

- causal_conv1d: the stubbed ``causal_conv1d_cuda`` checks the preconditions of the C++ entry point (layouts,
  8-aligned channel-last strides, state shapes and dtypes) and computes with ``causal_conv1d_ref`` /
  ``causal_conv1d_update_ref``, so the library's real Python wrappers run in front of it;
- mamba_ssm: ``selective_scan_fn`` -> ``selective_scan_ref``, ``selective_state_update`` ->
  ``selective_state_update_ref``, ``mamba_chunk_scan_combined`` -> its references (``chunk_state_ref``,
  ``state_passing_ref``, ``chunk_scan_ref``: ``ssd_chunk_scan_combined_ref`` itself has no initial or final
  state), the gated RMSNorm -> ``rms_norm_ref``;
- flash_attn: ``flash_attn_func`` and ``flash_attn_with_kvcache`` -> small references of their documented
  semantics (bottom-right causal mask, GQA, in-place append at ``cache_seqlens``).

Every routed call is first bound to the installed function's signature (``inspect.signature(...).bind``), so a
call seqbench makes that the real function would reject fails here. Under CI (CI=true) a missing library is a
failure, elsewhere a skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

LIBRARIES = ("mamba_ssm", "causal_conv1d", "flash_attn", "einops", "triton")
EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda", "flash_attn_2_cuda")


def require_libraries() -> None:
    missing = [m for m in LIBRARIES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    msg = f"contract tests need {', '.join(missing)}; `make test` installs them (CUDA builds skipped)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


# ---- causal_conv1d_cuda: the C++ entry point's preconditions in front of the library's references ---------------

def _check_conv_x(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The checks of causal_conv1d_fwd on x (b, d, l); returns whether x is channel-last."""
    assert x.stride(2) == 1 or x.stride(1) == 1, "causal_conv1d: x must be contiguous along l or along d"
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        assert x.shape[1] % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now"
        assert x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, (
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8"
        )
    assert 2 <= weight.shape[1] <= 4, "causal_conv1d only supports width between 2 and 4"
    assert weight.shape == (x.shape[1], weight.shape[1])
    return channel_last


def _conv_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu_activation):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    channel_last = _check_conv_x(x, weight)
    assert seq_idx is None, "seqbench never passes seq_idx"
    if initial_states is not None:
        assert channel_last, "initial_states is only supported for channel last layout"
        assert initial_states.dtype == x.dtype
        assert initial_states.shape == (x.shape[0], x.shape[1], weight.shape[1] - 1)
        assert initial_states.stride(1) == 1
    out.copy_(causal_conv1d_ref(x, weight, bias, initial_states=initial_states,
                                activation="silu" if silu_activation else None))


def _conv_update(x, conv_state, weight, bias, out, silu_activation, cache_seqlens, conv_state_indices):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref

    assert conv_state.dtype == x.dtype, "causal_conv1d_update: conv_state must have the dtype of x"
    assert conv_state.shape[-1] >= weight.shape[1] - 1
    assert 2 <= weight.shape[1] <= 4, "causal_conv1d only supports width between 2 and 4"
    assert conv_state_indices is None
    out.copy_(causal_conv1d_update_ref(x, conv_state, weight, bias, "silu" if silu_activation else None,
                                       cache_seqlens))


# ---- mamba_ssm's SSD entry point from its references ------------------------------------------------------------

def chunk_scan_combined_from_refs(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                  return_final_states=False, return_varlen_states=False):
    """mamba_chunk_scan_combined's result from chunk_state_ref / state_passing_ref / chunk_scan_ref."""
    from mamba_ssm.ops.triton.ssd_chunk_scan import chunk_scan_ref
    from mamba_ssm.ops.triton.ssd_chunk_state import chunk_state_ref
    from mamba_ssm.ops.triton.ssd_state_passing import state_passing_ref

    assert seq_idx is None and cu_seqlens is None and not return_varlen_states
    b, l, h, p = x.shape
    n = B.shape[-1]
    delta = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    delta = (F.softplus(delta) if dt_softplus else delta).clamp(*dt_limit)  # (b, l, h)
    pad = -l % chunk_size  # padded steps: Δ = 0 (no decay, no input) and x = 0
    delta = F.pad(delta, (0, 0, 0, pad))
    x_, B_, C_ = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    z_ = None if z is None else F.pad(z, (0, 0, 0, 0, 0, pad))
    delta = delta.view(b, -1, chunk_size, h).permute(0, 3, 1, 2)  # (b, h, chunks, chunk_size)
    dA_cumsum = torch.cumsum(delta * A.float()[:, None, None], dim=-1)
    states = chunk_state_ref(B_, x_, delta, dA_cumsum)  # (b, chunks, h, p, n)
    init = None if initial_states is None else initial_states.float().flatten(-2)
    prev, final = state_passing_ref(states.float().flatten(-2), dA_cumsum[..., -1], init)
    prev = prev.unflatten(-1, (p, n)).to(states.dtype)
    out = chunk_scan_ref(B_, C_, x_, delta, dA_cumsum, prev, D=D, z=z_)[:, :l].to(x.dtype)  # the kernel: x.dtype
    return (out, final.unflatten(-1, (p, n))) if return_final_states else out


# ---- flash_attn's documented semantics ------------------------------------------------------------------------

def _attend(q, k, v, causal):
    """softmax(q k^T / sqrt(hd)) v with the causal mask aligned bottom-right and GQA: q (b, l, h, hd), k/v (b, s, kvh, hd)."""
    l, s, h, kvh = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = (t.float().repeat_interleave(h // kvh, dim=2) for t in (k, v))  # query head i reads kv head i // (h / kvh)
    scores = torch.einsum("blhd,bshd->bhls", q.float(), k) / math.sqrt(q.shape[-1])
    if causal:
        visible = torch.arange(s)[None, :] <= torch.arange(l)[:, None] + (s - l)  # (l, s)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v).to(q.dtype)


def flash_attn_func_semantics(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and softmax_scale is None and window_size == (-1, -1) and not return_attn_probs
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16"
    return _attend(q, k, v, causal)


def flash_attn_with_kvcache_semantics(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                      cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                      rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                      return_softmax_lse=False):
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert rotary_cos is None and cache_batch_idx is None and block_table is None and softmax_scale is None
    b, new = q.shape[0], (0 if k is None else k.shape[1])
    lens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else torch.full((b,), cache_seqlens, dtype=torch.int32)
    assert lens.dtype == torch.int32 and lens.shape == (b,), "cache_seqlens: (batch,) int32"
    outs = []
    for i in range(b):  # append k/v at cache_seqlens[i] in place, then attend over what the cache then holds
        n = int(lens[i])
        if k is not None:
            k_cache[i, n : n + new] = k[i]
            v_cache[i, n : n + new] = v[i]
        outs.append(_attend(q[i : i + 1], k_cache[i : i + 1, : n + new], v_cache[i : i + 1, : n + new], causal))
    return torch.cat(outs)


# ---- the fixture ---------------------------------------------------------------------------------------------

@dataclass
class Libraries:
    calls: dict[str, list[inspect.BoundArguments]] = field(default_factory=dict)


def _bound(real, fn, name: str, libs: Libraries):
    """``fn`` behind a check that the call binds to ``real``'s signature; records the bound call."""
    signature = inspect.signature(real)

    def call(*args, **kwargs):
        libs.calls.setdefault(name, []).append(signature.bind(*args, **kwargs))
        return fn(*args, **kwargs)

    return call


LIBRARY_PACKAGES = ("mamba_ssm", "causal_conv1d", "flash_attn")


def forget_libraries() -> None:
    """Drop the stubs and the libraries' modules from sys.modules, so that later tests in the session (Hugging
    Face's Mamba mixers probe for mamba_ssm) see the installed packages as they are: without CUDA extensions."""
    for name in list(sys.modules):
        if name in EXTENSIONS or name.split(".")[0] in LIBRARY_PACKAGES:
            del sys.modules[name]


def import_with_stubbed_extensions() -> None:
    for name in EXTENSIONS:
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)  # never a real extension: no CUDA build was installed
    conv = sys.modules["causal_conv1d_cuda"]
    conv.causal_conv1d_fwd, conv.causal_conv1d_update = _conv_fwd, _conv_update
    for module in ("causal_conv1d", "flash_attn", "mamba_ssm.ops.selective_scan_interface",
                   "mamba_ssm.ops.triton.selective_state_update", "mamba_ssm.ops.triton.ssd_combined",
                   "mamba_ssm.ops.triton.layernorm_gated", "mamba_ssm.modules.mamba_simple", "mamba_ssm.modules.mamba2"):
        importlib.import_module(module)


def route(monkeypatch) -> Libraries:
    """The libraries' kernels routed as above (they are imported with stubbed extensions already), and seqbench
    told that its fast kernels can run (as on a GPU), so its mixers and adapters call the libraries as there."""
    import flash_attn
    import flash_attn.flash_attn_interface as fa
    import mamba_ssm.modules.mamba2 as m2
    import mamba_ssm.modules.mamba_simple as m1
    import mamba_ssm.ops.selective_scan_interface as ssi
    import mamba_ssm.ops.triton.layernorm_gated as lng
    import mamba_ssm.ops.triton.selective_state_update as ssu
    import mamba_ssm.ops.triton.ssd_combined as ssd

    import seqbench.ops as ops
    from seqbench.ops import fast

    libs = Libraries()
    routes = [
        ((ssi, m1), "selective_scan_fn", ssi.selective_scan_fn, ssi.selective_scan_ref),
        ((ssu, m1, m2), "selective_state_update", ssu.selective_state_update, ssu.selective_state_update_ref),
        ((ssd, m2), "mamba_chunk_scan_combined", ssd.mamba_chunk_scan_combined, chunk_scan_combined_from_refs),
        ((flash_attn, fa), "flash_attn_func", fa.flash_attn_func, flash_attn_func_semantics),
        ((flash_attn, fa), "flash_attn_with_kvcache", fa.flash_attn_with_kvcache, flash_attn_with_kvcache_semantics),
    ]
    for modules, name, real, ref in routes:
        routed = _bound(real, ref, name, libs)
        for module in modules:
            monkeypatch.setattr(module, name, routed)

    def rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return lng.rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)

    monkeypatch.setattr(lng, "rmsnorm_fn", _bound(lng.rmsnorm_fn, rmsnorm, "rmsnorm_fn", libs))

    real_unusable = ops.fast_unusable
    monkeypatch.setattr(fast, "unavailable_reason", lambda op: None if op in fast._KERNEL_MODULES else "no kernel")
    monkeypatch.setattr(ops, "fast_unusable", lambda op, device, dtype=None: real_unusable(op, "cuda", dtype))
    return libs
