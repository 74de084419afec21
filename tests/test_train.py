import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from crosstrain.config import load_config
from crosstrain.model import init_params
from crosstrain.train.step import init_state, make_train_step


def cli_env():
    """A user's environment: one CPU device, the test session's cache."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def run_cli(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "crosstrain", *args], env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def test_tiny_batch_overfits():
    cfg = load_config("tiny", ["model.compute_dtype=float32", "optim.schedule=constant", "optim.warmup_steps=0",
                               "optim.lr=0.01", "optim.weight_decay=0", "train.steps=200"])
    state = init_state(init_params(cfg.model, jax.random.key(0)))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab, size=(4, 33)), jnp.int32)
    step = jax.jit(make_train_step(cfg))
    first = None
    for _ in range(200):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert first > 5.0
    assert float(metrics["loss"]) < 0.1


def test_microbatches_accumulate_to_the_same_step():
    base = ["model.compute_dtype=float32", "optim.warmup_steps=0"]
    c1 = load_config("tiny", base)
    c4 = load_config("tiny", base + ["train.microbatches=4"])
    params = init_params(c1.model, jax.random.key(0))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, c1.model.vocab, size=(8, 65)), jnp.int32)
    s1, m1 = jax.jit(make_train_step(c1))(init_state(params), batch)
    s4, m4 = jax.jit(make_train_step(c4))(init_state(params), batch)
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        # Adam normalises the first step (|update| ~ lr = 1e-2), which magnifies float noise in
        # near-zero gradients; 1e-4 is 1% of a step.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_train_tiny_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--preset", "tiny", "--run-dir", str(run))
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu", "data_wait_s", "data_fetch_s"):
        assert key in records[0]
    # Data wait is the part of the host's batch time the device was idle for.
    assert all(0 <= r["data_wait_s"] <= r["data_fetch_s"] < r["step_time_s"] for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[0]["mfu"] is not None and 0 < records[-1]["mfu"] < 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["final_loss"] == records[-1]["loss"]
    assert summary["tokens_seen"] == 40 * 8 * 64 and len(summary["params_sha256"]) == 64
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["layers"] == 2 and resolved["train"]["steps"] == 40
    assert (run / "tokenizer.json").is_file()

    out = run_cli("generate", "--run-dir", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--greedy", "--json")
    gen = json.loads(out.stdout)
    assert gen["new_tokens"] >= 1 and isinstance(gen["text"], str) and gen["tokens_per_s"] >= 0
    again = run_cli("generate", "--run-dir", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--greedy", "--json")
    assert json.loads(again.stdout)["tokens"] == gen["tokens"]
    # Past the 64 positions tiny trained on, generation goes on and says it is extrapolating.
    past = run_cli("generate", "--run-dir", str(run), "--prompt", "def ", "--max-new-tokens", "70", "--greedy")
    assert "past the 64 positions the model was trained on" in past.stderr

    # Running the finished run again does no work and keeps the result.
    rerun = run_cli("train", "--preset", "tiny", "--run-dir", str(run))
    assert "already complete" in rerun.stderr
    assert json.loads((run / "summary.json").read_text())["params_sha256"] == summary["params_sha256"]


@pytest.mark.slow
def test_a_changed_schedule_is_refused_and_an_extension_reproduces(tmp_path, capsys):
    """train.steps 20 -> 30 on a resume would stretch the cosine under the 20 steps taken; refused
    with the way out (optim.decay_steps=20), which config.yaml records, so a fresh run from it
    reproduces the resumed run bit for bit."""
    from crosstrain.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--set", "train.steps=20", "--run-dir", str(run)]) == 0
    assert main(["train", "--preset", "tiny", "--set", "train.steps=30", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.steps" in err and "optim.decay_steps=20" in err
    assert main(["train", "--preset", "tiny", "--set", "train.steps=30", "optim.decay_steps=20", "--run-dir", str(run)]) == 0
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert lrs[21] == pytest.approx(lrs[20])  # held at the schedule's end, no jump back up
    again = tmp_path / "again"
    assert main(["train", "--preset", str(run / "config.yaml"), "--run-dir", str(again)]) == 0
    first, second = (json.loads((d / "summary.json").read_text()) for d in (run, again))
    assert first["params_sha256"] == second["params_sha256"]


@pytest.mark.slow
def test_heldout_loss_agrees_with_the_late_training_loss(tmp_path):
    """Well under one epoch, a representative held-out set scores what the training batches of the
    last steps score, within a few standard errors (the old split, 5 easy documents, was a nat
    below); and the in-run figure is `crosstrain eval`'s."""
    from crosstrain.cli import main
    from crosstrain.evaluate import evaluate_run

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--set", "train.steps=80", "data.max_bytes=3000000", "--run-dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "data_report.json").read_text())["totals"]
    # Every held-out token is scored but each segment's first, which has no context of its own.
    assert report["heldout_share"] >= 0.01 and summary["eval_tokens"] == report["heldout_tokens"] - report["heldout_segments"]
    assert report["heldout_segments"] >= 100
    late = np.array([r["loss"] for r in records[-10:]])
    se = np.hypot(summary["eval_loss_se"], late.std(ddof=1) / np.sqrt(len(late)))
    assert abs(summary["eval_loss"] - late.mean()) < 4 * se, (summary["eval_loss"], late.mean(), se)
    standalone = evaluate_run(run)
    assert standalone.loss == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert standalone.loss_se == pytest.approx(summary["eval_loss_se"], rel=1e-3)


def test_a_batch_taken_while_the_device_is_busy_is_not_data_wait():
    from crosstrain.train.timing import StepTimer

    timer = StepTimer()
    timer.waited(0.004)  # the first batch: nothing was running
    timer.dispatched()
    timer.waited(0.003, hidden=True)  # taken while step 1 still ran
    timer.dispatched()
    _, wait, fetch = timer.close_window(timer.window_start + 1.0)
    assert wait == pytest.approx(0.004 / 2) and fetch == pytest.approx(0.007 / 2)
    _, wait, fetch = timer.close_window(timer.window_start + 1.0)
    assert wait == fetch == 0.0  # a new window
