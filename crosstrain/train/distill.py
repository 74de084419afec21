"""Distillation: the student's objective against a teacher's predictions, in the same step.

AFM's on-device model was trained with a target that mixes the true next token and the teacher's
top-1 prediction, 0.9 on the teacher (Gunter et al. 2024, arXiv:2407.21075):

    top1:  (1 - w) CE(student, true token) + w CE(student, argmax teacher)
    kl:    (1 - w) CE(student, true token) + w T^2 KL(softmax(teacher / T) || softmax(student / T))

The teacher's forward pass runs inside the student's compiled step on the same mesh (its
parameters are an argument of the step, sharded by the same logical-axis rules, never
differentiated). Whatever the mode, the student's cross-entropy on the true tokens is what the
run logs as `loss`, so distilled and plain runs compare; the objective is `distill_loss`. The
teacher run is loaded onto the student's mesh by `crosstrain.runtime.load_teacher`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from crosstrain.config import DistillConfig, ModelConfig, dtype_of
from crosstrain.model.fused import output_cross_entropy
from crosstrain.model.transformer import copy_transposes, decoder, output_logits


def _student_ce(params, hidden, targets, cfg: ModelConfig) -> jax.Array:
    b, s, d = hidden.shape
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    cdt = dtype_of(cfg.compute_dtype)
    return output_cross_entropy(hidden.reshape(b * s, d).astype(cdt), w.astype(cdt), targets.reshape(b * s),
                                tied=cfg.tie_embeddings, copy_transposes=copy_transposes(cfg)).reshape(b, s)


def objective(params: Any, tokens: jax.Array, cfg: ModelConfig, *, teacher: Optional[Any] = None,
              teacher_cfg: Optional[ModelConfig] = None, distill: Optional[DistillConfig] = None
              ) -> tuple[jax.Array, jax.Array]:
    """(objective to minimise, student CE on the true tokens), both means over the batch."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden, _ = decoder(params, inputs, cfg)
    with jax.named_scope("output_loss"):
        true_ce = _student_ce(params, hidden, targets, cfg)
    if teacher is None:
        return jnp.mean(true_ce), jnp.mean(true_ce)
    w = distill.teacher_weight
    with jax.named_scope("teacher"):
        t_hidden, _ = decoder(jax.lax.stop_gradient(teacher), inputs, teacher_cfg)
        t_logits = jax.lax.stop_gradient(output_logits(teacher, t_hidden, teacher_cfg))  # fp32 [b, s, V]
    if distill.mode == "top1":
        teacher_ce = _student_ce(params, hidden, jnp.argmax(t_logits, axis=-1).astype(targets.dtype), cfg)
    else:
        temp = distill.temperature
        student = output_logits(params, hidden, cfg) / temp
        p_teacher = jax.nn.softmax(t_logits / temp, axis=-1)
        kl = jnp.sum(p_teacher * (jax.nn.log_softmax(t_logits / temp, axis=-1) - jax.nn.log_softmax(student, axis=-1)),
                     axis=-1)
        teacher_ce = temp * temp * kl
    return jnp.mean((1.0 - w) * true_ce + w * teacher_ce), jnp.mean(true_ce)
