"""Run outputs people read: metrics.jsonl (one object per logged step), TensorBoard events, the
log, loss.png; summary.json is written through crosstrain.files.write_json."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from crosstrain.files import atomic_write, json_safe, pyplot, save_figure
from crosstrain.train.tensorboard import TensorBoardWriter

log = logging.getLogger("crosstrain")


class MetricsWriter:
    """Appends one JSON object per logged step; on resume or rollback, drops records past the
    restored step so that the file never holds a step twice."""

    def __init__(self, path: Path, *, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            self._rewrite(resume_step)
        self._file = open(path, "a")
        self._last_offset: int | None = None

    def _rewrite(self, keep_through: int) -> None:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_through]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._last_offset = self._file.tell()
        self._file.write(json.dumps({k: json_safe(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def amend_last(self, record: dict[str, Any]) -> None:
        """Replace the record written last (evaluation adds to a step's record)."""
        if self._last_offset is None:
            self.write(record)
            return
        self._file.truncate(self._last_offset)
        self._file.seek(self._last_offset)
        self.write(record)

    def truncate(self, keep_through: int) -> None:
        self._file.close()
        self._rewrite(keep_through)
        self._file = open(self.path, "a")
        self._last_offset = None

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def plot_losses(records: Iterable[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Training loss at every logged step, and the held-out loss with its standard error where
    evaluated (a logged step with an evaluation keeps its training loss too)."""
    plt = pyplot()
    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"], r.get("eval_loss_se") or 0.0) for r in records
             if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", lw=1.2, marker="." if len(train) <= 60 else None, ms=3)
    if evals:
        steps, losses, se = zip(*evals)
        ax.errorbar(steps, losses, yerr=[2 * e for e in se], fmt="o-", label="held-out loss (± 2 standard errors)",
                    lw=1.2, ms=4, capsize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title(title or "training loss", fontsize=10, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=True)


class Records:
    """Each logged step's record, to where it is read: metrics.jsonl and TensorBoard (written by
    process 0 only), and a log line or, on a terminal, the progress bar. Resumed at `start`,
    both files drop what an earlier attempt wrote past it: one curve, each step once."""

    def __init__(self, run_dir: Path, *, main: bool, total: int, start: int, resumed: bool):
        self.run_dir, self.total = run_dir, total
        self.writer = MetricsWriter(run_dir / "metrics.jsonl", resume_step=start if resumed else None) if main else None
        self.tb = TensorBoardWriter(run_dir / "tensorboard", resume_step=start) if main else None
        self.bar = _progress_bar(total, start) if main else None

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)
        if self.tb is not None:
            self.tb.write(record)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.3f}")
            return
        msg = (f"step {record['step']}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
               f"{record['tokens_per_s']:,.0f} tok/s")
        if record["mfu"] is not None:
            msg += f" mfu {100 * record['mfu']:.1f}%"
        log.info(msg)

    def amend(self, record: dict[str, Any], keys: tuple[str, ...]) -> None:
        """The last record again, with `keys` added (evaluation's)."""
        if self.writer is not None:
            self.writer.amend_last(record)
        if self.tb is not None:
            self.tb.write(record, keys=keys)

    def stepped(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def rewind(self, step: int) -> None:
        """Rolled back to `step`: the records after it go."""
        if self.writer is not None:
            self.writer.truncate(step)
        if self.tb is not None:
            self.tb.close()
            self.tb = TensorBoardWriter(self.run_dir / "tensorboard", resume_step=step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def flush(self) -> None:
        """Everything written so far on disk (metrics.jsonl is flushed at every record)."""
        if self.tb is not None:
            self.tb.flush()

    def pause(self) -> None:
        """The loop ended (done, preempted or failed): close the bar and the JSONL file, flush."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.tb is not None:
            self.tb.flush()

    def close(self, final: Optional[dict[str, Any]] = None) -> None:
        """Close TensorBoard's file, with `final` scalars (the run's goodput) written first."""
        if self.tb is not None:
            if final is not None:
                self.tb.write(final)
            self.tb.close()
