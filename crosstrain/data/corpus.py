"""Where documents come from.

The built-in corpus is the Python standard library of the running interpreter: present on every
machine, no download, a few million tokens of real text. A user's `--data DIR` is a directory of
`.txt` files read recursively.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from crosstrain.errors import UserError


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


def text_files(directory: Path) -> list[Path]:
    if not directory.exists():
        raise UserError(f"--data: {directory} does not exist")
    if directory.is_file():
        return [directory]
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"--data: no .txt files under {directory}")
    return files


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def fingerprint_files(files: list[Path]) -> str:
    """Content-derived identity of a file list: paths, sizes and modification times."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def iter_documents(files: list[Path], max_bytes: int = 0) -> Iterator[Document]:
    total = 0
    for p in files:
        text = read_text(p)
        if not text.strip():
            continue
        if max_bytes and total + len(text) > max_bytes:
            if total == 0:
                yield Document(str(p), text[:max_bytes])
            return
        total += len(text)
        yield Document(str(p), text)


def cache_dir() -> Path:
    return Path(os.environ.get("CROSSTRAIN_CACHE", Path.home() / ".cache" / "crosstrain"))
