"""Run outputs people read: metrics.jsonl (one object per logged step), loss.png, summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from crosstrain.files import atomic_write, json_safe, pyplot, save_figure


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
    plt = pyplot()
    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "eval_loss" not in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
