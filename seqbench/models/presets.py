"""Named size presets per model kind, merged under the fields a config gives explicitly.

``tiny`` is for tests (seconds), ``small`` for CPU demos, ``base`` for GPU runs. A preset only fills in
fields the user did not set, so ``{kind: mamba, preset: small, n_layers: 2}`` is a 2-layer small Mamba.
"""

from __future__ import annotations

import difflib
from typing import Any

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


def preset_fields(kind: str, name: str) -> dict[str, Any]:
    table = KIND_PRESETS.get(kind, {})
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown preset '{name}' for kind '{kind}'{hint}; allowed: {', '.join(table) or 'none'}")
    return dict(table[name])


def apply_presets(raw: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw config with each model's preset fields filled in under its own."""
    models = raw.get("models")
    if not isinstance(models, list):
        return raw
    out = []
    for i, m in enumerate(models):
        if isinstance(m, dict) and m.get("preset") is not None and m.get("kind") in KIND_PRESETS:
            try:
                m = {**preset_fields(m["kind"], str(m["preset"])), **m}
            except ValueError as e:
                raise ValueError(f"models[{i}].preset: {e}") from None
        out.append(m)
    return {**raw, "models": out}
