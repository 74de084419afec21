"""Host-side fault handling: loss-spike detection and preemption (the goodput ledger: timing.py)."""

from __future__ import annotations

import math
import signal
import threading
from collections import deque
from typing import Optional

import numpy as np


class TrainingHalted(Exception):
    """The run stopped on purpose (faults.nonfinite=halt): exit 3, state safe at the last checkpoint."""

    exit_code = 3


class SpikeDetector:
    """Flags a loss above mean + sigma x std of the previous `window` finite, non-spike losses.

    Its state (the window) goes into every checkpoint so a resumed run decides the same."""

    def __init__(self, sigma: float, window: int, history: Optional[list[float]] = None):
        self.sigma = sigma
        self.losses: deque[float] = deque(history or [], maxlen=window)

    @property
    def enabled(self) -> bool:
        return self.sigma > 0

    def threshold(self) -> Optional[float]:
        if not self.enabled or len(self.losses) < self.losses.maxlen:
            return None
        arr = np.asarray(self.losses, dtype=np.float64)
        return float(arr.mean() + self.sigma * arr.std())

    def observe(self, loss: float) -> Optional[float]:
        """The threshold the loss exceeded (a spike), or None (and the loss joins the window)."""
        if not math.isfinite(loss):
            return None
        limit = self.threshold()
        if limit is not None and loss > limit:
            return limit
        self.losses.append(loss)
        return None

    def state(self) -> list[float]:
        return list(self.losses)


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any process, in one all-gather for all of them (with one
    process, the flags as they are). For what every process must decide at the same step: a
    checkpoint is saved collectively, so one process saving alone would hang the others."""
    import jax

    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray([int(bool(f)) for f in flags], np.int32))
    return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))


class Preemption:
    """SIGTERM sets a flag the loop polls between steps; all processes must agree to stop at the
    same step (saving is collective), so the loop agrees on it with `any_process`."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._flag.set())

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def signalled(self) -> bool:
        """Whether this process received SIGTERM."""
        return self._flag.is_set()
