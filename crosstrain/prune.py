"""`crosstrain prune`: structured pruning of the MLP hidden units with Soft-Top-K masks.

AFM's on-device model was pruned from a larger one only in the MLP hidden dimension, with masks
learned by Soft-Top-K masking on the pre-training mix (Gunter et al. 2024, arXiv:2407.21075).
Here, per layer, a score z_j for each of the F hidden units gives a soft mask

    m = sigmoid((z - tau) / t),   tau chosen by bisection so that sum(m) = K,

which scales the rows of the down projection (masking unit j's output is the same as scaling row
j of w_down). The model's weights are frozen; only the scores learn, with Adam, on the source
run's training stream (or `--data`), minimising the language-model loss of the masked model while
the temperature t anneals from 1 to 0.05, so the soft mask hardens towards the K it will keep.
Scores start from each unit's weight magnitude (|w_gate_j| |w_up_j| |w_down_j|). At the end each
layer keeps its K highest-scoring units: `w_gate`/`w_up` columns and `w_down` rows are sliced, and
a new run directory holds the smaller model at step 0 (its config, the source's tokenizer, a sealed
checkpoint), ready for `crosstrain train --preset NEW/config.yaml --run-dir NEW`. `--set` on prune
sets the new run's training settings; `--set distill.teacher=SOURCE` there gives AFM's
pruned-then-distilled recipe.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crosstrain.config import DistillConfig, InitConfig, check_paths
from crosstrain.errors import UserError
from crosstrain.files import write_json

log = logging.getLogger("crosstrain")


def soft_top_k(z: jax.Array, k: int, temperature: float | jax.Array, iters: int = 40) -> jax.Array:
    """Soft masks [..., F] in (0, 1) summing to k along the last axis (threshold by bisection,
    held constant for the gradient)."""
    t = jnp.asarray(temperature, jnp.float32)
    lo = jnp.min(z, axis=-1, keepdims=True) - 20.0 * t
    hi = jnp.max(z, axis=-1, keepdims=True) + 20.0 * t

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        too_many = jnp.sum(jax.nn.sigmoid((z - mid) / t), axis=-1, keepdims=True) > k
        return jnp.where(too_many, mid, lo), jnp.where(too_many, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    tau = jax.lax.stop_gradient((lo + hi) / 2)
    return jax.nn.sigmoid((z - tau) / t)


def masked(params: dict[str, Any], mask: jax.Array) -> dict[str, Any]:
    """params with every layer's w_down rows scaled by its mask [L, F]."""
    layers = dict(params["layers"])
    layers["w_down"] = layers["w_down"] * mask[..., None].astype(layers["w_down"].dtype)
    return {**params, "layers": layers}


def keep_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[L, k] indices of each layer's k highest scores, in ascending unit order."""
    return np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1)


def slice_mlp(params: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """The model with each layer's MLP reduced to the hidden units `keep` [L, k]."""
    layers = dict(params["layers"])
    idx = jnp.asarray(keep)
    layers["w_gate"] = jnp.take_along_axis(layers["w_gate"], idx[:, None, :], axis=2)
    layers["w_up"] = jnp.take_along_axis(layers["w_up"], idx[:, None, :], axis=2)
    layers["w_down"] = jnp.take_along_axis(layers["w_down"], idx[:, :, None], axis=1)
    return {**params, "layers": layers}


def initial_scores(params: dict[str, Any]) -> jax.Array:
    """log of each hidden unit's weight magnitude, standardised per layer: [L, F]."""
    lay = params["layers"]
    mag = (jnp.linalg.norm(lay["w_gate"], axis=1) * jnp.linalg.norm(lay["w_up"], axis=1)
           * jnp.linalg.norm(lay["w_down"], axis=2))
    z = jnp.log(mag + 1e-12)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, keepdims=True) + 1e-6)


def prune(source: Path, out: Path, *, ffn: int, steps: int, lr: float = 0.05, overrides: tuple[str, ...] = (),
          data: Optional[str] = None) -> dict[str, Any]:
    from crosstrain.data.pipeline import build_pipeline
    from crosstrain.evaluate import evaluate_tokens
    from crosstrain.model import loss_fn
    from crosstrain.model.params import params_sha256
    from crosstrain.runtime import load_run, refuse_existing_checkpoints, write_new_run

    refuse_existing_checkpoints(out, "prune")
    cfg, params, step = load_run(source)
    F = cfg.model.ffn
    if not 0 < ffn < F:
        raise UserError(f"--ffn: must be between 1 and the source's model.ffn - 1 ({F - 1}), got {ffn}")
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    stream_cfg = cfg.override(data={"tokenizer": str((source / "tokenizer.json").absolute()),
                                    **({"path": data, "sources": [], "mixture": []} if data else {})})
    check_paths(stream_cfg, ("data",))  # the masks learn on the source's data (or --data)
    pipeline = build_pipeline(stream_cfg, write_files=False)
    heldout, bounds = pipeline.heldout_tokens(), pipeline.heldout_bounds()
    if heldout.size < 2:
        raise UserError("prune: the source run's data holds out no tokens (data.holdout=0); nothing to judge "
                        "the pruned model on")
    batches = pipeline.batches()
    m = cfg.model
    params = jax.tree.map(jnp.asarray, jax.device_get(params))
    z = initial_scores(params)
    opt = optax.adam(lr)
    opt_state = opt.init(z)

    @jax.jit
    def update(z, opt_state, params, tokens, temperature):
        def loss(z):
            return loss_fn(masked(params, soft_top_k(z, ffn, temperature)), tokens, m)

        value, grad = jax.value_and_grad(loss)(z)
        updates, opt_state = opt.update(grad, opt_state, z)
        return optax.apply_updates(z, updates), opt_state, value

    t0 = time.perf_counter()
    losses = []
    for i in range(steps):
        temperature = math.exp(math.log(1.0) + (math.log(0.05) - math.log(1.0)) * i / max(1, steps - 1))
        tokens = jnp.asarray(next(batches))
        z, opt_state, value = update(z, opt_state, params, tokens, temperature)
        losses.append(float(value))
        if i == 0 or (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
            log.info("prune step %d/%d: masked loss %.4f (temperature %.3f)", i + 1, steps, losses[-1], temperature)
    scores = np.asarray(z)
    keep = keep_indices(scores, ffn)
    hard = np.zeros_like(scores)
    np.put_along_axis(hard, keep, 1.0, axis=-1)
    small = slice_mlp(params, keep)

    # Held-out loss before and after, on the run's whole held-out set (crosstrain/evaluate.py).
    full = evaluate_tokens(params, cfg, heldout, np.ones(1, np.int64), bounds=bounds)
    pruned = evaluate_tokens(masked(params, jnp.asarray(hard)), cfg, heldout, np.ones(1, np.int64), bounds=bounds)

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    new_cfg = cfg.override(*overrides, model={"ffn": ffn}, data={"tokenizer": str((out / "tokenizer.json").absolute())},
                           init=InitConfig(), distill=DistillConfig())
    write_new_run(out, new_cfg, small, {"pruned_from": str(source), "source_step": step},
                  devices=jax.devices()[:1] if new_cfg.mesh.data == -1 else jax.devices())
    before = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    after = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(small))
    result = {
        "source": str(source), "source_step": step, "run_dir": str(out), "ffn": [F, ffn],
        "parameters": [before, after], "steps": steps, "tokens": steps * stream_cfg.train.batch * m.seq_len,
        "masked_loss": [losses[0], losses[-1]], "heldout_loss_full": full.loss, "heldout_loss_full_se": full.loss_se,
        "heldout_loss_pruned": pruned.loss, "heldout_loss_pruned_se": pruned.loss_se, "heldout_tokens": pruned.tokens,
        "params_sha256": params_sha256(jax.device_get(small)), "seconds": time.perf_counter() - t0,
    }
    write_json(out / "prune.json", result)
    return result

