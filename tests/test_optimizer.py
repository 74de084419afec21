import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosstrain.config import OptimConfig
from crosstrain.train import optimizer


def np_schedule(t, cfg, total):
    if t <= cfg.warmup_steps:
        return t / cfg.warmup_steps
    progress = min(max((t - cfg.warmup_steps) / (total - cfg.warmup_steps), 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def np_run(cfg, params, grads_seq, mask, total):
    """Hand-written numpy steps of AdamW / adastar as the module docstring defines them."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        if cfg.clip:
            g = {k: x * cfg.clip / max(norm, cfg.clip) for k, x in g.items()}
        s = np_schedule(t, cfg, total)
        for k in p:
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
            vhat = v[k] / (1 - cfg.b2**t)
            if cfg.name == "adamw":
                m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
                update = (m[k] / (1 - cfg.b1**t)) / (np.sqrt(vhat) + cfg.eps)
            else:
                r = g[k] / (np.sqrt(vhat) + cfg.eps)
                rms = math.sqrt(float(np.mean(r * r)))
                r = r * min(1.0, cfg.update_clip / rms)
                m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * r
                update = m[k]
            decay = cfg.weight_decay * p[k] if mask[k] else 0.0
            p[k] = p[k] - s * (cfg.lr * update + decay)
    return p


@pytest.mark.parametrize("name", ["adamw", "adastar"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizer_matches_numpy(name, clip):
    cfg = OptimConfig(name=name, lr=0.05, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.02,
                      b1=0.9, b2=0.95, eps=1e-8, clip=clip, update_clip=0.3)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "norm": rng.normal(size=(3,)).astype(np.float32)}
    mask = {"w": True, "norm": False}
    grads_seq = [{k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()} for _ in range(6)]
    total = 8
    state = optimizer.init(params)
    p = jax.tree.map(jnp.asarray, params)
    step = jax.jit(lambda g, s, p: optimizer.apply(g, s, p, cfg=cfg, total_steps=total, decay_mask=mask))
    for g in grads_seq:
        p, state, stats = step(jax.tree.map(jnp.asarray, g), state, p)
    want = np_run(cfg, params, grads_seq, mask, total)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-6)
    assert int(state.count) == 6


def test_norm_scales_are_not_decayed():
    cfg = OptimConfig(lr=1e-9, warmup_steps=0, schedule="constant", weight_decay=0.5, clip=0.0)
    params = {"w": jnp.ones((2, 2)), "norm": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    p, _, _ = optimizer.apply(zeros, optimizer.init(params), params, cfg=cfg, total_steps=10,
                              decay_mask={"w": True, "norm": False})
    assert float(p["norm"][0]) == 1.0
    assert float(p["w"][0, 0]) == pytest.approx(0.5)


def test_schedule_shape():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.005, schedule="cosine")
    s = [float(optimizer.schedule_scale(t, cfg, 100)) for t in range(1, 101)]
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(s[9:], s[10:]))
    assert s[-1] == pytest.approx(0.005)
    assert float(optimizer.schedule_scale(200, cfg, 100)) == pytest.approx(0.005)
    const = OptimConfig(warmup_steps=0, schedule="constant")
    assert float(optimizer.schedule_scale(50, const, 100)) == 1.0


def test_global_norm_reported_before_clipping():
    cfg = OptimConfig(clip=1.0, warmup_steps=0)
    params = {"w": jnp.zeros((3,))}
    grads = {"w": jnp.asarray([3.0, 4.0, 0.0])}
    _, _, stats = optimizer.apply(grads, optimizer.init(params), params, cfg=cfg, total_steps=1, decay_mask={"w": True})
    assert float(stats.grad_norm) == pytest.approx(5.0)
