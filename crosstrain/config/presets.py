"""Presets: shipped YAML files (crosstrain/presets/) and the user's own, a preset built on another
(`base:`), and a run's own config.yaml.

A preset may name `base: NAME` (a shipped preset, or a YAML file; a relative path is taken from
the naming file's folder). It then starts from that preset, which may have a base of its own, and
changes what it gives: its description replaces the base's, and each of its sections changes only
the keys it names. A section written as `~` (null) drops the base's section, leaving that section
to the defaults (and to a mesh rule, for `mesh`). Every key the chain names counts as given by
the preset (`Config.explicit`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from crosstrain.config.schema import Config, config_from_dict
from crosstrain.errors import UserError
from crosstrain.files import atomic_write

_SHIPPED = "presets"


def shipped_presets() -> list[str]:
    root = resources.files("crosstrain") / _SHIPPED
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _locate(name_or_path: str, relative_to: Optional[Path]) -> tuple[Optional[str], Optional[Path], str]:
    """(text, file, label) of a shipped preset name or a YAML file; text None if neither exists."""
    shipped = resources.files("crosstrain") / _SHIPPED / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped.read_text(), None, f"preset {name_or_path}"
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        return None, None, str(path)
    try:
        return path.read_text(), path, str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--preset: cannot read {path}: {e}") from None


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a preset must be a mapping of sections (model, optim, ...)")
    return raw


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for section, values in child.items():
        if values is None and section != "description":
            out.pop(section, None)  # `section: ~` drops the base's section
        elif isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values  # the description, or a malformed section for the checks to name
    return out


def read_preset(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset name or a path to a user's YAML file, its `base:`
    chain merged in (a one-line error naming `base` for an unknown base or a cycle)."""
    text, path, where = _locate(name_or_path, None)
    if text is None:
        raise UserError(f"--preset: unknown preset '{name_or_path}' and no such file "
                        f"(shipped: {', '.join(shipped_presets())})")
    return _resolve(text, path, where, ())


def _resolve(text: str, path: Optional[Path], where: str, chain: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    raw = _parse(text, where)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise UserError(f"{where}: base: must name a preset or a YAML file, got {base!r}")
    chain = chain + ((_identity(path, where), where),)
    found = _locate(base, path.parent if path is not None else None)
    if found[0] is None:
        raise UserError(f"{where}: base: unknown preset '{base}' and no such file "
                        f"(shipped: {', '.join(shipped_presets())})")
    idents = [ident for ident, _ in chain]
    if _identity(found[1], found[2]) in idents:
        labels = [label for _, label in chain[idents.index(_identity(found[1], found[2])):]]
        raise UserError(f"{where}: base: the presets form a cycle ({' -> '.join(labels + [found[2]])})")
    return _merge(_resolve(*found, chain), raw)


def _identity(path: Optional[Path], where: str) -> str:
    return str(path.resolve()) if path is not None else where


def load_config(preset: str, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """A preset (shipped name or YAML file) with `--set` overrides, values validated. The files it
    names are checked by the commands that read them (`check_paths`)."""
    return config_from_dict(read_preset(preset), overrides)


def load_run_config(run_dir: str | Path) -> Config:
    """A run's config.yaml. The data, tokenizer and init paths it names need not exist any more
    (a run copied off a cluster): commands that read them check them where they do."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--run-dir: {path} not found (is {run_dir} a crosstrain run directory?)")
    return config_from_dict(read_preset(str(path)))


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
