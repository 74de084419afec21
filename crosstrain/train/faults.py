"""Host-side fault handling: loss-spike detection, preemption, and the goodput ledger."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np

from crosstrain.files import atomic_write


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


class Preemption:
    """SIGTERM sets a flag the loop polls between steps; all processes must agree to stop at the
    same step (saving is collective), so with several processes the flag is all-gathered."""

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

    def requested(self) -> bool:
        import jax

        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
        return bool(np.any(flags))


@dataclass
class Buckets:
    """Seconds of wall time by what they bought. goodput = productive / wall."""

    wall_s: float = 0.0
    productive_s: float = 0.0  # training steps whose results were kept
    startup_s: float = 0.0  # process start to the first step: imports, data, init, compile
    compile_s: float = 0.0  # (part of startup)
    restore_s: float = 0.0  # reading checkpoints back (resume and rollbacks)
    checkpoint_stall_s: float = 0.0  # the loop blocked on saving and sealing
    recomputed_s: float = 0.0  # steps computed again: lost to an interruption or a rollback
    eval_s: float = 0.0

    def add(self, other: "Buckets") -> "Buckets":
        return Buckets(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def report(self) -> dict:
        d = asdict(self)
        accounted = self.productive_s + self.startup_s + self.restore_s + self.checkpoint_stall_s + self.recomputed_s + self.eval_s
        d["other_s"] = max(0.0, self.wall_s - accounted)
        d["goodput"] = self.productive_s / self.wall_s if self.wall_s > 0 else None
        return d


class GoodputLedger:
    """RUN_DIR/goodput.json: this run's buckets summed over every attempt (start) of the run.

    Written at every logged step, so a killed attempt leaves its numbers up to its last log. A
    resumed attempt moves the time of the steps it must redo from `productive` to `recomputed`."""

    def __init__(self, path: Path, *, write: bool):
        self.path = path
        self.write_enabled = write
        self.previous = Buckets()
        self.attempts = 1
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                self.previous = Buckets(**{f.name: float(data["total"].get(f.name, 0.0)) for f in fields(Buckets)})
                self.attempts = int(data.get("attempts", 0)) + 1
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self.current = Buckets()

    def lost(self, seconds: float) -> float:
        """Steps of earlier attempts that will be computed again: no longer productive. Returns
        the seconds moved (this attempt books them as recomputed)."""
        moved = min(seconds, self.previous.productive_s)
        self.previous.productive_s -= moved
        return moved

    def total(self) -> Buckets:
        return self.previous.add(self.current)

    def save(self) -> None:
        if not self.write_enabled:
            return
        data = {"attempts": self.attempts, "total": self.total().report(), "this_attempt": self.current.report()}
        atomic_write(self.path, json.dumps(data, indent=2) + "\n")
