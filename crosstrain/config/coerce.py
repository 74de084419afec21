"""Typed values from YAML and `--set` strings: one function turns a raw value into a field's
declared type (int, float, bool, str, Literal, tuple, nested dataclass), naming the field when it
cannot. Generic over dataclasses: it knows nothing of crosstrain's sections."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

import yaml

from crosstrain.errors import ConfigError


def plain(value: Any) -> Any:
    """Nested dicts, lists and scalars only (tuples become lists), as YAML and JSON write them."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(name, f"must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        item_tp = args[0]
        if isinstance(value, str):
            value = yaml_value(value, name)
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return tuple(coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            # A dataclass may name the field a bare string stands for (a source given as its path).
            key = getattr(tp, "FROM_STRING", None)
            value = {key: value} if key else yaml_value(value, name)
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = math.nan
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # a bug, not a user mistake


def yaml_value(text: str, name: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(name, f"not valid YAML: {str(e).splitlines()[0]}") from None


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """An instance of the dataclass `cls` from a mapping of its fields (unknown keys refused)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)

