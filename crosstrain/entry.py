"""The `crosstrain` program (console script and `python -m crosstrain`): restart once with glibc's
huge pages, before anything heavy is imported (crosstrain/platform.py), then run the command line."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from crosstrain.platform import reexec_with_huge_pages


def run_cli(argv: Optional[Sequence[str]] = None, *, as_module: bool = False) -> None:
    """Huge pages first (the process `exec`s itself, same pid), then `crosstrain.cli.main`."""
    args = list(sys.argv[1:] if argv is None else argv)
    reexec_with_huge_pages(["-m", "crosstrain", *args] if as_module else [sys.argv[0], *args])
    from crosstrain.cli import main  # imported after the restart: the first process only restarts

    raise SystemExit(main(args))
