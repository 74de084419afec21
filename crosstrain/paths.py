"""Where crosstrain keeps what it can rebuild: tokenizers, token stores, the CPU's measured peak."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$CROSSTRAIN_CACHE, else ~/.cache/crosstrain."""
    return Path(os.environ.get("CROSSTRAIN_CACHE", Path.home() / ".cache" / "crosstrain"))
