"""Memory and compute of published architectures at any context, without weights: ``seqbench memory`` and
``seqbench flops``.

One source of truth: every number starts from the model seqbench builds for the preset's layout
(``models.published.model_fields``), built on the meta device (shapes only, no memory):

- KV cache, conv state and SSM state: the tensors ``SeqModel.allocate_cache`` allocates for the context,
  summed by kind (exact bytes, in the dtype asked for).
- Parameters: ``SeqModel.num_params()``; then what a published checkpoint has that seqbench's stack does not
  build: a tied LM head counts once, a mixture of experts counts all its experts (``active``: the top-k) plus
  its router, Jamba's learned RMSNorm scales on dt, B and C count (r + 2n per Mamba layer).
- FLOPs (2 per multiply-add): ``SeqModel.prefill_flops`` / ``step_flops`` — the mixers' own formulas — plus,
  on mixture-of-experts layers, the other top-k − 1 experts and the router (2·d·experts) per token.
- Total memory = parameters + KV cache + recurrent state; activations and allocator overhead are not counted.

Prefill FLOPs per token at context L = (FLOPs of one L-token prefill) / L; decode FLOPs per token at context
L = FLOPs of one step with L tokens already cached.

References: Kaplan et al. 2020 (6N/2N FLOP accounting), Pope et al. 2022 (KV-cache arithmetic),
Gu & Dao 2023 (Mamba), Dao & Gu 2024 (Mamba-2), Lieber et al. 2024 (Jamba, Table 1).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from seqbench.config import ModelSpec
from seqbench.messages import did_you_mean
from seqbench.models import DTYPES, build_model
from seqbench.models.base import SeqModel
from seqbench.models.published import ArchPreset, model_fields, resolve_presets

# Which part of the inference state each cache tensor of seqbench's mixers is.
CACHE_PART = {"k": "kv", "v": "kv", "conv_state": "conv", "ssm_state": "ssm", "state": "ssm"}


@lru_cache(maxsize=64)
def seqbench_model(p: ArchPreset) -> SeqModel:
    """The stack seqbench builds for the preset's layout, on the meta device (no memory, no weights)."""
    spec = ModelSpec(name=p.name, impl="ref", **model_fields(p))
    with torch.device("meta"):  # every factory call stays on meta, also those without a device argument
        return build_model(spec, device="meta")


# ---- memory ------------------------------------------------------------------------------------------------


def cache_parts(p: ArchPreset, context: int, batch: int = 1, dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes of the KV cache, conv state and SSM state for ``context`` tokens, as the mixers allocate them."""
    cache = seqbench_model(p).allocate_cache(batch, context, dtype=DTYPES[dtype], device="meta")
    parts = {"kv": 0, "conv": 0, "ssm": 0}
    for layer in cache.layers:
        for key, t in layer.items():
            parts[CACHE_PART[key]] += t.numel() * t.element_size()
    return parts


def kv_cache_bytes(p: ArchPreset, context: int, batch: int = 1, dtype: str = "bfloat16") -> int:
    return cache_parts(p, context, batch, dtype)["kv"]


def _mlp_params(model: SeqModel) -> int:
    mlp = next((b.mlp for b in model.blocks if b.mlp is not None), None)
    return sum(w.numel() for w in mlp.parameters()) if mlp is not None else 0


def _moe_layers(p: ArchPreset) -> int:
    return sum(p.moe_layer(i) for i in range(p.n_layers))


def param_count(p: ArchPreset, active: bool = False) -> int:
    """Stored parameters (``active``: only the top-k experts of each mixture, as one token uses them)."""
    model = seqbench_model(p)
    total = model.num_params()
    if p.tie_embeddings:
        total -= model.head.weight.numel()
    if p.moe is not None:
        experts = p.moe.top_k if active else p.moe.experts
        total += _moe_layers(p) * ((experts - 1) * _mlp_params(model) + p.d_model * p.moe.experts)
    if p.ssm_norms == "weighted":
        total += p.count("mamba") * (p.dt_rank_value + 2 * p.d_state)
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
    parts = cache_parts(p, context, batch, dtype)
    return Memory(
        preset=p.name, context=context, batch=batch, dtype=dtype, kv_cache_bytes=parts["kv"],
        conv_state_bytes=parts["conv"], ssm_state_bytes=parts["ssm"], param_count=n,
        param_bytes=n * DTYPES[dtype].itemsize,
    )


# ---- compute ---------------------------------------------------------------------------------------------------


def _moe_extra_flops_per_token(p: ArchPreset) -> int:
    """The top-k − 1 experts beyond the one dense MLP seqbench builds, and the router, on every MoE layer."""
    if p.moe is None:
        return 0
    model = seqbench_model(p)
    expert = next(b.mlp for b in model.blocks if b.mlp is not None).flops_per_token()
    return _moe_layers(p) * ((p.moe.top_k - 1) * expert + 2 * p.d_model * p.moe.experts)


def prefill_flops(p: ArchPreset, context: int) -> int:
    """FLOPs of one prefill of ``context`` tokens (batch 1)."""
    return seqbench_model(p).prefill_flops(context) + context * _moe_extra_flops_per_token(p)


def decode_flops(p: ArchPreset, context: int) -> int:
    """FLOPs of one decode step (batch 1) with ``context`` tokens already cached."""
    return seqbench_model(p).step_flops(context) + _moe_extra_flops_per_token(p)


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


def parse_request(preset: list[str], context: str, dtype: str) -> tuple[list[ArchPreset], list[int]]:
    """The presets and contexts a calculator command names; ValueError with one message for the user."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype '{dtype}' is not known{did_you_mean(dtype, DTYPES)}; allowed: {', '.join(DTYPES)}")
    return resolve_presets(preset), parse_contexts(context)


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
