"""Hand-written gradients for the two places where automatic differentiation was slow on CPU.

Profiling crosstrain's step on XLA's CPU backend (docs/performance.md) found the backward pass at
~3.5x the forward, dominated by (1) the SwiGLU backward, which XLA recomputed sigmoid for inside a
transposed-layout copy, and (2) the output projection's backward, whose dots ran on a slow
transposed path over the [tokens, vocab] gradient. These custom VJPs give the same values and
gradients (the tests compare them with plain autodiff) with:

- `swiglu_mlp`: the whole SwiGLU MLP, gate and up as one GEMM; the backward is multiplies and
  adds in the activations' natural layout, and GEMMs;
- `output_cross_entropy`: fp32 per-token loss of h @ W for targets, with the backward's two dots
  oriented so the large [tokens, vocab] softmax gradient is never transposed (dW comes from
  h^T @ g, transposing only the small h).

On XLA's CPU backend, YNNPACK runs a bf16 x bf16 -> fp32 dot only in the row-major forms
A @ B and A @ B^T; a transpose XLA folds into a dot as A^T @ B (every weight gradient) makes it
convert both operands to fp32 and take a slower path. With `copy_transposes` the backward
rules transpose the small operand into a row-major copy XLA cannot fold (`transpose_copy`);
`ModelConfig.dot_transposes` picks it ("auto": on a CPU backend only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

_NT = (((1,), (1,)), ((), ()))  # contract the last dims of both: A @ B^T


def transpose_copy(x: jax.Array, copy: bool = True) -> jax.Array:
    """x.T [n, m] of a 2-D x [m, n] for use as a dot operand. With `copy`, a row-major copy that
    XLA cannot fold into the dot as a transposed operand: an optimization barrier on the flat
    array pins the layout on both sides (a barrier on the 2-D array alone lets layout assignment
    make the transpose a free column-major view, which the dot then reads transposed)."""
    if not copy:
        return x.T
    m, n = x.shape
    x = lax.optimization_barrier(x.reshape(-1)).reshape(m, n)
    return lax.optimization_barrier(x.T.reshape(-1)).reshape(n, m)


def _logits(h: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """fp32 logits [N, V] of h [N, D] against w [V, D] (tied embedding) or [D, V] (lm_head)."""
    if transposed:
        return jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def output_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, *, tied: bool,
                         copy_transposes: bool = False) -> jax.Array:
    """Per-token cross-entropy [N] of logits h [N, D] @ W for int targets [N], in fp32.

    W is the tied embedding [V, D] (`tied`) or an lm_head [D, V]; h and W in the compute dtype.
    The forward keeps exp(logits - max) in the compute dtype and its fp32 row sums z; the backward
    never touches the [N, V] matrix except as a GEMM operand: the softmax normalisation and the
    incoming per-token cotangent are row scalings, applied to the small operand or the [N, D]
    result, and the one-hot part of (softmax - onehot) is a gather / scatter-add of N rows."""
    return _output_ce(h, w, targets, tied, copy_transposes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _output_ce(h, w, targets, tied, copy):
    return _output_ce_fwd(h, w, targets, tied, copy)[0]


def _output_ce_fwd(h, w, targets, tied, copy):
    logits = _logits(h, w, tied)
    m = jnp.max(logits, axis=-1)
    e = jnp.exp(logits - m[:, None])
    z = jnp.sum(e, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return m + jnp.log(z) - picked, (h, w, targets, e.astype(h.dtype), z)


def _output_ce_bwd(tied, copy, res, dloss):
    h, w, targets, e, z = res
    f32 = jnp.float32
    # d loss_i / d logits_i = (e_i / z_i - onehot(target_i)) * dloss_i
    r = dloss / z
    h32 = h.astype(f32)
    hs = (h32 * r[:, None]).astype(h.dtype)  # the row scaling of e, moved onto h for dW
    picked_h = -(h32 * dloss[:, None])  # the one-hot rows of dW
    if tied:  # w [V, D]
        dh = jnp.dot(e, w, preferred_element_type=f32) * r[:, None] - dloss[:, None] * w[targets].astype(f32)
        dw = transpose_copy(_mm(transpose_copy(hs, copy), e), copy)  # ([D, N] @ [N, V])^T
        dw = dw.at[targets].add(picked_h)
    else:  # w [D, V]
        dh = (lax.dot_general(e, w, _NT, preferred_element_type=f32) * r[:, None]
              - dloss[:, None] * w[:, targets].T.astype(f32))
        dw = _mm(transpose_copy(hs, copy), e)  # [D, V]
        dw = dw.at[:, targets].add(picked_h.T)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_output_ce.defvjp(_output_ce_fwd, _output_ce_bwd)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def swiglu_mlp(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
               copy_transposes: bool = False) -> jax.Array:
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down for h [N, D], all in h's dtype with fp32 accumulation.

    The gate and up projections run as one GEMM against [w_gate | w_up], in both passes."""
    return _swiglu_mlp(h, w_gate, w_up, w_down, copy_transposes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swiglu_mlp(h, w_gate, w_up, w_down, copy):
    return _mlp_fwd(h, w_gate, w_up, w_down, copy)[0]


def _mlp_fwd(h, w_gate, w_up, w_down, copy):
    cdt = h.dtype
    f = w_gate.shape[1]
    # The gate and up projections are one GEMM, kept in h's dtype as one array, named so a remat
    # policy can keep it and recompute the rest of the forward from it alone. The backward
    # recomputes sigmoid(gate) rather than reading a stored copy.
    gu = checkpoint_name(_mm(h, jnp.concatenate([w_gate, w_up], axis=1)).astype(cdt), "mlp_gate_up")  # [N, 2F]
    g32, u32 = gu[:, :f].astype(jnp.float32), gu[:, f:].astype(jnp.float32)
    a = (g32 * jax.nn.sigmoid(g32) * u32).astype(cdt)
    y = _mm(a, w_down).astype(cdt)
    return y, (h, w_gate, w_up, w_down, gu, a)


def _mlp_bwd(copy, res, dy):
    h, w_gate, w_up, w_down, gu, a = res
    cdt = h.dtype
    f = w_gate.shape[1]
    # Weight gradients are (small^T) @ (big in its natural layout): the [N, F] activations and
    # gradients are never transposed, only h, dy and the small [D, F] results.
    d_down = transpose_copy(_mm(transpose_copy(dy, copy), a), copy)  # ([D, N] @ [N, F])^T = [F, D]
    da = lax.dot_general(dy, w_down, _NT, preferred_element_type=jnp.float32)  # [N, F]
    g32, u32 = gu[:, :f].astype(jnp.float32), gu[:, f:].astype(jnp.float32)
    s32 = jax.nn.sigmoid(g32)
    du = da * g32 * s32
    dg = da * u32 * s32 * (1.0 + g32 * (1.0 - s32))
    dgu = jnp.concatenate([dg, du], axis=1).astype(cdt)  # [N, 2F]
    d_gu = _mm(transpose_copy(h, copy), dgu)  # [D, 2F]
    dh = lax.dot_general(dgu, jnp.concatenate([w_gate, w_up], axis=1), _NT, preferred_element_type=jnp.float32)
    return (dh.astype(cdt), d_gu[:, :f].astype(w_gate.dtype), d_gu[:, f:].astype(w_up.dtype),
            d_down.astype(w_down.dtype))


_swiglu_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def qkv_projection(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, *,
                   copy_transposes: bool = False):
    """x [N, D] @ wq [D, Mq], wk [D, Mk], wv [D, Mv] as one GEMM; fp32 results."""
    return _qkv(x, wq, wk, wv, copy_transposes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qkv(x, wq, wk, wv, copy):
    return _qkv_fwd(x, wq, wk, wv, copy)[0]


def _qkv_fwd(x, wq, wk, wv, copy):
    w = jnp.concatenate([wq, wk, wv], axis=1)
    y = _mm(x, w)
    mq, mk = wq.shape[1], wk.shape[1]
    return (y[:, :mq], y[:, mq : mq + mk], y[:, mq + mk :]), (x, w, mq, mk)


def _qkv_bwd(copy, res, grads):
    x, w, mq, mk = res
    dy = jnp.concatenate([g.astype(x.dtype) for g in grads], axis=1)  # [N, Mq + Mk + Mv]
    dx = lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)
    dw = _mm(transpose_copy(x, copy), dy)  # one [D, N] @ [N, M] for all three weights
    return (dx.astype(x.dtype), dw[:, :mq].astype(w.dtype), dw[:, mq : mq + mk].astype(w.dtype),
            dw[:, mq + mk :].astype(w.dtype))


_qkv.defvjp(_qkv_fwd, _qkv_bwd)


def row_major(x: jax.Array, copy: bool = True) -> jax.Array:
    """x, pinned to a row-major layout of its logical shape (see `transpose_copy`)."""
    return lax.optimization_barrier(x.reshape(-1)).reshape(x.shape) if copy else x


def _bnt(a, b):
    """[B, M, K] @ [B, N, K]^T -> [B, M, N], fp32 out."""
    return lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _bnn(a, b):
    """[B, M, K] @ [B, K, N] -> [B, M, N], fp32 out."""
    return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def causal_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, copy_transposes: bool = False) -> jax.Array:
    """Causal grouped-query attention over positions 0..n-1, q [B, S, H, D], k and v
    [B, S, KV, D]; computed as batched GEMMs over (batch, kv head) with the query group folded
    into the rows, returning [B, S, H, D] in q's dtype. The softmax scale is applied to q; the
    backward keeps the probabilities from the forward, and its two "transposed" GEMMs (dK, dV)
    transpose the small [rows, head_dim] operand and the result instead of the [rows, keys] one."""
    return _attention(q, k, v, copy_transposes)


def _fold_q(x, b, s, kvh, g, d, copy):
    return row_major(x.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kvh, g * s, d), copy)


def _fold_kv(x, b, s, kvh, d, copy):
    return row_major(x.transpose(0, 2, 1, 3).reshape(b * kvh, s, d), copy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, copy):
    return _attn_fwd(q, k, v, copy)[0]


def _attn_fwd(q, k, v, copy):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    cdt = q.dtype
    qg = _fold_q((q.astype(jnp.float32) * d**-0.5).astype(cdt), b, s, kvh, g, d, copy)  # [B*KV, G*S, D]
    kt = _fold_kv(k, b, s, kvh, d, copy)  # [B*KV, T, D]
    vt = _fold_kv(v, b, s, kvh, d, copy)
    scores = _bnt(qg, kt)  # [B*KV, G*S, T]
    rows = jnp.arange(g * s) % s
    allowed = jnp.arange(s)[None, :] <= rows[:, None]
    scores = jnp.where(allowed, scores, -jnp.inf)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(cdt)
    out = _bnn(p, vt)  # [B*KV, G*S, D]
    y = out.reshape(b, kvh, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(cdt)
    return y, (qg, kt, vt, p, (b, s, h, d, kvh, g))


def _attn_bwd(copy, res, dy):
    qg, kt, vt, p, (b, s, h, d, kvh, g) = res
    cdt = qg.dtype
    do = _fold_q(dy.astype(cdt), b, s, kvh, g, d, copy)  # [B*KV, G*S, D]

    def t_small(x):  # [B, M, D] -> row-major [B, D, M]
        return row_major(jnp.swapaxes(row_major(x, copy), 1, 2), copy)

    # dV = P^T dO and dK = dS^T Q, computed as (dO^T P)^T and (Q^T dS)^T.
    dv = jnp.swapaxes(row_major(_bnn(t_small(do), p), copy), 1, 2)  # [B*KV, T, D]
    dp = _bnt(do, vt)  # [B*KV, G*S, T]
    p32 = p.astype(jnp.float32)
    ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))).astype(cdt)
    dq = _bnn(ds, kt) * d**-0.5  # [B*KV, G*S, D]
    dk = jnp.swapaxes(row_major(_bnn(t_small(qg), ds), copy), 1, 2)  # [B*KV, T, D]
    dq = dq.reshape(b, kvh, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
    dk = dk.reshape(b, kvh, s, d).transpose(0, 2, 1, 3)
    dv = dv.reshape(b, kvh, s, d).transpose(0, 2, 1, 3)
    return dq.astype(cdt), dk.astype(cdt), dv.astype(cdt)


_attention.defvjp(_attn_fwd, _attn_bwd)
