"""From an experiment file to a validated ``Experiment``: read the YAML, fill model presets, validate the
schema, then match parameter counts when the file asks for it. Every mistake is one ``ConfigError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from seqbench.config import ConfigError, Experiment, read_yaml, validation_message
from seqbench.models.matching import match_params
from seqbench.models.presets import apply_presets


def load_experiment(path: str | Path) -> Experiment:
    return experiment_from_dict(read_yaml(path), source=str(path))


def experiment_from_dict(raw: Any, source: str = "<config>") -> Experiment:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with keys name, models, sweep, ...")
    try:
        exp = Experiment.model_validate(apply_presets(raw))
        return match_params(exp) if exp.match_params is not None else exp
    except ValidationError as e:
        raise ConfigError(validation_message(e, source)) from None
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{source}: {e.args[0] if e.args else e}") from None
