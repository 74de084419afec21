"""Structured pruning of the MLP hidden units with Soft-Top-K masks (AFM's on-device recipe)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosstrain.config import load_config
from crosstrain.model import forward, init_params
from crosstrain.prune import keep_indices, masked, slice_mlp, soft_top_k


def test_soft_top_k_keeps_k_and_hardens_as_it_cools():
    z = jax.random.normal(jax.random.key(0), (3, 40))
    for t in (1.0, 0.1, 0.01):
        m = soft_top_k(z, 12, t)
        np.testing.assert_allclose(np.asarray(m.sum(-1)), 12.0, rtol=1e-4)
    cold = np.asarray(soft_top_k(z, 12, 1e-3))
    hard = np.zeros_like(cold)
    np.put_along_axis(hard, keep_indices(np.asarray(z), 12), 1.0, axis=-1)
    np.testing.assert_allclose(cold, hard, atol=1e-3)
    # The scores learn: the mask passes gradients to them.
    g = jax.grad(lambda z: jnp.sum(soft_top_k(z, 12, 0.5) * jnp.arange(40.0)))(z)
    assert float(jnp.abs(g).max()) > 0


def test_sliced_model_equals_the_masked_model():
    cfg = load_config("tiny", ["model.compute_dtype=float32", "model.activation_dtype=float32",
                               "model.attention=reference"]).model
    params = init_params(cfg, jax.random.key(3))
    scores = np.asarray(jax.random.normal(jax.random.key(4), (cfg.layers, cfg.ffn)))
    keep = keep_indices(scores, 48)
    hard = np.zeros_like(scores)
    np.put_along_axis(hard, keep, 1.0, axis=-1)
    small_cfg = load_config("tiny", ["model.compute_dtype=float32", "model.activation_dtype=float32",
                                     "model.attention=reference", "model.ffn=48"]).model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, size=(2, 16)), jnp.int32)
    want = forward(masked(params, jnp.asarray(hard)), tokens, cfg)
    got = forward(slice_mlp(params, keep), tokens, small_cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def _cli(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "crosstrain", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_prune_a_run_into_a_smaller_run_that_trains_on(tmp_path):
    src = tmp_path / "src"
    assert _cli("train", "--preset", "tiny", "--set", "train.steps=20", "model.compute_dtype=float32",
                "--run-dir", str(src)).returncode == 0
    small = tmp_path / "small"
    proc = _cli("prune", "--from", str(src), "--ffn", "64", "--steps", "12", "--set", "train.steps=4",
                f"distill.teacher={src}", "--run-dir", str(small), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["ffn"] == [128, 64] and result["parameters"][1] < result["parameters"][0]
    assert np.isfinite(result["heldout_loss_pruned"]) and result["tokens"] > 0
    cfg = load_config(str(small / "config.yaml"))
    assert cfg.model.ffn == 64 and cfg.train.steps == 4
    proc = _cli("train", "--preset", str(small / "config.yaml"), "--run-dir", str(small))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from checkpoint 0" in proc.stderr and "distilling from" in proc.stderr
    bad = _cli("prune", "--from", str(src), "--ffn", "128", "--run-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--ffn" in bad.stderr
