"""One dispatch point for attention kernels.

`attention(q, k, v, ...)` runs the kernel the run resolved (`crosstrain.resolve` picks it once,
from the mesh's devices, when `model.attention=auto`); model code never asks which backend it is
on. Each kernel declares the calls it can take (`Impl.supports`): a call it cannot take (decoding
against a KV cache, say) runs the pure-JAX `reference`, which takes everything and is the tests'
oracle.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with heads a
multiple of kv_heads (grouped-query attention). `q_pos` [q_len] and `kv_pos` [kv_len] are absolute
positions: a query attends to keys at positions <= its own (causal), which also covers decoding
against a KV cache whose unused slots carry a position past every query.

Kernels:
- `reference`: scores, softmax and weighted sum in plain JAX (keeps [heads, q, kv] scores).
- `fused`: the reference with a hand-written backward, batched GEMMs in causal query blocks
  (model/fused.py); the CPU choice.
- `xla`, `cudnn`: `jax.nn.dot_product_attention` (cuDNN's flash kernel on NVIDIA GPUs).
- `splash`: the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.splash_attention` (causal mask,
  grouped-query heads, block-sparse: the masked half is skipped; fused backward). A Mosaic kernel
  cannot be partitioned by the compiler, so it runs inside `jax.shard_map` over the active mesh:
  batch over the batch axes, heads over `tensor`. With `interpret=True` (`model.kernel_mode`) the
  same kernel runs in Pallas interpret mode on any backend, which is how the tests run the code a
  TPU runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

SPLASH_LANES = 128  # Splash needs head_dim and its blocks in multiples of the TPU's 128 lanes
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the sequence is used
# Splash's saved output and log-sum-exp carry this name: the "attention" remat policy keeps them.
ATTENTION_RESIDUALS = "attention_residuals"


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


def fused_reference_attention(q, k, v, *, q_pos, kv_pos, copy_transposes=False, interpret=False):
    from crosstrain.model.fused import causal_gqa_attention

    return causal_gqa_attention(q, k, v, copy_transposes=copy_transposes)


def xla_attention(q, k, v, *, q_pos, kv_pos, copy_transposes=False, interpret=False):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _cudnn_flash(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


@jax.custom_vjp
def _cudnn_named(q, k, v):
    return _cudnn_flash(q, k, v)


def _cudnn_named_fwd(q, k, v):
    # cuDNN's own rule keeps q, k, v, its output and the softmax statistics for the backward, but
    # under no name, so a remat policy that saves by name (selective, attention) would run the
    # whole attention forward again in the backward. Named as Splash names its residuals, they are
    # kept like Splash's: the same policies mean the same recomputation on GPU as on TPU.
    out, backward = jax.vjp(_cudnn_flash, q, k, v)
    leaves, tree = jax.tree.flatten(backward)
    leaves = [checkpoint_name(x, ATTENTION_RESIDUALS) if isinstance(x, jax.Array) else x for x in leaves]
    return out, jax.tree.unflatten(tree, leaves)


def _cudnn_named_bwd(backward, dout):
    return backward(dout)


_cudnn_named.defvjp(_cudnn_named_fwd, _cudnn_named_bwd)


def cudnn_attention(q, k, v, *, q_pos, kv_pos, copy_transposes=False, interpret=False):
    return _cudnn_named(q, k, v)


def splash_block(seq_len: int) -> int | None:
    """The Splash block size for a sequence length, or None if no block divides it."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def splash_shape_problem(head_dim: int, seq_len: int) -> str | None:
    """Why Splash cannot take this shape (None when it can)."""
    if head_dim % SPLASH_LANES:
        return f"head_dim {head_dim} is not a multiple of {SPLASH_LANES}"
    if splash_block(seq_len) is None:
        return f"seq_len {seq_len} is not a multiple of {SPLASH_BLOCKS[-1]}"
    return None


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = splash_block(seq)
    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          use_fused_bwd_kernel=True)
    with jax.ensure_compile_time_eval():  # the tables are built on the host even inside a trace
        kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                    residual_checkpoint_name=ATTENTION_RESIDUALS)
    # The block-sparsity tables as host numpy constants: device arrays closed over by a jitted
    # step become hidden arguments that an ahead-of-time compiled step is not called with.
    leaves, tree = jax.tree.flatten(kernel)
    return jax.tree.unflatten(tree, [None if x is None else np.asarray(x) for x in leaves])


def _splash_local(q, k, v, *, interpret: bool):
    """Splash on one device's shard: q [b, s, h, d], k, v [b, s, kvh, d] (kvh divides h)."""
    b, s, h, d = q.shape
    kernel = _splash_kernel(h, s, interpret)
    # The kernel takes heads-major [h, s, d] per sequence and does not scale the scores.
    qt = jnp.swapaxes(q * jnp.asarray(d**-0.5, q.dtype), 1, 2)
    out = jax.vmap(kernel)(qt, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def splash_attention(q, k, v, *, q_pos, kv_pos, copy_transposes=False, interpret=False):
    from crosstrain.parallel.rules import active_mesh, logical_to_spec

    local = functools.partial(_splash_local, interpret=interpret)
    active = active_mesh()
    if active is None:
        return local(q, k, v)
    mesh, rules = active
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), rules, mesh)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)


def _causal_self(q, k, q_pos, kv_pos) -> bool:
    # Fused kernels only take the plain causal mask of training (positions 0..n-1).
    return q.shape[1] == k.shape[1] and q_pos is kv_pos


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable[..., bool]


IMPLS: dict[str, Impl] = {
    "reference": Impl(reference_attention, lambda q, k, q_pos, kv_pos: True),
    "fused": Impl(fused_reference_attention, _causal_self),
    "xla": Impl(xla_attention, _causal_self),
    "cudnn": Impl(cudnn_attention, _causal_self),
    "splash": Impl(splash_attention,
                   lambda q, k, q_pos, kv_pos: _causal_self(q, k, q_pos, kv_pos)
                   and splash_shape_problem(q.shape[-1], q.shape[1]) is None),
}


def attention(q, k, v, *, q_pos, kv_pos, impl: str = "reference", copy_transposes: bool = False,
              interpret: bool = False):
    """Attention with the kernel `impl` where it takes this call, else the reference.

    `copy_transposes` (ModelConfig.dot_transposes) reaches the kernels that take it; `interpret`
    runs Pallas kernels in interpret mode. An unresolved "auto" runs the reference."""
    name = impl if impl in IMPLS and IMPLS[impl].supports(q, k, q_pos, kv_pos) else "reference"
    if name == "reference":
        return reference_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos)
    return IMPLS[name].fn(q, k, v, q_pos=q_pos, kv_pos=kv_pos, copy_transposes=copy_transposes,
                          interpret=interpret)
