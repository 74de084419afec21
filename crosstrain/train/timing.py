"""Where a run's wall time goes: the loop's step times (`StepTimer`), the goodput buckets of this
attempt and of the run (`Goodput`, written to RUN_DIR/goodput.json by `GoodputLedger`), and a
profiler trace over chosen steps (`ProfileWindow`)."""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from crosstrain.files import atomic_write

log = logging.getLogger("crosstrain")


class StepTimer:
    """Step times as the loop sees them. A window runs from one logged record to the next: its
    mean step time and data wait go into the record. Each step's own duration is kept too (from
    one step's metrics read to the next's), so a rollback knows how much time it throws away."""

    def __init__(self) -> None:
        self.logged: list[float] = []  # each record's step time: the summary's median
        self.step_seconds: dict[int, float] = {}
        self.restart()

    def restart(self) -> None:
        """A new window from now (the loop starts, or restarts after a rollback)."""
        self._new_window()
        self.last_done = self.window_start

    def _new_window(self) -> None:
        self.window_start = time.perf_counter()
        self.window_steps, self.window_wait, self.window_fetch = 0, 0.0, 0.0

    def waited(self, seconds: float, hidden: bool = False) -> None:
        """Time spent taking the next batch. It is data wait unless `hidden`: the device was still
        busy with the step before when the batch was ready, so it waited for nothing."""
        self.window_fetch += seconds
        if not hidden:
            self.window_wait += seconds

    def dispatched(self) -> None:
        self.window_steps += 1

    def done(self, step: int, now: float) -> None:
        """Step `step`'s metrics were read at `now`."""
        self.step_seconds[step] = now - self.last_done
        self.last_done = now

    def close_window(self, now: float) -> tuple[float, float, float]:
        """(mean step time, mean data wait, mean host time taking a batch) of the window up to
        `now`; the next window starts."""
        n = max(self.window_steps, 1)
        step_time, wait, fetch = (now - self.window_start) / n, self.window_wait / n, self.window_fetch / n
        self.logged.append(step_time)
        self._new_window()  # last_done stays: the next step's duration runs from its metrics read
        return step_time, wait, fetch

    def skip_pause(self) -> None:
        """Leave out of the window the time since it started (an evaluation that just ran)."""
        self.window_start = time.perf_counter()

    def discard_after(self, step: int) -> float:
        """Forget the steps after `step` (rolled back); returns the seconds they took."""
        redo = sum(sec for s, sec in self.step_seconds.items() if step < s)
        self.step_seconds = {s: sec for s, sec in self.step_seconds.items() if s <= step}
        return redo

    def median(self) -> Optional[float]:
        """The median logged step time, the first record (compile warm-up) left out."""
        steady = self.logged[1:] or self.logged
        return statistics.median(steady) if steady else None


def lost_seconds(records: list[dict[str, Any]], after_step: int) -> float:
    """Wall time that logged records past `after_step` stood for (each record's step_time_s
    covers the steps since the record before it)."""
    total, previous = 0.0, after_step
    for r in sorted(records, key=lambda r: r["step"]):
        if r["step"] > after_step and r.get("step_time_s") is not None:
            total += r["step_time_s"] * (r["step"] - max(previous, after_step))
            previous = r["step"]
        elif r["step"] <= after_step:
            previous = r["step"]
    return total


# --------------------------------------------------------------------------------------------
# Goodput.


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


class Goodput:
    """This attempt's buckets, kept from what the trainer reports (resume, compile, evaluation,
    rollbacks) and the checkpointer's stall; `account` refreshes them and writes the ledger.
    Productive time is the loop's time less everything else that happened inside it."""

    def __init__(self, path: Path, *, write: bool, started: float):
        self.ledger = GoodputLedger(path, write=write)
        self.started = started  # perf_counter() when the process began
        self.loop_start: Optional[float] = None
        self.eval_s = self.loop_restore_s = self.loop_recomputed_s = 0.0
        self.resume_restore_s = self.resume_lost_s = 0.0

    def resumed(self, restore_s: float, records: list[dict[str, Any]], step: int) -> None:
        """Restored a checkpoint of `step` in `restore_s`; logged steps past it are done again."""
        self.resume_restore_s = restore_s
        self.resume_lost_s = self.ledger.lost(lost_seconds(records, step))

    def compiled(self, seconds: float) -> None:
        self.ledger.current.compile_s += seconds

    def started_up(self) -> None:
        self.ledger.current.startup_s = time.perf_counter() - self.started

    def loop_begins(self) -> None:
        self.loop_start = time.perf_counter()

    def evaluated(self, seconds: float) -> None:
        self.eval_s += seconds

    def rolled_back(self, restore_s: float, recomputed_s: float) -> None:
        self.loop_restore_s += restore_s
        self.loop_recomputed_s += recomputed_s

    def account(self, checkpoint_stall_s: float) -> None:
        """Refresh this attempt's buckets and write the ledger."""
        now = time.perf_counter()
        cur = self.ledger.current
        cur.wall_s = now - self.started
        cur.checkpoint_stall_s = checkpoint_stall_s
        cur.restore_s = self.resume_restore_s + self.loop_restore_s
        cur.recomputed_s = self.resume_lost_s + self.loop_recomputed_s
        cur.eval_s = self.eval_s
        if self.loop_start is not None:
            in_loop = now - self.loop_start
            cur.productive_s = max(0.0, in_loop - self.eval_s - checkpoint_stall_s - self.loop_restore_s - self.loop_recomputed_s)
        self.ledger.save()

    def reports(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the run's buckets over every attempt, this attempt's), as goodput.json has them."""
        return self.ledger.total().report(), self.ledger.current.report()


# --------------------------------------------------------------------------------------------
# Profiling.


class ProfileWindow:
    """A jax.profiler trace of steps `first` .. `first + count - 1` into `out` (0: none)."""

    def __init__(self, out: Path, first: int, count: int):
        self.out, self.first, self.count = out, first, count
        self.active = False

    def starts_at(self, step: int) -> bool:
        """Whether the trace starts before `step` runs."""
        return bool(self.first) and step == self.first and not self.active

    def before_step(self, step: int, state: Any = None) -> None:
        """`step` (1-based) is about to run; `state` is the previous step's output."""
        if self.starts_at(step):
            import jax

            jax.block_until_ready(state)  # nothing in flight: the trace holds whole steps
            self.out.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.out), create_perfetto_trace=True)
            self.active = True
            log.info("profiling steps %d..%d into %s", self.first, self.first + self.count - 1, self.out)

    def after_step(self, step: int, state: Any) -> None:
        """`step` has been dispatched (its `state` is the step's output)."""
        if self.active and step >= self.first + self.count - 1:
            self.stop(state)

    def stop(self, state: Any) -> None:
        if not self.active:
            return
        import jax

        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        log.info("profile written under %s (XProf/TensorBoard: --logdir %s; Perfetto: *.trace.json.gz)", self.out, self.out)
