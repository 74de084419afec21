"""Checkpoints and fault tolerance: kills, corruption, preemption, resharding, bad numerics."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosstrain.config import CheckpointConfig, load_config
from crosstrain.model import init_params, params_sha256
from crosstrain.parallel.rules import activate
from crosstrain.runtime import abstract_train_state, init_train_state, make_setup
from crosstrain.train.checkpoint import Checkpointer, verify
from crosstrain.train.step import init_state, make_train_step

TINY = ["train", "--preset", "tiny", "--set", "train.steps=40", "train.checkpoint_every=4", "train.batch=32"]


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    return e


def start(args, run):
    return subprocess.Popen([sys.executable, "-m", "crosstrain", *args, "--run-dir", str(run)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_cli(args, run, timeout=600):
    return subprocess.run([sys.executable, "-m", "crosstrain", *args, "--run-dir", str(run)], env=env(),
                          capture_output=True, text=True, timeout=timeout)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run):
    return json.loads((run / "summary.json").read_text())


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cli(TINY, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.mark.slow
def test_random_sigkills_resume_bitwise_identically(reference, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(7)
    ckdir = run / "checkpoints"
    kills = []
    for attempt in range(6):
        proc = start(TINY, run)
        n0 = len(records(run)) if (run / "metrics.jsonl").exists() else 0
        if attempt == 2:
            # Kill during a save: as soon as Orbax has a temporary checkpoint directory.
            wait_for(lambda: ckdir.exists() and any("tmp" in p.name for p in ckdir.iterdir()) or proc.poll() is not None)
            kills.append("during save")
        elif attempt == 0:
            time.sleep(rng.uniform(0.5, 2.0))  # during start-up
            kills.append("start-up")
        else:
            # At a random moment of training: after a random number of new records.
            target = n0 + rng.randint(1, 8)
            wait_for(lambda: (run / "metrics.jsonl").exists() and len(records(run)) >= target or proc.poll() is not None)
            time.sleep(rng.uniform(0, 0.05))
            kills.append(f"after {target} records")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = run_cli(TINY, run)
    assert final.returncode == 0, final.stderr[-2000:]
    got, want = records(run), records(reference)
    assert [r["step"] for r in got] == list(range(1, 41)), kills
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    assert summary(run)["params_sha256"] == summary(reference)["params_sha256"]
    ledger = json.loads((run / "goodput.json").read_text())
    assert ledger["attempts"] >= 2 and 0 < ledger["total"]["goodput"] < 1


@pytest.mark.slow
def test_flipped_bytes_in_latest_checkpoint_fall_back_to_previous(reference, tmp_path):
    run = tmp_path / "run"
    assert run_cli(TINY, run).returncode == 0
    (run / "summary.json").unlink()
    latest = run / "checkpoints" / "40"
    victim = max((p for p in latest.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    resumed = run_cli(TINY, run)  # steps 37..40 again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint 40 is corrupt" in resumed.stderr and "does not match its SHA-256" in resumed.stderr
    assert "resumed from checkpoint 36" in resumed.stderr
    assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(reference)]
    assert summary(run)["params_sha256"] == summary(reference)["params_sha256"]
    assert any(p.name.startswith("corrupt-40-") for p in (run / "checkpoints").iterdir())


def _small_checkpoints(tmp_path, steps=(4, 8, 12)):
    cfg = load_config("tiny", ["mesh.data=1"])
    setup = make_setup(cfg, jax.devices()[:1])
    state = init_train_state(setup)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep=5, async_save=True))
    for s in steps:
        ck.save(s, state, {"step": s})
    ck.wait()
    return ck, setup, state


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "unsealed"])
def test_damaged_checkpoint_is_detected(tmp_path, damage):
    ck, setup, state = _small_checkpoints(tmp_path)
    d = ck.step_dir(12)
    files = sorted((p for p in d.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: -p.stat().st_size)
    if damage == "truncate":
        files[0].write_bytes(files[0].read_bytes()[:-7])
    elif damage == "flip":
        raw = bytearray(files[0].read_bytes())
        raw[3] ^= 0x01
        files[0].write_bytes(bytes(raw))
    elif damage == "delete":
        files[-1].unlink()
    else:
        (d / "manifest.json").unlink()
    assert verify(d) is not None
    step, restored, meta = ck.restore_latest(abstract_train_state(setup))
    assert step == 8 and meta == {"step": 8}
    assert params_sha256(restored.params) == params_sha256(state.params)
    if damage != "unsealed":
        assert not d.exists()  # set aside, never tried again


def test_no_valid_checkpoint_exits_2(tmp_path, capsys):
    ck, setup, _ = _small_checkpoints(tmp_path, steps=(4,))
    (ck.step_dir(4) / "manifest.json").write_text('{"step": 4, "files": {"state/nope": {"sha256": "0", "bytes": 1}}}')
    from crosstrain.errors import UserError

    with pytest.raises(UserError, match="no valid checkpoint"):
        ck.restore_latest(abstract_train_state(setup))


def test_only_unsealed_checkpoints_mean_a_fresh_start(tmp_path):
    """A run killed during its first save has no complete checkpoint: start over, no error."""
    ck, setup, state = _small_checkpoints(tmp_path, steps=(4,))
    (ck.step_dir(4) / "manifest.json").unlink()
    assert ck.restore_latest(abstract_train_state(setup)) is None
    ck.save(4, state, {"step": 4})  # the fresh run reaches the same step and saves it again
    ck.wait()
    step, restored, _ = ck.restore_latest(abstract_train_state(setup))
    assert step == 4 and params_sha256(restored.params) == params_sha256(state.params)


def test_retention_keeps_last_k_and_every_p_through_the_trash(tmp_path):
    cfg = load_config("tiny")
    setup = make_setup(cfg, jax.devices()[:1])
    state = init_train_state(setup)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep=2, keep_every=10, async_save=False))
    for s in range(2, 26, 2):
        ck.save(s, state, {"step": s})
    ck.close()
    assert ck.sealed_steps() == [10, 20, 22, 24]
    trash = tmp_path / "ck" / ".trash"
    assert not trash.exists() or not any(trash.iterdir())
    # A half-deleted step left in the trash by a kill is cleaned up, never listed.
    trash.mkdir(exist_ok=True)
    (trash / "18-123").mkdir()
    ck2 = Checkpointer(tmp_path / "ck", CheckpointConfig(keep=2))
    assert ck2.sealed_steps() == [10, 20, 22, 24] and not any(trash.iterdir())
    ck2.close()


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_then_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--set", "train.steps=100000", "train.log_every=1"]
    proc = start(args, run)
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and len(records(run)) >= 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted (SIGTERM): saved step" in err
    saved = int(err.split("saved step ")[1].split(";")[0])
    assert verify(run / "checkpoints" / str(saved)) is None
    # Stopping early on the schedule it ran (decay over 100000 steps), as a changed train.steps must.
    again = run_cli(["train", "--preset", "tiny", "--set", f"train.steps={saved + 3}", "optim.decay_steps=100000",
                     "train.log_every=1"], run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from checkpoint {saved}" in again.stderr
    assert [r["step"] for r in records(run)] == list(range(1, saved + 4))


@pytest.mark.slow
def test_restore_8_device_checkpoint_on_1_device(tmp_path):
    cfg8 = load_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    setup8 = make_setup(cfg8, jax.devices())
    with activate(setup8.mesh):
        state8 = init_train_state(setup8)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig())
    ck.save(3, state8, {"step": 3}, wait=True)
    cfg1 = load_config("tiny", ["mesh.data=1"])
    setup1 = make_setup(cfg1, jax.devices()[:1])
    step, state1, _ = ck.restore_latest(abstract_train_state(setup1))
    assert step == 3
    leaf = jax.tree.leaves(state1.params)[0]
    assert len(leaf.sharding.device_set) == 1
    assert params_sha256(jax.device_get(state1.params)) == params_sha256(jax.device_get(state8.params))


def test_nan_injection_skips_exactly_one_update():
    cfg = load_config("tiny", ["model.compute_dtype=float32", "faults.inject_nan_batch=3"])
    step = jax.jit(make_train_step(cfg))
    state = init_state(init_params(cfg.model, jax.random.key(0)))
    batches = np.random.default_rng(0).integers(0, cfg.model.vocab, size=(5, 8, 65)).astype(np.int32)
    history = []
    for i in range(5):
        state, metrics = step(state, jnp.asarray(batches[i]), i)
        history.append((jax.device_get(state), jax.device_get(metrics)))
    skipped = [int(m["skipped"]) for _, m in history]
    assert skipped == [0, 0, 1, 0, 0]
    after2, after3 = history[1][0], history[2][0]
    assert params_sha256(after2.params) == params_sha256(after3.params)
    assert int(after3.opt.count) == 2 and int(after3.step) == 3  # no update applied, but a step taken
    for a, b in zip(jax.tree.leaves(after2.opt.mu), jax.tree.leaves(after3.opt.mu)):
        np.testing.assert_array_equal(a, b)
    assert int(history[4][0].opt.count) == 4 and np.isfinite(float(history[4][1]["loss"]))


@pytest.mark.slow
def test_nan_injection_end_to_end_and_halt(tmp_path):
    run = tmp_path / "skip"
    args = ["train", "--preset", "tiny", "--set", "train.steps=8", "faults.inject_nan_batch=5"]
    proc = run_cli(args, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records(run)
    assert recs[4]["skipped"] == 1 and recs[4]["loss"] is None and recs[-1]["nonfinite_skipped"] == 1
    assert summary(run)["nonfinite_skipped"] == 1
    halted = run_cli(args + ["faults.nonfinite=halt"], tmp_path / "halt")
    assert halted.returncode == 3
    assert halted.stderr.strip().splitlines()[-1] == (
        "crosstrain: halted: faults.nonfinite=halt: non-finite loss or gradient at step 5"
    )


@pytest.mark.slow
def test_loss_spike_rolls_back_deterministically(tmp_path):
    args = ["train", "--preset", "tiny", "--set", "train.steps=30", "train.checkpoint_every=4", "faults.spike_sigma=4",
            "faults.spike_window=6", "faults.inject_spike_batch=19", "faults.spike_skip=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    pa = run_cli(args, a)
    assert pa.returncode == 0, pa.stderr[-2000:]
    assert "rolled back to step 16, skipping batches 17..20" in pa.stderr
    rb = summary(a)["rollbacks"]
    assert len(rb) == 1 and rb[0]["spike_step"] == 19 and rb[0]["restored_step"] == 16
    recs = records(a)
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert max(r["loss"] for r in recs) < 20  # the x100 loss never reached the record

    # The same run, preempted after the rollback and resumed, decides and ends the same way.
    proc = start(args[:3] + ["train.steps=30"] + args[4:], b)
    assert wait_for(lambda: (b / "metrics.jsonl").exists() and len(records(b)) >= 22 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    pb = run_cli(args, b)
    assert pb.returncode == 0, pb.stderr[-2000:]
    assert [r["loss"] for r in records(b)] == [r["loss"] for r in recs]
    assert summary(b)["params_sha256"] == summary(a)["params_sha256"]
    assert summary(b)["rollbacks"] == rb
