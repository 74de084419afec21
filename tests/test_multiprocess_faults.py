"""Faults across processes: a worker killed at random moments never hangs the job, every restart
resumes bit-exactly, and a peer that vanishes without a launcher is detected by the heartbeat."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_faults import wait_for as _wait
from test_sharding import _find_child as _worker

pytestmark = pytest.mark.slow  # several processes, each training

ARGS = ["train", "--preset", "tiny", "--set", "model.compute_dtype=float32", "mesh.fsdp=2", "train.steps=24",
        "train.checkpoint_every=3", "train.batch=16"]


def _env(**extra):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e.update(extra)
    return e


def _launch(run: Path, **kw):
    return subprocess.Popen([sys.executable, "-m", "crosstrain", "launch", "--processes", "2", "--devices-per-process",
                             "1", "--", *ARGS, "--run-dir", str(run)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_pair(script: str, *, timeout: float) -> list[tuple[int, str]]:
    """Run `script` (python -c) as two processes, argv[1] = 0 and 1, that join each other
    themselves; each one's exit status and output. Both are killed if they hang past `timeout`."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=_env(JAX_PLATFORMS="cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        raise AssertionError("the processes hung") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def _finish(run: Path) -> str:
    """Launch the run to its end within a bounded time; its output."""
    proc = _launch(run)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError("the run hung:\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    return out


def test_killing_one_of_two_workers_at_random_moments_resumes_bit_exactly(tmp_path):
    reference = tmp_path / "reference"
    _finish(reference)
    run = tmp_path / "run"
    rng = random.Random(11)
    kills = []
    for attempt in range(3):
        proc = _launch(run)
        try:
            n0 = len(_records(run))
            ckdir = run / "checkpoints"
            if attempt == 1:
                # During a save: as soon as Orbax has a temporary directory for a step.
                _wait(lambda: ckdir.exists() and any("tmp" in p.name for p in ckdir.iterdir()) or proc.poll() is not None, timeout=180)
                moment = "during a save"
            else:
                target = n0 + rng.randint(2, 8)
                _wait(lambda: len(_records(run)) >= target or proc.poll() is not None, timeout=180)
                time.sleep(rng.uniform(0, 0.05))
                moment = f"after {target} records"
            victim = rng.randint(0, 1)
            pid = _worker(victim, run)
            if pid is None or proc.poll() is not None:
                continue  # the run got to its end first
            os.kill(pid, signal.SIGKILL)
            kills.append(f"p{victim} {moment}")
            t0 = time.time()
            out, _ = proc.communicate(timeout=90)  # the whole job ends, promptly
            assert proc.returncode != 0 and time.time() - t0 < 90, out[-2000:]
            assert _worker(1 - victim, run) is None, "a survivor was left running"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert kills, "no kill landed"
    _finish(run)
    got, want = _records(run), _records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want], kills
    assert [r["loss"] for r in got] == [r["loss"] for r in want], kills
    summary = lambda r: json.loads((r / "summary.json").read_text())  # noqa: E731
    assert summary(run)["params_sha256"] == summary(reference)["params_sha256"], kills
    ledger = json.loads((run / "goodput.json").read_text())
    assert ledger["attempts"] >= 2 and 0 < ledger["total"]["goodput"] < 1


def test_a_vanished_peer_ends_the_survivor_without_a_launcher(tmp_path):
    """Two processes joined only through jax.distributed (as on a multi-host cluster, where no
    launcher watches): SIGKILL one, and the other exits non-zero within the heartbeat window."""
    run = tmp_path / "run"
    port = __import__("crosstrain.parallel.distributed", fromlist=["free_port"]).free_port()
    procs = []
    for i in range(2):
        env = _env(CROSSTRAIN_COORDINATOR=f"127.0.0.1:{port}", CROSSTRAIN_NUM_PROCESSES="2",
                   CROSSTRAIN_PROCESS_ID=str(i), CROSSTRAIN_CPU_DEVICES="1", CROSSTRAIN_HEARTBEAT_S="5")
        args = [a if a != "train.steps=24" else "train.steps=100000" for a in ARGS]
        procs.append(subprocess.Popen([sys.executable, "-m", "crosstrain", *args, "train.log_every=50",
                                       "--run-dir", str(run)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        assert _wait(lambda: len(_records(run)) >= 1, timeout=300)
        procs[1].kill()
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    print(f"survivor stopped {elapsed:.1f} s after the kill")
    assert elapsed < 60, f"the survivor took {elapsed:.0f} s to stop"
    # Its collective with the dead peer fails (and it leaves at once: distributed.abandon), or, had
    # it been waiting elsewhere, JAX's coordination service names the peer: "Task 1 heartbeat timeout".
    assert "connection" in err.lower() or "task 1 heartbeat timeout" in err.lower(), err[-2000:]


def test_a_step_committed_but_never_sealed_is_cleared_before_any_process_saves_again(tmp_path):
    """The window between Orbax committing a step and crosstrain sealing it: a kill there leaves
    a step directory every process can see. Process 0 clears it at the next start, and only then
    does any process read the step list, so saving that step again cannot collide."""
    run = tmp_path / "run"
    _finish(run)
    want = _records(run)
    sha = json.loads((run / "summary.json").read_text())["params_sha256"]
    (run / "summary.json").unlink()
    (run / "checkpoints" / "24" / "manifest.json").unlink()  # committed, never sealed
    out = _finish(run)
    assert "checkpoint 24 was never sealed" in out
    got = _records(run)
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in want]
    assert json.loads((run / "summary.json").read_text())["params_sha256"] == sha
    assert (run / "checkpoints" / "24" / "manifest.json").is_file()


def test_a_flag_raised_on_one_process_is_agreed_by_both(tmp_path):
    """What one process decides from its own clock or signals (a time-based save, a SIGTERM) the
    other learns at the same step: any_process over two real jax.distributed processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import sys, jax\n"
        f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id=int(sys.argv[1]))\n"
        "from crosstrain.train.faults import any_process\n"
        "me = int(sys.argv[1])\n"
        "print('AGREED', any_process(me == 0, False, me == 1, True), any_process(me == 1))\n"
    )
    for code, out in _run_pair(script, timeout=120):
        assert code == 0, out[-2000:]
        assert "AGREED (True, False, True, True) (True,)" in out, out[-2000:]


def test_a_process_that_fails_leaves_at_once_not_through_the_shutdown_barrier(tmp_path):
    """One process of a joined job fails with a user error while the other waits for it in a
    collective: the failing one exits with its status and its one-line error within seconds (not
    after JAX's 300 s shutdown barrier, which its stuck peer would never reach), and the peer is
    ended by the coordination service."""
    from crosstrain.parallel.distributed import free_port

    port = free_port()
    script = (
        "import sys\n"
        "from crosstrain.parallel import distributed\n"
        "me = int(sys.argv[1])\n"
        f"distributed.initialize(distributed.ProcessSpec('127.0.0.1:{port}', 2, me, 1))\n"
        "if me == 1:\n"
        "    from crosstrain.cli import main\n"
        "    main(['plan', '--preset', 'no-such-preset'])\n"
        "    print('RETURNED FROM MAIN', flush=True)\n"
        "else:\n"
        "    from jax.experimental import multihost_utils\n"
        "    multihost_utils.sync_global_devices('waits for process 1')\n"
        "    print('PEER PASSED THE COLLECTIVE', flush=True)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)],
                              env=_env(JAX_PLATFORMS="cpu", CROSSTRAIN_HEARTBEAT_S="5"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    t0 = time.time()
    try:
        out1, _ = procs[1].communicate(timeout=200)
        failed_after = time.time() - t0
        out0, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 2, out1[-2000:]
    assert "crosstrain: error: --preset: unknown preset 'no-such-preset'" in out1 and "RETURNED FROM MAIN" not in out1
    assert failed_after < 60, f"the failing process took {failed_after:.0f} s to exit"
    assert procs[0].returncode != 0 and "PEER PASSED THE COLLECTIVE" not in out0, out0[-2000:]


def test_saving_again_over_a_step_after_a_rollback_agrees_across_processes(tmp_path):
    """A rollback trains back to a step that was already saved: process 0 deletes the stale step
    and the other process, whose Orbax still lists it, learns so before saving (else Orbax refuses
    the step there while process 0 waits for it). Both save the new state; it is what restores."""
    from crosstrain.parallel.distributed import free_port

    port = free_port()
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from crosstrain.parallel import distributed\n"
        "me = int(sys.argv[1])\n"
        f"distributed.initialize(distributed.ProcessSpec('127.0.0.1:{port}', 2, me, 1))\n"
        "import jax\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec\n"
        "from crosstrain.config import CheckpointConfig\n"
        "from crosstrain.train.checkpoint import Checkpointer, abstract_like\n"
        "put = NamedSharding(Mesh(np.array(jax.devices()), ('x',)), PartitionSpec('x'))\n"
        "state = lambda v: {'w': jax.make_array_from_callback((4,), put, lambda i: np.full(4, v, np.float32)[i])}\n"
        f"ckpt = Checkpointer({str(tmp_path / 'ckpt')!r}, CheckpointConfig(), primary=me == 0)\n"
        "ckpt.save(2, state(1.0), {'step': 2}, wait=True)\n"
        "ckpt.save(2, state(7.0), {'step': 2}, wait=True)  # the same step again, as after a rollback\n"
        "step, got, meta = ckpt.restore_latest(abstract_like(state(0.0), {'w': put}))\n"
        "local = [np.asarray(s.data) for s in got['w'].addressable_shards]\n"
        "print('RESTORED', step, all(float(x) == 7.0 for a in local for x in a.ravel()), flush=True)\n"
        "ckpt.close()\n"
        "distributed.finish()\n"
    )
    for code, out in _run_pair(script, timeout=180):
        assert code == 0 and "RESTORED 2 True" in out, out[-3000:]
