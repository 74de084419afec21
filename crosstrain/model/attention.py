"""One dispatch point for attention kernels.

`attention(q, k, v, ...)` picks an implementation from a priority list per backend; each
implementation declares what it supports, and the pure-JAX `reference` supports everything, so it
is both the fallback and the test oracle. New kernels (Splash on TPU, NKI on Trainium) plug in by
adding an `Impl` and naming it in `PRIORITY`.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with heads a
multiple of kv_heads (grouped-query attention). `q_pos` [q_len] and `kv_pos` [kv_len] are absolute
positions: a query attends to keys at positions <= its own (causal), which also covers decoding
against a KV cache whose unused slots carry a position past every query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp


def reference_attention(q, k, v, *, q_pos, kv_pos):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    allowed = kv_pos[None, :] <= q_pos[:, None]  # [s, t]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)


def fused_reference_attention(q, k, v, *, q_pos, kv_pos, copy_transposes=False):
    from crosstrain.model.fused import causal_gqa_attention

    return causal_gqa_attention(q, k, v, copy_transposes=copy_transposes)


def _causal_self(q, k, q_pos, kv_pos) -> bool:
    # Fused kernels below only take the plain causal mask of training (positions 0..n-1).
    return q.shape[1] == k.shape[1] and q_pos is kv_pos


def xla_attention(q, k, v, *, q_pos, kv_pos):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def cudnn_attention(q, k, v, *, q_pos, kv_pos):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable[..., bool]


IMPLS: dict[str, Impl] = {
    "reference": Impl(reference_attention, lambda q, k, q_pos, kv_pos: True),
    # The reference with a hand-written backward (model/fused.py): training's causal self-attention.
    "fused": Impl(fused_reference_attention, _causal_self),
    "xla": Impl(xla_attention, _causal_self),
    "cudnn": Impl(
        cudnn_attention,
        lambda q, k, q_pos, kv_pos: _causal_self(q, k, q_pos, kv_pos)
        and jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128,
    ),
}

# First supported implementation wins under attention="auto".
PRIORITY: dict[str, tuple[str, ...]] = {
    "gpu": ("cudnn", "reference"),
    "tpu": ("reference",),
    "cpu": ("fused", "reference"),
}


def select(name: str, q, k, q_pos, kv_pos) -> str:
    if name != "auto":
        return name if IMPLS[name].supports(q, k, q_pos, kv_pos) else "reference"
    for candidate in PRIORITY.get(jax.default_backend(), ("reference",)):
        if IMPLS[candidate].supports(q, k, q_pos, kv_pos):
            return candidate
    return "reference"


def attention(q, k, v, *, q_pos, kv_pos, impl: str = "auto", copy_transposes: bool = False):
    """`copy_transposes` (ModelConfig.dot_transposes) reaches the kernels that take it."""
    name = select(impl, q, k, q_pos, kv_pos)
    kw = {"copy_transposes": copy_transposes} if name == "fused" else {}
    return IMPLS[name].fn(q, k, v, q_pos=q_pos, kv_pos=kv_pos, **kw)
