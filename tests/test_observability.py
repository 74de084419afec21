"""Observability: TensorBoard scalars equal to metrics.jsonl (also across a resume), profiler
traces of chosen steps, and runs compared in one picture."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test trains runs


def _env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    return e


def _train(run: Path, *sets: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "crosstrain", "train", "--preset", "tiny", "--set", "train.log_every=1",
                           *sets, "--run-dir", str(run)], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _scalars(run: Path, tag: str) -> dict[int, float]:
    """The scalar as TensorBoard itself reads it (its event accumulator, restart purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
    return {e.step: e.value for e in events}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    run = tmp_path_factory.mktemp("obs") / "a"
    # The profiled steps 4-6 hold step 5's checkpoint: it is deferred to the trace's end (a trace
    # overlapping an asynchronous save crashed the process about once in 40 runs; README).
    _train(run, "train.steps=20", "train.profile_start=4", "train.profile_steps=3", "train.checkpoint_every=5",
           "checkpoint.keep=10")
    return run


def test_checkpoint_due_inside_the_profile_waits_for_its_end(profiled):
    steps = sorted(int(p.name) for p in (profiled / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 10, 15, 20]


def test_tensorboard_scalars_equal_metrics_at_every_step(profiled):
    records = _metrics(profiled)
    loss = _scalars(profiled, "train/loss")
    assert sorted(loss) == [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    lr = _scalars(profiled, "train/lr")
    assert lr[20] == pytest.approx(records[-1]["lr"], rel=1e-6)
    assert _scalars(profiled, "eval/loss")[20] == pytest.approx(records[-1]["eval_loss"], rel=1e-6)
    assert set(_scalars(profiled, "perf/tokens_per_s")) == set(range(1, 21))
    assert 0 < _scalars(profiled, "goodput/goodput")[20] <= 1


def test_profile_of_the_chosen_steps_is_written(profiled):
    files = list((profiled / "profile").rglob("*"))
    assert any(f.name.endswith(".xplane.pb") for f in files)
    assert any(f.name.endswith(".trace.json.gz") for f in files)


def test_resumed_run_shows_one_curve(profiled, tmp_path):
    """An attempt that got past its last checkpoint, then a resume: each step once, the values of
    the resumed run."""
    run = tmp_path / "b"
    shutil.copytree(profiled, run)
    for step in ("20", "15"):
        shutil.rmtree(run / "checkpoints" / step)
    (run / "summary.json").unlink()
    _train(run, "train.steps=20", "train.checkpoint_every=5", "train.profile_start=5", "train.profile_steps=3")
    records = _metrics(run)
    loss = _scalars(run, "train/loss")
    assert sorted(loss) == [r["step"] for r in records] == list(range(1, 21))
    assert all(loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in records)


def test_compare_draws_both_runs(profiled, tmp_path):
    other = tmp_path / "lr-half"
    _train(other, "train.steps=12", "optim.lr=0.0015")
    out = tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, "-m", "crosstrain", "compare", str(profiled), str(other), "--out", str(out),
                           "--json"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert [r["run"] for r in result["runs"]] == ["a", "lr-half"]
    assert [r["steps"] for r in result["runs"]] == [20, 12]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "crosstrain", "compare", str(tmp_path / "nope")], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "metrics.jsonl not found" in bad.stderr and bad.stderr.count("\n") == 1
