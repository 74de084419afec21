"""Hand-written gradients for the two places where automatic differentiation was slow on CPU.

Profiling crosstrain's step on XLA's CPU backend (docs/performance.md) found the backward pass at
~3.5x the forward, dominated by (1) the SwiGLU backward, which XLA recomputed sigmoid for inside a
transposed-layout copy, and (2) the output projection's backward, whose dots ran on a slow
transposed path over the [tokens, vocab] gradient. These custom VJPs give the same values and
gradients (the tests compare them with plain autodiff) with:

- `swiglu`: the forward keeps sigmoid(gate) for the backward, which is then only multiplies and
  adds, in the activations' natural layout;
- `output_cross_entropy`: fp32 per-token loss of h @ W for targets, with the backward's two dots
  oriented so the large [tokens, vocab] softmax gradient is never transposed (dW comes from
  h^T @ g, transposing only the small h).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, in the inputs' dtype (computed in fp32)."""
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    g = gate.astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    out = (g * s * up.astype(jnp.float32)).astype(gate.dtype)
    return out, (gate, up, s.astype(gate.dtype))


def _swiglu_bwd(res, dout):
    gate, up, s = res
    g, u, s32, d = gate.astype(jnp.float32), up.astype(jnp.float32), s.astype(jnp.float32), dout.astype(jnp.float32)
    silu = g * s32
    d_up = d * silu
    d_gate = d * u * s32 * (1.0 + g * (1.0 - s32))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _logits(h: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """fp32 logits [N, V] of h [N, D] against w [V, D] (tied embedding) or [D, V] (lm_head)."""
    if transposed:
        return jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def output_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, *, tied: bool) -> jax.Array:
    """Per-token cross-entropy [N] of logits h [N, D] @ W for int targets [N], in fp32.

    W is the tied embedding [V, D] (`tied`) or an lm_head [D, V]; h and W in the compute dtype."""
    return _output_ce(h, w, targets, tied)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _output_ce(h, w, targets, tied):
    logits = _logits(h, w, tied)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return logz - picked


def _output_ce_fwd(h, w, targets, tied):
    logits = _logits(h, w, tied)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return logz - picked, (h, w, targets, logits, logz)


def _output_ce_bwd(tied, res, dloss):
    h, w, targets, logits, logz = res
    # d loss_i / d logits_i = softmax_i - onehot(target_i), scaled by the incoming cotangent.
    g = jnp.exp(logits - logz[:, None]) * dloss[:, None]
    g = g.at[jnp.arange(g.shape[0]), targets].add(-dloss)
    g = g.astype(h.dtype)
    if tied:
        dh = jnp.dot(g, w, preferred_element_type=jnp.float32)  # [N, V] @ [V, D]
        dw = jnp.dot(h.T, g, preferred_element_type=jnp.float32).T  # ([D, N] @ [N, V])^T
    else:
        dh = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [N,V]@[D,V]^T
        dw = jnp.dot(h.T, g, preferred_element_type=jnp.float32)  # [D, V]
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_output_ce.defvjp(_output_ce_fwd, _output_ce_bwd)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def swiglu_mlp(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down for h [N, D], all in h's dtype with fp32 accumulation."""
    return _mlp_fwd(h, w_gate, w_up, w_down)[0]


def _mlp_fwd(h, w_gate, w_up, w_down):
    cdt = h.dtype
    # The gate and up projections are named so a remat policy can keep them (in h's dtype) and
    # recompute the rest of the forward from them alone.
    g = checkpoint_name(_mm(h, w_gate).astype(cdt), "mlp_gate")
    u = checkpoint_name(_mm(h, w_up).astype(cdt), "mlp_up")
    g32 = g.astype(jnp.float32)
    s = jax.nn.sigmoid(g32)
    a = (g32 * s * u.astype(jnp.float32)).astype(cdt)
    y = _mm(a, w_down).astype(cdt)
    return y, (h, w_gate, w_up, w_down, g, u, s.astype(cdt), a)


def _mlp_bwd(res, dy):
    h, w_gate, w_up, w_down, g, u, s, a = res
    cdt = h.dtype
    # Every weight gradient is (small^T) @ (big in its natural layout), transposed back when small:
    # the [N, F] activations and gradients are never transposed.
    d_down = _mm(dy.T, a).T  # ([D, N] @ [N, F])^T = [F, D]
    da = jax.lax.dot_general(dy, w_down, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [N, F]
    g32, u32, s32 = g.astype(jnp.float32), u.astype(jnp.float32), s.astype(jnp.float32)
    du = (da * g32 * s32).astype(cdt)
    dg = (da * u32 * s32 * (1.0 + g32 * (1.0 - s32))).astype(cdt)
    ht = h.T
    d_gate = _mm(ht, dg)  # [D, F]
    d_up = _mm(ht, du)
    dh = (jax.lax.dot_general(dg, w_gate, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
          + jax.lax.dot_general(du, w_up, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    return dh.astype(cdt), d_gate.astype(w_gate.dtype), d_up.astype(w_up.dtype), d_down.astype(w_down.dtype)


swiglu_mlp.defvjp(_mlp_fwd, _mlp_bwd)



@jax.custom_vjp
def qkv_projection(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array):
    """x [N, D] @ wq [D, Mq], wk [D, Mk], wv [D, Mv] as one GEMM; fp32 results."""
    return _qkv_fwd(x, wq, wk, wv)[0]


def _qkv_fwd(x, wq, wk, wv):
    w = jnp.concatenate([wq, wk, wv], axis=1)
    y = _mm(x, w)
    mq, mk = wq.shape[1], wk.shape[1]
    return (y[:, :mq], y[:, mq : mq + mk], y[:, mq + mk :]), (x, w, mq, mk)


def _qkv_bwd(res, grads):
    x, w, mq, mk = res
    dy = jnp.concatenate([g.astype(x.dtype) for g in grads], axis=1)  # [N, Mq + Mk + Mv]
    dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = _mm(x.T, dy)  # one [D, N] @ [N, M] for all three weights
    return (dx.astype(x.dtype), dw[:, :mq].astype(w.dtype), dw[:, mq : mq + mk].astype(w.dtype),
            dw[:, mq + mk :].astype(w.dtype))


qkv_projection.defvjp(_qkv_fwd, _qkv_bwd)


def _bmm(a, b, contract_a: int, contract_b: int):
    """Batched matmul over the two leading dims, contracting the given trailing dims, fp32 out."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)


@jax.custom_vjp
def causal_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention over positions 0..n-1, q [B, S, H, D], k and v
    [B, S, KV, D]; computed as batched GEMMs over (batch, kv head) with the query group folded
    into the rows, returning [B, S, H, D] in q's dtype."""
    return _attn_fwd(q, k, v)[0]


def _attn_fwd(q, k, v):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, d)
    kt = k.transpose(0, 2, 1, 3)
    vt = v.transpose(0, 2, 1, 3)
    scores = _bmm(qg, kt, 3, 3) * (d**-0.5)  # [B, KV, G*S, T]
    rows = jnp.arange(g * s) % s
    allowed = jnp.arange(s)[None, :] <= rows[:, None]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    p = probs.astype(q.dtype)
    out = _bmm(p, vt, 3, 2)  # [B, KV, G*S, D]
    y = out.reshape(b, kvh, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(q.dtype)
    return y, (qg, kt, vt, p, (b, s, h, d, kvh, g))


def _attn_bwd(res, dy):
    qg, kt, vt, p, (b, s, h, d, kvh, g) = res
    cdt = qg.dtype
    do = dy.astype(cdt).reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, d)
    dv = _bmm(p, do, 2, 2)  # p^T @ do: [B, KV, T, D]
    dp = _bmm(do, vt, 3, 3)  # do @ v^T: [B, KV, G*S, T]
    p32 = p.astype(jnp.float32)
    ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True)) * (d**-0.5)).astype(cdt)
    dq = _bmm(ds, kt, 3, 2)  # [B, KV, G*S, D]
    dk = _bmm(ds, qg, 2, 2)  # ds^T @ q: [B, KV, T, D]
    dq = dq.reshape(b, kvh, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
    dk = dk.transpose(0, 2, 1, 3)
    dv = dv.transpose(0, 2, 1, 3)
    return dq.astype(cdt), dk.astype(cdt), dv.astype(cdt)


causal_gqa_attention.defvjp(_attn_fwd, _attn_bwd)
