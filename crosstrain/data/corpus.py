"""Where documents come from.

The built-in corpus is the Python standard library of the running interpreter: present on every
machine, no download, a few million tokens of real text. Other formats live in sources.py.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if any(part in skip for part in rel):
            continue
        files.append(path)
    return sorted(files)
