"""Writing files whole: a reader (or a process restarted after a kill) sees the old file or the new
one, never half of one.

Every write goes to a temporary file in the target's own directory (the same filesystem, so the
rename is atomic), is flushed to disk with fsync, and is moved over the target with `os.replace`.
The temporary name is `.<name>.<pid>.<random>.tmp`: hidden, unique per writer (two processes that
build the same cached file do not clobber each other's half-written copy), and ending in `.tmp`,
which the checkpoint manifest skips.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new contents to (by any writer that takes a file name:
    `Tokenizer.save`, `Figure.savefig`); on leaving the block without an exception it is synced
    and moved over `path`, on an exception removed."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8)."""
    with atomic_path(path) as tmp:
        # Created like open(..., "w") would (the umask decides the mode), but never over a file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, infinities the strings "inf" / "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """A JSON object, indented, its top-level non-finite floats made JSON-safe (`json_safe`)."""
    atomic_write(path, json.dumps({k: json_safe(v) for k, v in data.items()}, indent=2) + "\n")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure whole (format from `path`'s suffix, PNG by default) and close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        pyplot().close(fig)
