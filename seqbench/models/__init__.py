"""Model registry and ``build_model(spec)``.

Dimension glossary, used in shape comments throughout:
    b  batch                 l  sequence length (this call)     L  context / max cached length
    d  d_model               d_inner = expand * d_model         h  heads (attention or Mamba-2)
    p  headdim (Mamba-2)     n  d_state (SSM state size)        g  ngroups (Mamba-2 B/C groups)
    hd attention head dim    kvh key/value heads (GQA)          w  d_conv (short conv width)
    r  dt_rank (Mamba-1)     c  chunk index / chunk length in chunked scans

A hybrid is not a mixer: it is a layout of existing mixers, one per layer (Jamba: 1 attention in 8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from seqbench.config import ModelSpec
from seqbench.models.base import SeqModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _attention(spec: ModelSpec, device, dtype) -> nn.Module:
    from seqbench.models.attention import Attention

    heads = spec.n_heads or max(1, spec.d_model // 64)
    return Attention(spec.d_model, heads, spec.n_kv_heads, spec.rope_theta, short_conv=spec.short_conv, impl=spec.impl,
                     device=device, dtype=dtype)


def _mamba(spec: ModelSpec, device, dtype) -> nn.Module:
    from seqbench.models.mamba import Mamba

    return Mamba(
        spec.d_model, d_state=spec.d_state or 16, d_conv=spec.d_conv, expand=spec.expand, dt_rank=spec.dt_rank,
        dt_min=spec.dt_min, dt_max=spec.dt_max, impl=spec.impl, device=device, dtype=dtype,
    )


def _mamba2(spec: ModelSpec, device, dtype) -> nn.Module:
    from seqbench.models.mamba2 import Mamba2

    return Mamba2(
        spec.d_model, d_state=spec.d_state or 128, d_conv=spec.d_conv, expand=spec.expand, headdim=spec.headdim,
        ngroups=spec.ngroups, chunk_size=spec.chunk_size, dt_min=spec.dt_min, dt_max=spec.dt_max,
        impl=spec.impl, device=device, dtype=dtype,
    )


def _s4d(spec: ModelSpec, device, dtype) -> nn.Module:
    from seqbench.models.s4 import S4D

    state_dtype = torch.float32 if spec.state_dtype == "float32" else None  # None: the model dtype
    return S4D(spec.d_model, d_state=spec.d_state or 64, dt_min=spec.dt_min, dt_max=spec.dt_max, init=spec.s4d_init,
               impl=spec.impl, state_dtype=state_dtype, device=device, dtype=dtype)


MIXERS: dict[str, Callable[[ModelSpec, torch.device | str, torch.dtype], nn.Module]] = {
    "attention": _attention,
    "s4d": _s4d,
    "mamba": _mamba,
    "mamba2": _mamba2,
}


def build_model(
    spec: ModelSpec, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32
) -> SeqModel:
    """Build the model a spec describes; parameters are created directly on ``device`` in ``dtype``."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with torch.device(device):  # every module, mixer or not, is created on the device (meta: no memory at all)
        mixers = [MIXERS[kind](spec, device, dtype) for kind in spec.layer_kinds()]
        mlp_hidden = round(spec.mlp_expand * spec.d_model) if spec.mlp_expand else None
        model = SeqModel(spec.vocab_size, spec.d_model, mixers, mlp_hidden)
    return model.to(dtype=dtype)


# The kernels each mixer kind runs, for checking `impl: fast` before a sweep starts.
OPS_BY_KIND: dict[str, tuple[str, ...]] = {
    "attention": ("attention", "attention_kvcache"),
    "s4d": ("fft_conv",),
    "mamba": ("causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update"),
    "mamba2": ("causal_conv1d", "causal_conv1d_update", "ssd", "selective_state_update"),
}


def continues_prefill(exp) -> bool:
    """Whether some prompt of the sweep is fed in more than one chunk, i.e. a prefill starts at start > 0."""
    chunk = exp.measure.prefill_chunk
    return chunk is not None and any(
        max(g.seq_lens) > chunk for g in exp.sweep.grids() if {"prefill", "decode"} & set(g.workloads)
    )


def _continued_prefill_refusal(spec: ModelSpec) -> str | None:
    """Why the fast kernels of this model cannot continue a prefill from a cached state, or None."""
    kinds = set(spec.layer_kinds())
    if "mamba" in kinds:
        return "mamba_ssm's selective_scan_fn cannot start from a cached state"
    conv_dim = spec.expand * spec.d_model + 2 * spec.ngroups * (spec.d_state or 128)
    if "mamba2" in kinds and conv_dim % 8:
        return f"causal_conv1d takes a cached state only with conv channels % 8 == 0 (mamba2 has {conv_dim})"
    return None


def preflight_kernels(exp, device: torch.device) -> None:
    """Raise RuntimeError naming the model if a model demands fast kernels that cannot run on ``device``
    in the experiment's dtype, or cannot do what the sweep asks of them (continue a chunked prefill)."""
    from seqbench.ops import fast_unusable

    for i, spec in enumerate(exp.models):
        if spec.impl != "fast":
            continue
        refusal = _continued_prefill_refusal(spec) if continues_prefill(exp) else None
        if refusal is not None:
            raise RuntimeError(
                f"models[{i}] '{spec.name}' asks for impl: fast, but measure.prefill_chunk "
                f"({exp.measure.prefill_chunk}) continues prompts from a cached state and {refusal}; "
                f"use impl: auto (the reference for those calls, recorded in impl_used) or impl: ref"
            )
        conv = ("causal_conv1d", "causal_conv1d_update") if spec.short_conv else ()  # attention's short conv
        for op in dict.fromkeys(o for kind in spec.layer_kinds() for o in OPS_BY_KIND[kind] + conv):
            reason = fast_unusable(op, device, DTYPES[exp.dtype])
            if reason is not None:
                raise RuntimeError(f"models[{i}] '{spec.name}' asks for impl: fast, but op '{op}' cannot run: {reason}")


def describe_model(
    spec: ModelSpec, seq_len: int, dtype: torch.dtype | str = torch.float32, context: int | None = None
) -> dict:
    """Parameter counts, FLOPs per token at ``seq_len`` and the cache one sequence holds at ``context`` (default
    seq_len), from a model built on the meta device (no memory, no weights) with the measurement's allocation code."""
    model = build_model(spec.model_copy(update={"impl": "ref"}), device="meta", dtype=dtype)
    return {
        "kind": spec.kind if spec.kind != "hybrid" else f"hybrid {spec.layout}",
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": model.prefill_flops(seq_len) / seq_len,
        "cache_bytes": model.allocate_cache(1, context or seq_len, device="meta").nbytes(),
    }
