"""Shape presets of published architectures (hyper-parameters only, no weights).

The numbers live in ``seqbench/models/published.yaml``, one entry per model, each citing its paper and model
card. This module loads them into :class:`ArchPreset` objects, answers per-layer questions (which mixer,
dense MLP or mixture of experts) and converts between a preset and seqbench's own ``ModelSpec``:

- :func:`model_fields` gives the ``ModelSpec`` fields that build the same layout with seqbench's mixers
  (used by ``apply_presets`` for ``{preset: jamba-v0.1, scale: ...}`` in run configs);
- :func:`arch_from_spec` describes a ``ModelSpec`` as an ``ArchPreset`` so that the memory and FLOP
  calculator (``seqbench.calc.memcalc``) can be checked against models seqbench actually builds.

References: Touvron et al. 2023 (Llama 2), Grattafiori et al. 2024 (Llama 3), Jiang et al. 2023/2024
(Mistral, Mixtral), Gu & Dao 2023 (Mamba), Dao & Gu 2024 (Mamba-2), Zuo et al. 2024 (Falcon Mamba),
Lieber et al. 2024 (Jamba).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from seqbench.config import LAYOUT_LETTERS
from seqbench.messages import did_you_mean as _did_you_mean

PRESET_FILE = Path(__file__).with_name("published.yaml")
# the letters of config.LAYOUT_LETTERS whose mixers published checkpoints use (no S4D counterpart here)
LETTER_KIND = {letter: kind for letter, kind in LAYOUT_LETTERS.items() if kind != "s4d"}
KIND_LETTER = {v: k for k, v in LETTER_KIND.items()}
SSM_NORMS = ("none", "weighted", "unweighted")


@dataclass(frozen=True)
class MoE:
    """Mixture of SwiGLU experts on layers ``i`` with ``i % period == offset`` (Shazeer et al. 2017)."""

    experts: int
    top_k: int
    period: int = 1
    offset: int = 0


@dataclass(frozen=True)
class ArchPreset:
    """The shape of one architecture. Sizes are those of the checkpoint (vocab already padded).

    ``layout`` is one letter per layer of the repeating block (A attention, M Mamba-1, D Mamba-2), tiled
    to ``n_layers``. ``mlp_hidden`` is the SwiGLU hidden size (0: no MLP); with ``moe`` the MLP of the
    selected layers is ``moe.experts`` such SwiGLUs plus a router. ``ssm_norms`` marks Mamba-1 variants
    with RMSNorm on dt, B and C (Jamba: learned scales; Falcon-Mamba: no parameters).
    """

    name: str
    title: str
    source: str
    layout: str
    n_layers: int
    d_model: int
    vocab_size: int
    tie_embeddings: bool = False
    mlp_hidden: int = 0
    moe: MoE | None = None
    # attention
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    # Mamba-1 / Mamba-2
    d_state: int = 0
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    ssm_norms: str = "none"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    # bookkeeping
    published_params: float | None = None
    published_active_params: float | None = None
    notes: str = ""

    # --- derived sizes ----------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        """Mamba-1 dt projection rank; "auto" is ceil(d_model / 16) as in Gu & Dao (2023)."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def mamba2_heads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def kind(self) -> str:
        """``attention``, ``mamba`` or ``mamba2`` for single-mixer stacks, else ``hybrid``."""
        letters = set(self.layout)
        return LETTER_KIND[self.layout[0]] if len(letters) == 1 else "hybrid"

    def layer_kinds(self) -> list[str]:
        """The mixer kind of every layer (the layout tiled to ``n_layers``)."""
        return [LETTER_KIND[c] for c in self.layout] * (self.n_layers // len(self.layout))

    def moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` carries a mixture of experts instead of one dense MLP."""
        return self.moe is not None and i % self.moe.period == self.moe.offset

    def count(self, kind: str) -> int:
        return self.layer_kinds().count(kind)


def _check(p: ArchPreset) -> ArchPreset:
    """Reject presets (or converted specs) whose sizes do not fit together."""
    where = f"arch preset '{p.name}'"
    if not p.layout or any(c not in LETTER_KIND for c in p.layout):
        raise ValueError(f"{where}: layout '{p.layout}' must use the letters {', '.join(LETTER_KIND)}")
    if p.n_layers % len(p.layout):
        raise ValueError(f"{where}: layout length {len(p.layout)} must divide n_layers ({p.n_layers})")
    if "A" in p.layout and (p.n_heads <= 0 or p.n_kv_heads <= 0 or p.n_heads % p.n_kv_heads):
        raise ValueError(f"{where}: attention needs n_heads divisible by n_kv_heads (got {p.n_heads}, {p.n_kv_heads})")
    if "A" in p.layout and p.n_heads * p.head_dim != p.d_model:
        raise ValueError(f"{where}: n_heads * head_dim = {p.n_heads * p.head_dim} must equal d_model ({p.d_model})")
    if set(p.layout) & {"M", "D"} and p.d_state <= 0:
        raise ValueError(f"{where}: SSM layers need d_state > 0")
    if "D" in p.layout and (p.d_inner % p.headdim or p.mamba2_heads % p.ngroups):
        raise ValueError(f"{where}: headdim must divide d_inner and ngroups must divide the number of heads")
    if p.ssm_norms not in SSM_NORMS:
        raise ValueError(f"{where}: ssm_norms must be one of {', '.join(SSM_NORMS)}")
    if p.moe is not None and not (0 < p.moe.top_k <= p.moe.experts and 0 <= p.moe.offset < p.moe.period):
        raise ValueError(f"{where}: moe needs 0 < top_k <= experts and 0 <= offset < period")
    return p


def _from_dict(name: str, raw: dict[str, Any]) -> ArchPreset:
    known = {f.name for f in fields(ArchPreset)} - {"name"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"arch preset '{name}': unknown keys {unknown}")
    data = dict(raw)
    if data.get("moe") is not None:
        data["moe"] = MoE(**data["moe"])
    for key in ("published_params", "published_active_params"):
        if data.get(key) is not None:  # YAML 1.1 reads "52.0e9" as a string
            data[key] = float(data[key])
    return _check(ArchPreset(name=name, **data))


@lru_cache(maxsize=1)
def load_presets() -> dict[str, ArchPreset]:
    """All shipped presets, keyed by their lower-case name (file order)."""
    text = PRESET_FILE.read_text()
    return {name: _from_dict(name, raw) for name, raw in yaml.safe_load(text).items()}


def arch_names() -> list[str]:
    return list(load_presets())


def find_arch(name: str) -> ArchPreset | None:
    """The preset called ``name`` (its key or its title, case-insensitive), else None."""
    key = name.strip().lower()
    presets = load_presets()
    if key in presets:
        return presets[key]
    return next((p for p in presets.values() if p.title.lower() == key), None)


def did_you_mean(name: str) -> str:
    """`` (did you mean 'x'?)`` for the closest preset name, or an empty string."""
    return _did_you_mean(name.strip().lower(), arch_names(), cutoff=0.5)


def get_arch(name: str) -> ArchPreset:
    """The preset called ``name``; ValueError with a did-you-mean and the allowed names otherwise."""
    preset = find_arch(name)
    if preset is None:
        allowed = ", ".join(arch_names())
        raise ValueError(f"unknown architecture preset '{name}'{did_you_mean(name)}; allowed: {allowed}")
    return preset


def resolve_presets(names: list[str]) -> list[ArchPreset]:
    """Presets by name (repeatable or comma-separated; ``all`` = every preset); ValueError lists the bad ones."""
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if any(n.lower() == "all" for n in wanted):
        wanted = arch_names()
    if not wanted:
        raise ValueError(f"name at least one --preset; allowed: {', '.join(arch_names())}, all")
    found, bad = [], []
    for n in wanted:
        p = find_arch(n)
        (found if p else bad).append(p or n)
    if bad:
        hints = "; ".join(f"'{b}'{did_you_mean(b)}" for b in bad)
        raise ValueError(f"unknown preset {hints}; allowed: {', '.join(arch_names())}, all")
    return list(dict.fromkeys(found))


# ---- bridges to seqbench's own models -----------------------------------------------------------------


def model_fields(p: ArchPreset) -> dict[str, Any]:
    """``ModelSpec`` fields that build this layout with seqbench's mixers.

    seqbench's Block has one dense SwiGLU, so a mixture of experts becomes a dense MLP of one expert's size
    (``mlp_expand = mlp_hidden / d_model``); the extra dt/B/C norms of Jamba and Falcon-Mamba are not built.
    """
    out: dict[str, Any] = {
        "kind": p.kind,
        "n_layers": p.n_layers,
        "d_model": p.d_model,
        "vocab_size": p.vocab_size,
        "mlp_expand": p.mlp_hidden / p.d_model,
    }
    if p.kind == "hybrid":
        out["layout"] = p.layout
    if "A" in p.layout:
        out.update(n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, rope_theta=p.rope_theta)
    if set(p.layout) & {"M", "D"}:
        out.update(d_state=p.d_state, d_conv=p.d_conv, expand=p.expand)
    if "M" in p.layout and p.dt_rank != "auto":
        out["dt_rank"] = p.dt_rank
    if "D" in p.layout:
        out.update(headdim=p.headdim, ngroups=p.ngroups, chunk_size=p.chunk_size)
    return out


def arch_from_spec(spec: Any) -> ArchPreset:
    """Describe a validated ``ModelSpec`` as an ArchPreset (untied head, dense MLPs, no dt/B/C norms).

    Defaults are resolved as ``build_model`` resolves them (heads = d_model // 64, d_state 16 for Mamba-1
    and 128 for Mamba-2). S4D layers have no counterpart here and raise ValueError.
    """
    kinds = spec.layer_kinds()
    period = kinds[: len(spec.layout)] if spec.kind == "hybrid" else kinds[:1]
    if "s4d" in period:
        raise ValueError(f"model '{spec.name}': S4D layers are not covered by the architecture calculator")
    if spec.d_state is None and {"mamba", "mamba2"} <= set(period):
        raise ValueError(f"model '{spec.name}': set d_state; Mamba-1 and Mamba-2 layers default to different sizes")
    heads = spec.n_heads or max(1, spec.d_model // 64)
    default_state = 128 if "mamba2" in period else 16
    mlp_hidden = round(spec.mlp_expand * spec.d_model) if spec.mlp_expand else 0
    return _check(
        ArchPreset(
            name=spec.name, title=spec.name, source="seqbench ModelSpec",
            layout="".join(KIND_LETTER[k] for k in period), n_layers=spec.n_layers, d_model=spec.d_model,
            vocab_size=spec.vocab_size, tie_embeddings=False, mlp_hidden=mlp_hidden,
            n_heads=heads, n_kv_heads=spec.n_kv_heads or heads, head_dim=spec.d_model // heads,
            rope_theta=spec.rope_theta, d_state=spec.d_state or default_state, d_conv=spec.d_conv,
            expand=spec.expand, dt_rank=spec.dt_rank, headdim=spec.headdim, ngroups=spec.ngroups,
            chunk_size=spec.chunk_size,
        )
    )
