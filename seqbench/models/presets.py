"""Presets for the models of a run config, applied to the raw YAML before validation.

Two kinds of ``preset:``, both filling only the fields a model does not set itself:

1. Size presets per kind — ``{kind: mamba, preset: small, n_layers: 2}`` is a 2-layer small Mamba.
   ``tiny`` is for tests (seconds), ``small`` for CPU demos, ``base`` for GPU runs.
2. Published architectures (``seqbench/presets/archs.yaml``, see ``seqbench.archs``) — the preset fills
   ``kind`` (attention / mamba / mamba2, or hybrid with its ``layout``) and every size. An optional
   ``scale:`` shrinks it so the same layout runs on a CPU::

       {name: jamba-mini, preset: jamba-v0.1, scale: {layers: 0.25, width: 0.0625}, vocab_size: 256}

   ``scale`` maps keys to values, applied in this order:

   - ``layers: f`` — n_layers × f. The result must be a whole number of layout blocks (Jamba: a multiple
     of 8), so the layout (Jamba's attention at position 4 of every 8 layers) is kept.
   - ``width: f`` — d_model × f, keeping every count: attention heads and KV heads (head_dim shrinks),
     Mamba-2 heads and groups (headdim shrinks), d_state, d_conv, expand and the MLP ratio. Each scaled
     size must come out a whole number, unless the same ``scale`` sets it explicitly (e.g. ``headdim``).
   - explicit values for ``n_layers, d_model, n_heads, n_kv_heads, vocab_size, mlp_expand, d_state,
     d_conv, expand, headdim, ngroups, chunk_size`` replace the preset's (after the factors).

   Fields written next to ``preset`` (outside ``scale``) win over both. ``vocab_size`` is never scaled;
   set it for CPU runs (Llama-3's 128256 rows dominate a narrow model). ``scale`` is consumed here, so
   ``ModelSpec`` never sees it.

   Mixture of experts: seqbench's Block has one dense SwiGLU MLP (``mlp_expand``), so a Jamba or Mixtral
   preset runs with a dense MLP of one expert's size in every layer (Jamba's MoE every other layer and
   Mixtral's 8 experts, top-2, are not built). ``seqbench memory`` / ``seqbench flops`` still count the
   published mixtures. Jamba's and Falcon-Mamba's RMSNorms on dt, B and C are not built either.

Errors raise ValueError with a path-like message (``preset: ...``, ``scale.width: ...``); the caller
prefixes ``models[i].`` and turns it into a ConfigError.
"""

from __future__ import annotations

from typing import Any

from seqbench.messages import did_you_mean as _did_you_mean
from seqbench.models.published import arch_names, did_you_mean, find_arch, model_fields

KIND_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "attention": {
        "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4},
        "small": {"d_model": 256, "n_layers": 4, "n_heads": 4},
        "base": {"d_model": 768, "n_layers": 12, "n_heads": 12, "mlp_expand": 8 / 3},
    },
    "mamba": {
        "tiny": {"d_model": 64, "n_layers": 2, "d_state": 8},
        "small": {"d_model": 256, "n_layers": 4, "d_state": 16},
        "base": {"d_model": 768, "n_layers": 24, "d_state": 16},
    },
    "mamba2": {
        "tiny": {"d_model": 64, "n_layers": 2, "d_state": 16, "headdim": 16, "chunk_size": 16},
        "small": {"d_model": 256, "n_layers": 4, "d_state": 64, "headdim": 32, "chunk_size": 64},
        "base": {"d_model": 768, "n_layers": 24, "d_state": 128, "headdim": 64, "chunk_size": 256},
    },
    "s4d": {
        "tiny": {"d_model": 64, "n_layers": 2, "d_state": 16},
        "small": {"d_model": 256, "n_layers": 4, "d_state": 64},
        "base": {"d_model": 768, "n_layers": 12, "d_state": 64, "mlp_expand": 8 / 3},
    },
    "hybrid": {
        "tiny": {"d_model": 64, "n_layers": 4, "n_heads": 4, "d_state": 8, "layout": "MMMA"},
        "small": {"d_model": 256, "n_layers": 8, "n_heads": 4, "d_state": 16, "layout": "MMMA"},
        "base": {"d_model": 768, "n_layers": 24, "n_heads": 12, "d_state": 16, "layout": "MMMMMMMA"},
    },
}

SCALE_FACTORS = ("layers", "width")
SCALE_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "mlp_expand", "d_state", "d_conv",
                "expand", "headdim", "ngroups", "chunk_size")


def preset_fields(kind: str, name: str) -> dict[str, Any]:
    table = KIND_PRESETS.get(kind, {})
    if name not in table:
        hint = _did_you_mean(name, list(table) + arch_names(), cutoff=0.5)
        raise ValueError(
            f"unknown preset '{name}' for kind '{kind}'{hint}; allowed: {', '.join(table) or 'none'} "
            f"(size presets) or a published architecture: {', '.join(arch_names())}"
        )
    return dict(table[name])


def _whole(value: float, what: str, key: str) -> int:
    if abs(value - round(value)) > 1e-9 or round(value) < 1:
        raise ValueError(f"scale.{key}: {what} = {value:g} is not a positive whole number")
    return int(round(value))


def _factor(scale: dict[str, Any], key: str) -> float | None:
    f = scale.get(key)
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0:
        raise ValueError(f"scale.{key}: must be a positive number (a factor), got {f!r}")
    return float(f)


def scale_fields(fields: dict[str, Any], scale: Any, layout_len: int) -> dict[str, Any]:
    """Apply a ``scale:`` mapping (factors ``layers``/``width``, then explicit values) to preset fields."""
    if not isinstance(scale, dict):
        raise ValueError(f"scale: must be a mapping like {{layers: 0.25, width: 0.125}}, got {scale!r}")
    allowed = [*SCALE_FACTORS, *SCALE_FIELDS]
    for key in scale:
        if key not in allowed:
            hint = _did_you_mean(key, allowed, cutoff=0.5)
            raise ValueError(f"scale: unknown key '{key}'{hint}; allowed: {', '.join(allowed)}")
    out = dict(fields)
    layers = _factor(scale, "layers")
    if layers is not None:
        out["n_layers"] = _whole(fields["n_layers"] * layers, f"n_layers {fields['n_layers']} × {layers:g}", "layers")
    width = _factor(scale, "width")
    if width is not None:
        out["d_model"] = _whole(fields["d_model"] * width, f"d_model {fields['d_model']} × {width:g}", "width")
        # head sizes shrink with the width unless the scale sets the count or size itself
        if "n_heads" in fields and "n_heads" not in scale and "d_model" not in scale:
            head_dim = fields["d_model"] // fields["n_heads"]
            _whole(head_dim * width, f"attention head_dim {head_dim} × {width:g}", "width")
        if "headdim" in fields and "headdim" not in scale:
            what = f"Mamba-2 headdim {fields['headdim']} × {width:g}"
            out["headdim"] = _whole(fields["headdim"] * width, what, "width")
    for key in SCALE_FIELDS:
        if key in scale:
            value = scale[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            if not ok or (key != "mlp_expand" and not float(value).is_integer()):
                raise ValueError(f"scale.{key}: must be a positive {'number' if key == 'mlp_expand' else 'integer'}, "
                                 f"got {value!r}")
            out[key] = value if key == "mlp_expand" else int(value)
    if out["n_layers"] % layout_len:
        where = "n_layers" if "n_layers" in scale else "layers"
        raise ValueError(f"scale.{where}: {out['n_layers']} layers is not a whole number of {layout_len}-layer blocks "
                         f"of layout '{fields.get('layout')}'; use a multiple of {layout_len}")
    return out


def _resolve(m: dict[str, Any]) -> dict[str, Any]:
    """One model's raw mapping with its preset applied and ``scale`` consumed."""
    preset, scale, kind = m.get("preset"), m.get("scale"), m.get("kind")
    if not isinstance(kind, str | None):
        return m  # the schema reports a kind of the wrong type, with the allowed kinds
    rest = {k: v for k, v in m.items() if k != "scale"}
    if preset is None:
        if scale is not None:
            raise ValueError(f"scale: needs a published-architecture preset (preset: one of {', '.join(arch_names())})")
        return m
    name = str(preset)
    if kind in KIND_PRESETS and name in KIND_PRESETS[kind]:
        if scale is not None:
            raise ValueError(f"scale: applies to published-architecture presets, not to the size preset '{name}'")
        return {**preset_fields(kind, name), **rest}
    arch = find_arch(name)
    if arch is None:
        if kind in KIND_PRESETS:
            try:
                preset_fields(kind, name)
            except ValueError as e:
                raise ValueError(f"preset: {e}") from None
        if kind is None:
            hint, allowed = did_you_mean(name), ", ".join(arch_names())
            raise ValueError(f"preset: unknown architecture preset '{name}'{hint}; allowed: {allowed} "
                             "(or give a kind and a size preset: tiny, small, base)")
        return m  # an unknown kind: ModelSpec reports it with the allowed kinds
    fields = model_fields(arch)
    if kind is not None and kind != fields["kind"]:
        raise ValueError(f"kind: preset '{arch.name}' is a '{fields['kind']}' model; drop kind or set it to "
                         f"'{fields['kind']}'")
    if scale is not None:
        fields = scale_fields({**fields, "layout": arch.layout}, scale, len(arch.layout))
        if arch.kind != "hybrid":
            fields.pop("layout")
    return {**fields, **rest}


def apply_presets(raw: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw config with each model's preset applied (see the module docstring)."""
    models = raw.get("models")
    if not isinstance(models, list):
        return raw
    out = []
    for i, m in enumerate(models):
        if isinstance(m, dict):
            try:
                m = _resolve(m)
            except ValueError as e:
                raise ValueError(f"models[{i}].{e}") from None
        out.append(m)
    return {**raw, "models": out}
