"""Logging: timestamped lines on stderr and in RUN_DIR/train.log; only process 0 speaks freely."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("crosstrain")


def setup(run_dir: Optional[Path] = None, *, process_index: int = 0) -> logging.Logger:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(logging.INFO if process_index == 0 else logging.WARNING)
    log.addHandler(err)
    if run_dir is not None and process_index == 0:
        # Opened at the first record: a command refused before it logs anything leaves no empty log.
        fh = logging.FileHandler(run_dir / "train.log", delay=True)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    # Orbax and absl are chatty at INFO.
    logging.getLogger("absl").setLevel(logging.WARNING)
    return log
