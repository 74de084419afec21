"""AdamW and adastar (AFM's optimizer), with warmup + cosine and global-norm clipping.

Both follow AXLearn's decoupled convention, which the AFM recipe's numbers assume: with s(t) the
schedule's relative scale in [0, 1] (linear warmup from 0, then cosine to `min_lr_ratio`),

    param <- param - s(t) * (lr * update + weight_decay * param)

so the weight decay is not multiplied by the peak learning rate (PyTorch's AdamW uses
lr(t) * wd instead). Norm scales are not decayed.

Updates, for gradients g already clipped to global norm `clip`:

- adamw:   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
           update = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
- adastar: v = b2 v + (1-b2) g^2;  r = g / (sqrt(v / (1-b2^t)) + eps);
           r <- r * min(1, update_clip / rms(r))       (per parameter tensor)
           m = b1 m + (1-b1) r   (no bias correction);  update = m
  i.e. RMSProp with bias-corrected second moment, per-parameter update clipping, and momentum on
  the clipped update: AXLearn's `adastar_optimizer` as configured for AFM.

Optimizer state is fp32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from crosstrain.config import OptimConfig


class OptState(NamedTuple):
    count: jax.Array  # int32, number of updates applied
    mu: Any  # adamw: first moment; adastar: momentum of the clipped update
    nu: Any  # second moment of the gradients


class UpdateStats(NamedTuple):
    grad_norm: jax.Array  # global norm before clipping
    lr: jax.Array  # the effective learning rate s(t) * lr for this update


def schedule_scale(count: jax.Array | int, cfg: OptimConfig, total_steps: int) -> jax.Array:
    """Relative learning-rate scale s(t) for the t-th update (t counts from 1)."""
    t = jnp.asarray(count, jnp.float32)
    warmup = float(cfg.warmup_steps)
    total = float(cfg.decay_steps or total_steps)
    warm = t / warmup if warmup > 0 else jnp.float32(1.0)
    progress = jnp.clip((t - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = lo + (1.0 - lo) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        decay = 1.0 - (1.0 - lo) * progress
    else:
        decay = jnp.float32(1.0)
    return jnp.where(t <= warmup, jnp.minimum(warm, 1.0), decay)


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def init(params: Any) -> OptState:
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
    return OptState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))


def apply(
    grads: Any,
    state: OptState,
    params: Any,
    *,
    cfg: OptimConfig,
    total_steps: int,
    decay_mask: Any,
    schedule_step: jax.Array | None = None,
    grad_norm: jax.Array | None = None,
) -> tuple[Any, OptState, UpdateStats]:
    """One optimizer step. Returns new params, new state and the step's statistics.

    `decay_mask` is a tree of bools (same structure as params): True where weight decay applies.
    `schedule_step` (1-based) drives the learning-rate schedule; it defaults to the number of
    updates applied, which differs from the training step once an update has been skipped.
    """
    count = state.count + 1
    t = count.astype(jnp.float32)
    gnorm = global_norm(grads) if grad_norm is None else grad_norm
    if cfg.clip > 0:
        scale = cfg.clip / jnp.maximum(gnorm, cfg.clip)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) * scale, grads)
    else:
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    nu = jax.tree.map(lambda v, g: cfg.b2 * v + (1.0 - cfg.b2) * g * g, state.nu, grads)
    nu_correction = 1.0 - cfg.b2**t
    if cfg.name == "adamw":
        mu = jax.tree.map(lambda m, g: cfg.b1 * m + (1.0 - cfg.b1) * g, state.mu, grads)
        mu_correction = 1.0 - cfg.b1**t
        updates = jax.tree.map(
            lambda m, v: (m / mu_correction) / (jnp.sqrt(v / nu_correction) + cfg.eps), mu, nu
        )
    else:  # adastar
        def normalised(g, v):
            r = g / (jnp.sqrt(v / nu_correction) + cfg.eps)
            rms = jnp.sqrt(jnp.mean(r * r))
            return r * jnp.minimum(1.0, cfg.update_clip / jnp.maximum(rms, 1e-30))

        raw = jax.tree.map(normalised, grads, nu)
        mu = jax.tree.map(lambda m, r: cfg.b1 * m + (1.0 - cfg.b1) * r, state.mu, raw)
        updates = mu

    s = schedule_scale(count if schedule_step is None else schedule_step, cfg, total_steps)

    def step(p, u, decay):
        p32 = p.astype(jnp.float32)
        delta = cfg.lr * u + (cfg.weight_decay * p32 if decay and cfg.weight_decay else 0.0)
        return (p32 - s * delta).astype(p.dtype)

    new_params = jax.tree.map(step, params, updates, decay_mask)
    return new_params, OptState(count, mu, nu), UpdateStats(gnorm, s * cfg.lr)
