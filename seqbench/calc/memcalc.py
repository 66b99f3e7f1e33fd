"""Analytic memory and compute of published architectures at any context: ``seqbench memory`` / ``seqbench flops``.

Memory (exact bytes; ``B`` = batch, ``L`` = context, ``s`` = bytes per element of the model dtype):

- KV cache, per attention layer: ``2 · B · L · kv_heads · head_dim · s`` (K and V, as ``Attention.allocate_cache``).
- Mamba-1 state, per layer: conv ``B · d_inner · d_conv · s`` + SSM ``B · d_inner · d_state · s_ssm``.
- Mamba-2 state, per layer: conv ``B · (d_inner + 2·ngroups·d_state) · d_conv · s``
  + SSM ``B · nheads · headdim · d_state · s_ssm``.
- ``s_ssm`` is the element size of the SSM state as seqbench's mixers allocate it (``SSM_STATE_DTYPE``;
  today both keep it in the model dtype, as mamba_ssm does, so ``s_ssm = s``).
- Parameters: every stored tensor (all experts of a mixture), ``param_count · s``.
- Total = parameters + KV cache + recurrent state; activations and allocator overhead are not counted.

These formulas are tested for exact equality against the caches seqbench's own mixers allocate
(``SeqModel.allocate_cache(...).nbytes()``) for every preset's layout.

Compute — an estimate, 2 FLOPs per multiply-add, matmuls plus the sequence-mixing terms; norms,
activations, softmax and embedding lookups are not counted (they are O(d) per token):

- attention layer, decode at context L: ``P_attn + 4 · (L + 1) · heads · head_dim``;
  prefill of L tokens: ``L · P_attn + 4 · heads · head_dim · L(L+1)/2`` (the causal triangle);
  ``P_attn = 2 · d · (heads + 2·kv_heads) · head_dim + 2 · heads · head_dim · d``.
- MLP: ``6 · d · hidden`` per token; mixture of experts: ``top_k · 6 · d · hidden + 2 · d · experts``.
- Mamba-1 layer (e = d_inner, n = d_state, r = dt_rank, w = d_conv), per token in prefill and decode:
  ``2·(d·2e + e·(r+2n) + r·e + e·d) + 2·e·w + 9·e·n`` (projections, conv, selective scan).
- Mamba-2 layer (g = ngroups, h = heads, Q = chunk_size), per token: ``P = 2·d·(2e + 2gn + h) + 2·e·d
  + 2·(e+2gn)·w + 2·e``; decode ``P + 5·e·n``; prefill of L tokens (chunked SSD over L_pad = Q·ceil(L/Q))
  ``L·P + 2·L_pad·Q·(g·n + e) + 4·L_pad·e·n + 2·(L_pad/Q)·e·n``.
- These restate the mixers' own ``prefill_flops`` / ``step_flops``; a test checks the equality.
- LM head: ``2 · d · vocab`` per token.

Prefill FLOPs per token at context L = (FLOPs of one L-token prefill) / L; decode FLOPs per token at
context L = FLOPs of one step with L tokens already cached.

References: Kaplan et al. 2020 (6N/2N FLOP accounting), Pope et al. 2022 (KV-cache arithmetic),
Gu & Dao 2023 (Mamba), Dao & Gu 2024 (Mamba-2), Lieber et al. 2024 (Jamba, Table 1).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from seqbench.models.published import ArchPreset

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# dtype of the SSM state as each of seqbench's mixers allocates it; None = the model dtype (as mamba_ssm does).
SSM_STATE_DTYPE: dict[str, str | None] = {"mamba": None, "mamba2": None}
DEFAULT_CONTEXTS = "4k,32k,128k,256k"


# ---- memory ------------------------------------------------------------------------------------------------


def kv_cache_bytes(p: ArchPreset, context: int, batch: int = 1, dtype: str = "bfloat16") -> int:
    per_layer = 2 * batch * context * p.n_kv_heads * p.head_dim * DTYPE_BYTES[dtype]
    return p.count("attention") * per_layer


def conv_state_bytes(p: ArchPreset, batch: int = 1, dtype: str = "bfloat16") -> int:
    s = DTYPE_BYTES[dtype]
    mamba = batch * p.d_inner * p.d_conv * s
    mamba2 = batch * (p.d_inner + 2 * p.ngroups * p.d_state) * p.d_conv * s
    return p.count("mamba") * mamba + p.count("mamba2") * mamba2


def ssm_state_dtype(kind: str, dtype: str) -> str:
    return SSM_STATE_DTYPE[kind] or dtype


def ssm_state_bytes(p: ArchPreset, batch: int = 1, dtype: str = "bfloat16") -> int:
    mamba = batch * p.d_inner * p.d_state * DTYPE_BYTES[ssm_state_dtype("mamba", dtype)]
    mamba2 = batch * p.mamba2_heads * p.headdim * p.d_state * DTYPE_BYTES[ssm_state_dtype("mamba2", dtype)]
    return p.count("mamba") * mamba + p.count("mamba2") * mamba2


def _attention_params(p: ArchPreset) -> int:
    q = p.n_heads * p.head_dim
    return p.d_model * q + 2 * p.d_model * p.n_kv_heads * p.head_dim + q * p.d_model


def _mamba_params(p: ArchPreset) -> int:
    """in_proj (x, z), depthwise conv + bias, x_proj (dt, B, C), dt_proj + bias, A_log, D, out_proj."""
    e, n, r = p.d_inner, p.d_state, p.dt_rank_value
    norms = r + 2 * n if p.ssm_norms == "weighted" else 0  # Jamba: RMSNorm scales on dt, B, C
    return p.d_model * 2 * e + e * (p.d_conv + 1) + e * (r + 2 * n) + (r * e + e) + e * n + e + e * p.d_model + norms


def _mamba2_params(p: ArchPreset) -> int:
    """in_proj (z, x, B, C, dt), conv over x|B|C + bias, dt_bias, A_log, D per head, gated norm, out_proj."""
    e, h = p.d_inner, p.mamba2_heads
    conv_ch = e + 2 * p.ngroups * p.d_state
    return p.d_model * (e + conv_ch + h) + conv_ch * (p.d_conv + 1) + 3 * h + e + e * p.d_model


def _mlp_params(p: ArchPreset, layer: int, active: bool) -> int:
    if not p.mlp_hidden:
        return 0
    dense = 3 * p.d_model * p.mlp_hidden
    norm = p.d_model
    if not p.moe_layer(layer):
        return dense + norm
    experts = p.moe.top_k if active else p.moe.experts
    return experts * dense + p.d_model * p.moe.experts + norm  # + router


_MIXER_PARAMS = {"attention": _attention_params, "mamba": _mamba_params, "mamba2": _mamba2_params}


def param_count(p: ArchPreset, active: bool = False) -> int:
    """Stored parameters (``active``: only the top-k experts of each mixture, as one token uses them)."""
    embed = p.vocab_size * p.d_model * (1 if p.tie_embeddings else 2)
    total = embed + p.d_model  # + final norm
    for i, kind in enumerate(p.layer_kinds()):
        total += p.d_model + _MIXER_PARAMS[kind](p) + _mlp_params(p, i, active)  # pre-mixer norm, mixer, MLP
    return total


@dataclass(frozen=True)
class Memory:
    preset: str
    context: int
    batch: int
    dtype: str
    kv_cache_bytes: int
    conv_state_bytes: int
    ssm_state_bytes: int
    param_count: int
    param_bytes: int

    @property
    def state_bytes(self) -> int:
        return self.conv_state_bytes + self.ssm_state_bytes

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache_bytes + self.state_bytes

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.cache_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "state_bytes": self.state_bytes, "cache_bytes": self.cache_bytes,
                "total_bytes": self.total_bytes}


def memory(p: ArchPreset, context: int, batch: int = 1, dtype: str = "bfloat16") -> Memory:
    n = param_count(p)
    return Memory(
        preset=p.name, context=context, batch=batch, dtype=dtype,
        kv_cache_bytes=kv_cache_bytes(p, context, batch, dtype), conv_state_bytes=conv_state_bytes(p, batch, dtype),
        ssm_state_bytes=ssm_state_bytes(p, batch, dtype), param_count=n, param_bytes=n * DTYPE_BYTES[dtype],
    )


# ---- compute (an estimate) --------------------------------------------------------------------------------


def _attention_flops(p: ArchPreset, context: int, prefill: bool) -> int:
    proj, width = 2 * _attention_params(p), p.n_heads * p.head_dim
    if prefill:  # QK^T and AV over the causal triangle of L(L+1)/2 query-key pairs
        return context * proj + 4 * width * (context * (context + 1) // 2)
    return proj + 4 * width * (context + 1)


def _mamba_flops(p: ArchPreset, context: int, prefill: bool) -> int:
    """Per token: projections 2·(d·2e + e·(r+2n) + r·e + e·d), conv 2·e·w, scan 9·e·n (discretise, update, read)."""
    e, n, r = p.d_inner, p.d_state, p.dt_rank_value
    per_token = 2 * (p.d_model * 2 * e + e * (r + 2 * n) + r * e + e * p.d_model) + 2 * e * p.d_conv + 9 * e * n
    return per_token * (context if prefill else 1)


def _mamba2_flops(p: ArchPreset, context: int, prefill: bool) -> int:
    """As ``Mamba2.prefill_flops`` / ``step_flops``: per token projections 2·d·(2e + 2gn + h) + 2·e·d, conv
    2·(e + 2gn)·w, D skip 2e. Decode adds 5·e·n (decay, input, readout per state element). A prefill of L
    tokens runs chunked SSD over L_pad = Q·ceil(L/Q) with Q = chunk_size: 2·L_pad·Q·(g·n + e) for C·Bᵀ and
    the diagonal blocks, 4·L_pad·e·n for chunk states and readout, 2·(L_pad/Q)·e·n for passing states."""
    e, n, g = p.d_inner, p.d_state, p.ngroups
    conv_ch = e + 2 * g * n
    per_token = 2 * (p.d_model * (e + conv_ch + p.mamba2_heads) + e * p.d_model) + 2 * conv_ch * p.d_conv + 2 * e
    if not prefill:
        return per_token + 5 * e * n
    q = p.chunk_size
    padded = q * -(-context // q)
    return context * per_token + 2 * padded * q * (g * n + e) + 4 * padded * e * n + 2 * (padded // q) * e * n


_MIXER_FLOPS = {"attention": _attention_flops, "mamba": _mamba_flops, "mamba2": _mamba2_flops}


def _mlp_flops(p: ArchPreset, layer: int) -> int:
    if not p.mlp_hidden:
        return 0
    dense = 6 * p.d_model * p.mlp_hidden
    if not p.moe_layer(layer):
        return dense
    return p.moe.top_k * dense + 2 * p.d_model * p.moe.experts  # active experts + router


def _token_flops(p: ArchPreset) -> int:
    """The context-free part of every token: MLPs (or active experts) and the LM head."""
    return 2 * p.d_model * p.vocab_size + sum(_mlp_flops(p, i) for i in range(p.n_layers))


def prefill_flops(p: ArchPreset, context: int) -> int:
    """FLOPs of one prefill of ``context`` tokens (batch 1), all logits included."""
    return context * _token_flops(p) + sum(_MIXER_FLOPS[k](p, context, True) for k in p.layer_kinds())


def decode_flops(p: ArchPreset, context: int) -> int:
    """FLOPs of one decode step (batch 1) with ``context`` tokens already cached."""
    return _token_flops(p) + sum(_MIXER_FLOPS[k](p, context, False) for k in p.layer_kinds())


@dataclass(frozen=True)
class Flops:
    preset: str
    context: int
    active_params: int
    prefill_flops: int
    prefill_flops_per_token: float
    decode_flops_per_token: int


def flops(p: ArchPreset, context: int) -> Flops:
    total = prefill_flops(p, context)
    return Flops(p.name, context, param_count(p, active=True), total, total / context, decode_flops(p, context))


# ---- parsing ------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1024, "m": 1024**2}


def parse_contexts(text: str) -> list[int]:
    """``"4k,32k,128k,256k"`` or ``"4096,1M"`` -> token counts (k = 1024, M = 1024²)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", part)
        if not m:
            raise ValueError(f"bad context '{part.strip()}': use integers with an optional k (1024) or M (1024²)")
        value = float(m[1]) * _UNITS[m[2].lower()]
        if value != int(value) or value < 1:
            raise ValueError(f"context '{part.strip()}' is not a positive whole number of tokens")
        out.append(int(value))
    return list(dict.fromkeys(out))


def human_tokens(n: int) -> str:
    for unit, scale in (("M", 1024**2), ("k", 1024)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def plot_memory(presets: list[ArchPreset], contexts: list[int], batch: int, dtype: str, path: Path) -> None:
    """Total memory (solid) and cache alone (dashed) versus context, log-log, one colour per preset."""
    from matplotlib.figure import Figure  # lazy: matplotlib is only needed for --plot; Figure needs no pyplot state

    hi = max(contexts)
    lo = min(contexts) if len(contexts) > 1 else max(1, hi // 64)
    grid = sorted({round(lo * (hi / lo) ** (i / 63)) for i in range(64)} | set(contexts))
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    gib = 1024**3
    for idx, p in enumerate(presets):
        colour = f"C{idx % 10}"
        rows = [memory(p, c, batch, dtype) for c in grid]
        ax.plot(grid, [r.total_bytes / gib for r in rows], color=colour, label=f"{p.title} total")
        ax.plot(grid, [max(r.cache_bytes, 1) / gib for r in rows], color=colour, linestyle="--",
                label=f"{p.title} KV + state")
        ax.plot(contexts, [memory(p, c, batch, dtype).total_bytes / gib for c in contexts], "o", color=colour)
    ax.set(yscale="log", xlabel="context (tokens)", ylabel="GiB",
           title=f"Inference memory, batch {batch}, {dtype} (analytic; activations excluded)")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
