"""The AFM-style decoder as pure functions over a params pytree.

Pre-norm RMSNorm blocks; grouped-query attention with per-head RMSNorm on queries and keys
applied before rotary embeddings (rotate-half convention); SwiGLU MLP; tied input/output
embedding. These are the same pieces, in the same order, as Hugging Face's Qwen3, which is what
export relies on.

Numerics: parameters are stored in `param_dtype` and cast to `compute_dtype` where used. Matmuls
take compute-dtype inputs and accumulate in fp32 (`preferred_element_type`) and hand back
compute-dtype activations; norms, softmax and the loss are computed in fp32.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from crosstrain.config import ModelConfig, dtype_of
from crosstrain.model.attention import ATTENTION_RESIDUALS, attention
from crosstrain.model.fused import linear, output_cross_entropy, qkv_projection, swiglu_mlp
from crosstrain.parallel.rules import constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim: int, base: float):
    """cos and sin tables [len, head_dim] for rotate-half rotary embeddings, in fp32.

    Positions given as a numpy array give numpy tables, which enter a jitted program as
    constants: XLA CPU would otherwise fuse cos and sin of a computed table into every RoPE
    fusion and evaluate them once per element of q and k, not once per table entry."""
    xp = np if isinstance(positions, np.ndarray) else jnp
    exponent = xp.arange(0, head_dim, 2, dtype=xp.float32) / xp.float32(head_dim)
    inv_freq = xp.float32(1.0) / (xp.float32(base) ** exponent)
    freqs = positions.astype(xp.float32)[:, None] * inv_freq[None, :]
    emb = xp.concatenate([freqs, freqs], axis=-1)
    return xp.cos(emb), xp.sin(emb)


# Static positions give constant tables up to this many entries each (4 MiB of fp32: 4096
# positions of head_dim 256); longer ones, as in context-lengthening at 32k, are computed in the
# program rather than carried as tens of MB of constants in every compiled step.
ROPE_CONSTANT_MAX = 1 << 20


def _rotate_half(x: jax.Array, sign: float) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-sign * x[..., half:], sign * x[..., :half]], axis=-1)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, len, heads, head_dim]; rotate-half pairs dimension i with i + head_dim/2.

    The backward is written out (dx = dy cos + rotate_half^T(dy sin), one elementwise
    expression) rather than autodiff's pads and adds for the slices and concatenate."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[None, :, None, :] + _rotate_half(x32, 1.0) * sin[None, :, None, :]
    return out.astype(x.dtype)


def _rope_fwd(x, cos, sin):
    return apply_rope(x, cos, sin), (cos, sin)


def _rope_bwd(res, dy):
    cos, sin = res
    d32 = dy.astype(jnp.float32)
    # rotate_half(x) = R x with R^T = -R, so the cotangent of x through it is -R (dy sin).
    dx = d32 * cos[None, :, None, :] + _rotate_half(d32 * sin[None, :, None, :], -1.0)
    return dx.astype(dy.dtype), jnp.zeros_like(cos), jnp.zeros_like(sin)


apply_rope.defvjp(_rope_fwd, _rope_bwd)


# Model code takes its choices as given: `crosstrain.resolve.resolve_model` decides every "auto"
# from the mesh's devices before the model is called. An unresolved "auto" here means the
# portable choice (reference attention, activations in the compute dtype, transposes left to the
# compiler, nothing recomputed, Pallas kernels compiled).


def activation_dtype(cfg: ModelConfig):
    return dtype_of(cfg.compute_dtype if cfg.activation_dtype == "auto" else cfg.activation_dtype)


def copy_transposes(cfg: ModelConfig) -> bool:
    return cfg.dot_transposes == "copy"


def interpret_kernels(cfg: ModelConfig) -> bool:
    return cfg.kernel_mode == "interpret"


def _block(cfg: ModelConfig, x, p, cos, sin, q_pos, kv_pos, cache_kv, start_pos):
    """One pre-norm decoder layer. Returns the new residual stream and, when decoding, the
    layer's updated (k, v) cache. Named scopes label each part in profiles (docs/performance.md)."""
    cdt = dtype_of(cfg.compute_dtype)
    adt = activation_dtype(cfg)
    eps = cfg.norm_eps
    b, s, d = x.shape
    with jax.named_scope("qkv"):
        h = rms_norm(x, p["attn_norm"], eps)
        q, k, v = qkv_projection(
            h.reshape(b * s, d).astype(cdt),
            *(p[name].reshape(d, -1).astype(cdt) for name in ("wq", "wk", "wv")),
            copy_transposes=copy_transposes(cfg),
        )
        q = checkpoint_name(q.reshape(b, s, cfg.heads, cfg.head_dim).astype(adt), "qkv")
        k = checkpoint_name(k.reshape(b, s, cfg.kv_heads, cfg.head_dim).astype(adt), "qkv")
        v = checkpoint_name(v.reshape(b, s, cfg.kv_heads, cfg.head_dim).astype(adt), "qkv")
    with jax.named_scope("qk_norm_rope"):
        if cfg.qk_norm:
            q = rms_norm(q, p["q_norm"], eps)
            k = rms_norm(k, p["k_norm"], eps)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_cache = None
    if cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, start_pos, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, start_pos, 0, 0))
        new_cache = (ck, cv)
        k, v = ck.astype(adt), cv.astype(adt)
    with jax.named_scope("attention"):
        o = attention(q.astype(cdt), k.astype(cdt), v.astype(cdt), q_pos=q_pos, kv_pos=kv_pos, impl=cfg.attention,
                      copy_transposes=copy_transposes(cfg), interpret=interpret_kernels(cfg))
        o = checkpoint_name(o, "attn_out")
    with jax.named_scope("attn_out_proj"):
        proj = linear(o.reshape(b * s, -1).astype(cdt), p["wo"].reshape(-1, d).astype(cdt),
                      copy_transposes=copy_transposes(cfg))
        x = x + checkpoint_name(proj.reshape(b, s, d).astype(adt), "attn_proj")
        x = constrain(x, ("batch", "length", "act_embed"))
    with jax.named_scope("mlp"):
        h = rms_norm(x, p["mlp_norm"], eps)
        mlp_out = swiglu_mlp(h.reshape(b * s, d).astype(cdt), p["w_gate"].astype(cdt), p["w_up"].astype(cdt),
                             p["w_down"].astype(cdt), copy_transposes=copy_transposes(cfg))
        x = x + mlp_out.reshape(b, s, d).astype(adt)
        x = constrain(x, ("batch", "length", "act_embed"))
    return x, new_cache


# selective: the outputs of the weight matmuls in the activation dtype (q/k/v, the attention output
# and its projection, the MLP gate and up) and the attention kernel's residuals; norms, RoPE and the
# elementwise work are recomputed (Korthikanti et al. 2022). Named rather than "every dot": a dot's
# fp32 accumulator would be saved at twice the bytes.
SELECTIVE_SAVED = ("qkv", "attn_out", "attn_proj", "mlp_gate_up", ATTENTION_RESIDUALS)
REMAT_POLICIES = ("none", "selective", "dots", "attention", "full")


def remat_policy(policy: str):
    """The jax.checkpoint policy of a remat name (None: save nothing but the layer input)."""
    cp = jax.checkpoint_policies
    if policy == "selective":
        return cp.save_only_these_names(*SELECTIVE_SAVED)
    if policy == "dots":
        # Every matmul output as computed, as JAX's dots_with_no_batch_dims_saveable (MaxText's
        # "minimal"), plus the attention kernel's residuals.
        return cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                          cp.save_only_these_names("attn_out", ATTENTION_RESIDUALS))
    if policy == "attention":
        # Only the attention output (Splash: its output and log-sum-exp): the backward recomputes
        # every matmul and elementwise op of the layer but not the attention itself.
        return cp.save_only_these_names("attn_out", ATTENTION_RESIDUALS)
    return None


def _remat(fn, policy: str):
    if policy in ("none", "auto"):
        return fn
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}")
    saved = remat_policy(policy)
    return jax.checkpoint(fn) if saved is None else jax.checkpoint(fn, policy=saved)


def unstack_layers(layers: Params, n: int) -> list[Params]:
    """Per-layer views of the stacked layer params. One split per array: its gradient is one
    concatenate, where indexing each layer out gives every layer's gradient a pad to the full
    stack and an add (n passes over the stacked gradient)."""
    parts = jax.tree.map(lambda a: [x.reshape(a.shape[1:]) for x in jnp.split(a, n, axis=0)], layers)
    return [jax.tree.map(lambda ps: ps[i], parts, is_leaf=lambda v: isinstance(v, list)) for i in range(n)]


def decoder(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    start_pos: jax.Array | int = 0,
    cache: Optional[Cache] = None,
) -> tuple[jax.Array, Optional[Cache]]:
    """Final-norm hidden states [batch, len, hidden] for `tokens` [batch, len].

    With `cache` (from `init_cache`), keys and values of these tokens are written at
    `start_pos`, attention runs against every cached position, and the updated cache is returned.
    """
    # A row lookup cannot be served from a sharded table without moving the fsdp axis from the
    # model width to the batch (an all-to-all GSPMD will not plan): all-gather the table first,
    # as FSDP does for every weight before use.
    table = constrain(params["embed"], (None, None))
    with jax.named_scope("embed"):
        x = jnp.take(table, tokens, axis=0).astype(activation_dtype(cfg))
    x = constrain(x, ("batch", "length", "act_embed"))
    q_pos = start_pos + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    kv_pos = q_pos if cache is None else jnp.arange(cache["k"].shape[2], dtype=jnp.int32)
    if cache is None and isinstance(start_pos, int) and tokens.shape[1] * cfg.head_dim <= ROPE_CONSTANT_MAX:
        cos, sin = rope_tables(start_pos + np.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_base)
    else:
        cos, sin = rope_tables(q_pos, cfg.head_dim, cfg.rope_base)

    def layer(x, p, kv):
        return _block(cfg, x, p, cos, sin, q_pos, kv_pos, kv, start_pos)

    layers = params["layers"]
    if cache is None:
        body = _remat(lambda x, p: (layer(x, p, None)[0], None), cfg.remat)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, layers)
        else:
            for p in unstack_layers(layers, cfg.layers):
                x, _ = body(x, p)
        new_cache = None
    else:
        def body(x, args):
            p, ck, cv = args
            x, kv = layer(x, p, (ck, cv))
            return x, kv

        if cfg.scan_layers:
            x, (ks, vs) = jax.lax.scan(body, x, (layers, cache["k"], cache["v"]))
        else:
            ks, vs = [], []
            for i in range(cfg.layers):
                x, (k_i, v_i) = body(x, (jax.tree.map(lambda a: a[i], layers), cache["k"][i], cache["v"][i]))
                ks.append(k_i)
                vs.append(v_i)
            ks, vs = jnp.stack(ks), jnp.stack(vs)
        new_cache = {"k": ks, "v": vs}
    with jax.named_scope("final_norm"):
        x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    return x, new_cache


def output_logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """fp32 logits [batch, len, vocab]."""
    cdt = dtype_of(cfg.compute_dtype)
    h = hidden.astype(cdt)
    if cfg.tie_embeddings:
        logits = jnp.einsum("bsd,vd->bsv", h, params["embed"].astype(cdt), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bsd,dv->bsv", h, params["lm_head"].astype(cdt), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [batch, len, vocab] in fp32 for a full sequence (no cache)."""
    hidden, _ = decoder(params, tokens, cfg)
    return output_logits(params, hidden, cfg)


def token_losses(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Per-position next-token cross-entropy [batch, len-1] for sequences `tokens` [batch, len]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden, _ = decoder(params, inputs, cfg)
    cdt = dtype_of(cfg.compute_dtype)
    b, s, d = hidden.shape
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    with jax.named_scope("output_loss"):
        losses = output_cross_entropy(
            hidden.reshape(b * s, d).astype(cdt), w.astype(cdt), targets.reshape(b * s), tied=cfg.tie_embeddings,
            copy_transposes=copy_transposes(cfg),
        )
    return losses.reshape(b, s)


def loss_fn(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean next-token cross-entropy over a batch of packed sequences [batch, seq_len + 1]."""
    return jnp.mean(token_losses(params, tokens, cfg))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    dtype = dtype or dtype_of(cfg.compute_dtype)
    shape = (cfg.layers, batch, length, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
