"""The jitted training step: loss, gradients (accumulated over microbatches), optimizer update."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from crosstrain.config import Config
from crosstrain.model import loss_fn, param_axes
from crosstrain.train import optimizer


class TrainState(NamedTuple):
    params: Any
    opt: optimizer.OptState

    @property
    def step(self) -> jax.Array:
        return self.opt.count


def decay_mask(cfg: Config) -> Any:
    """True for every weight that takes weight decay: all but the norm scales."""
    return jax.tree.map(lambda axes: "norm" not in axes, param_axes(cfg.model), is_leaf=lambda x: isinstance(x, tuple))


def init_state(params: Any) -> TrainState:
    return TrainState(params, optimizer.init(params))


def make_train_step(cfg: Config) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure function (state, batch[B, seq_len + 1]) -> (state, metrics); jit it with shardings."""
    mask = decay_mask(cfg)
    n_micro = cfg.train.microbatches
    model_cfg = cfg.model

    def grads_of(params, tokens):
        return jax.value_and_grad(loss_fn)(params, tokens, model_cfg)

    def train_step(state: TrainState, batch: jax.Array):
        if n_micro == 1:
            loss, grads = grads_of(state.params, batch)
        else:
            micro = batch.reshape(n_micro, batch.shape[0] // n_micro, *batch.shape[1:])

            def accumulate(carry, tokens):
                loss_sum, grad_sum = carry
                loss, grads = grads_of(state.params, tokens)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros([], jnp.float32), zero), micro)
            loss = loss_sum / n_micro
            grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
        params, opt, stats = optimizer.apply(
            grads, state.opt, state.params, cfg=cfg.optim, total_steps=cfg.train.steps, decay_mask=mask
        )
        metrics = {"loss": loss, "grad_norm": stats.grad_norm, "lr": stats.lr}
        return TrainState(params, opt), metrics

    return train_step
