"""Run configuration: frozen dataclasses, shipped YAML presets, typed `--set` overrides.

A config is built in one place (`config_from_dict`, which `load_config` and `Config.override` go
through) and its values validated there, before anything compiles: a wrong type or an impossible
value raises `ConfigError` naming the field. Whether the files it names exist is checked by the
commands that read them (`check_paths`), so a run copied off a cluster can still be sampled,
evaluated and exported. The resolved config is plain data (`to_dict`) and is written whole to
the run directory so a run can be reproduced.

- schema.py: the sections and their keys (each documented where it is declared), building and
  `Config.override`;
- coerce.py: YAML values and `--set` strings into each key's declared type;
- checks.py: value rules, path checks, and what a resumed run may change;
- presets.py: shipped and user presets (`base:`), a run's config.yaml.
"""

from __future__ import annotations

import math

from crosstrain.config.checks import RESUMABLE_KEYS, check_paths, resume_differences, schedule_change, validate
from crosstrain.config.presets import load_config, load_run_config, read_preset, save_config, shipped_presets
from crosstrain.config.schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    DistillConfig,
    FaultsConfig,
    InitConfig,
    MeshConfig,
    MixturePhase,
    ModelConfig,
    OptimConfig,
    SourceConfig,
    TrainConfig,
    config_from_dict,
    parse_override,
)
from crosstrain.errors import ConfigError


def parse_count(text: str, name: str) -> float:
    """'6.3T', '100B', '2.5e9' -> a number (for token budgets)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
    s = text.strip().upper().replace("_", "")
    factor = 1.0
    if s and s[-1] in scale:
        factor, s = scale[s[-1]], s[:-1]
    try:
        value = float(s) * factor
    except ValueError:
        raise ConfigError(name, f"expected a count such as 6.3T or 2e9, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(name, f"must be positive, got {text!r}")
    return value


def dtype_of(name: str):
    """The JAX dtype of a config dtype name; an unresolved "auto" is the portable bfloat16."""
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "auto": jnp.bfloat16}[name]


__all__ = [
    "Config",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "MeshConfig",
    "DataConfig",
    "SourceConfig",
    "MixturePhase",
    "CheckpointConfig",
    "InitConfig",
    "DistillConfig",
    "FaultsConfig",
    "SECTIONS",
    "RESUMABLE_KEYS",
    "check_paths",
    "validate",
    "read_preset",
    "parse_override",
    "dtype_of",
    "load_config",
    "load_run_config",
    "config_from_dict",
    "save_config",
    "shipped_presets",
    "parse_count",
    "resume_differences",
    "schedule_change",
]
