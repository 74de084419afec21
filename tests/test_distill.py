"""Distillation (AFM's on-device recipe): the objective against hand-computed targets, and runs
that distil from a teacher inside the same compiled step."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosstrain.config import DistillConfig, load_config
from crosstrain.model import forward, init_params
from crosstrain.train.distill import objective


def _ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("mode", ["top1", "kl"])
def test_objective_matches_the_targets_written_out(mode):
    base = ["model.compute_dtype=float32", "model.activation_dtype=float32", "model.attention=reference"]
    student = load_config("tiny", base).model
    teacher_cfg = load_config("tiny", base + ["model.layers=3"]).model
    params = init_params(student, jax.random.key(1))
    teacher = init_params(teacher_cfg, jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, student.vocab, size=(2, student.seq_len + 1)), jnp.int32)
    d = DistillConfig(teacher="x", mode=mode, teacher_weight=0.9, temperature=2.0)
    obj, true = objective(params, tokens, student, teacher=teacher, teacher_cfg=teacher_cfg, distill=d)
    s_logits = np.asarray(forward(params, tokens[:, :-1], student), np.float64)
    t_logits = np.asarray(forward(teacher, tokens[:, :-1], teacher_cfg), np.float64)
    targets = np.asarray(tokens[:, 1:])
    true_ce = _ce(s_logits, targets)
    if mode == "top1":
        teacher_term = _ce(s_logits, t_logits.argmax(-1))
    else:
        pt = np.exp(t_logits / 2 - t_logits.max(-1, keepdims=True) / 2)
        pt /= pt.sum(-1, keepdims=True)
        ls = s_logits / 2 - (np.log(np.exp(s_logits / 2 - s_logits.max(-1, keepdims=True) / 2).sum(-1, keepdims=True))
                             + s_logits.max(-1, keepdims=True) / 2)
        teacher_term = 4 * np.sum(pt * (np.log(pt) - ls), -1)
    assert float(true) == pytest.approx(true_ce.mean(), rel=1e-5)
    assert float(obj) == pytest.approx((0.1 * true_ce + 0.9 * teacher_term).mean(), rel=1e-5)
    # No gradient reaches the teacher.
    g = jax.grad(lambda t: objective(params, tokens, student, teacher=t, teacher_cfg=teacher_cfg, distill=d)[0])(teacher)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def _env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    return e


def _train(run, *sets):
    return subprocess.run([sys.executable, "-m", "crosstrain", "train", "--preset", "tiny", "--set",
                           "model.compute_dtype=float32", *sets, "--run-dir", str(run)], env=_env(),
                          capture_output=True, text=True, timeout=600)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_distilling_from_a_teacher_run(tmp_path):
    teacher = tmp_path / "teacher"
    assert _train(teacher, "train.steps=20").returncode == 0
    plain = tmp_path / "plain"
    assert _train(plain, "train.steps=6", "model.layers=1").returncode == 0
    # Weight 0 on the teacher: the same updates as a plain run (to float rounding: the objective
    # is another XLA program).
    zero = tmp_path / "zero"
    proc = _train(zero, "train.steps=6", "model.layers=1", f"distill.teacher={teacher}", "distill.teacher_weight=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose([r["loss"] for r in _metrics(zero)], [r["loss"] for r in _metrics(plain)], rtol=1e-5)
    # AFM's 0.9: `loss` is still the true-token loss, the objective is logged beside it.
    top1 = tmp_path / "top1"
    proc = _train(top1, "train.steps=6", "model.layers=1", f"distill.teacher={teacher}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distilling from" in proc.stderr
    first = _metrics(top1)[0]
    assert first["loss"] == pytest.approx(_metrics(plain)[0]["loss"], rel=1e-6)  # same initial student and batch
    assert first["distill_loss"] != first["loss"]
    later = np.abs(np.array([r["loss"] for r in _metrics(top1)]) - np.array([r["loss"] for r in _metrics(plain)]))[1:]
    assert later.max() > 1e-3  # the teacher's targets changed the updates
    # A teacher of another vocabulary cannot be distilled from.
    bad = _train(tmp_path / "bad", "train.steps=2", "model.vocab=1024", f"distill.teacher={teacher}")
    assert bad.returncode == 2 and "distill.teacher" in bad.stderr and bad.stderr.strip().count("\n") == 0
