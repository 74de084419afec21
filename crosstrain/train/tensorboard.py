"""TensorBoard event files for a run: every scalar of metrics.jsonl, at the same steps.

Written with tensorboardX (the event-file format without TensorFlow) under RUN_DIR/tensorboard/;
only process 0 writes. A resumed run opens the writer with `purge_step` = the first step it will
log again, which records a restart marker: TensorBoard drops the earlier events from that step on,
so the dashboard shows one curve with no duplicated steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# metrics.jsonl key -> TensorBoard tag
SCALARS = {
    "loss": "train/loss",
    "distill_loss": "train/distill_loss",
    "eval_loss": "eval/loss",
    "eval_loss_se": "eval/loss_standard_error",
    "eval_perplexity": "eval/perplexity",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "data_wait_s": "perf/data_wait_s",
    "data_fetch_s": "perf/data_fetch_s",
    "tokens_seen": "train/tokens_seen",
    "skipped": "faults/skipped",
    "nonfinite_skipped": "faults/nonfinite_skipped",
    "goodput": "goodput/goodput",
}


class TensorBoardWriter:
    def __init__(self, directory: Path, *, resume_step: Optional[int] = None):
        from tensorboardX import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(logdir=str(directory), purge_step=purge, flush_secs=5)

    def write(self, record: dict[str, Any], keys: Optional[tuple[str, ...]] = None) -> None:
        step = int(record["step"])
        for key, tag in SCALARS.items():
            if keys is not None and key not in keys:
                continue
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
