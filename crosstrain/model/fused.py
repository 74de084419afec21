"""Hand-written gradients for the GEMM-heavy parts of a layer, where automatic differentiation
was slow on CPU.

Profiling crosstrain's step on XLA's CPU backend found the backward pass far slower than twice the
forward (measured: docs/performance.md): XLA recomputed the SwiGLU's sigmoid inside transposed-
layout copies, ran the output projection's dots over a transposed [tokens, vocab] gradient, and
transposed the big operand of every weight gradient. These custom VJPs give the same values and gradients (the tests
compare them with plain autodiff):

- `qkv_projection`: q, k and v as one GEMM, one weight-gradient GEMM for all three (on a CPU,
  with `copy_transposes`, one per weight: concatenating the three gradients cost more there);
- `linear`: one projection (the attention output's), its weight gradient from a row-major x^T;
- `causal_gqa_attention`: batched GEMMs over (batch, kv head), causal query blocks;
- `swiglu_mlp`: the whole SwiGLU MLP, gate and up as one GEMM; the backward is multiplies and
  adds in the activations' natural layout, and GEMMs (per half on a CPU, likewise);
- `output_cross_entropy`: fp32 per-token loss of h @ W for targets, with the backward's two dots
  oriented so the large [tokens, vocab] matrix is never transposed (dW comes from h^T @ e,
  transposing only the small h).

On XLA's CPU backend, YNNPACK runs a bf16 x bf16 -> fp32 dot only in the row-major forms
A @ B and A @ B^T; a transpose XLA folds into a dot as A^T @ B (every weight gradient) makes it
convert both operands to fp32 and take a slower path. With `copy_transposes` the backward
rules transpose the small operand into a row-major copy XLA cannot fold (`transpose_copy`);
`ModelConfig.dot_transposes` picks it ("auto": on a CPU backend only). tests/test_fast_path.py
reads the compiled HLO to check that every dot of these rules stays in the fast forms.
"""

from __future__ import annotations

import functools
import itertools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

_NT = (((1,), (1,)), ((), ()))  # contract the last dims of both: A @ B^T


def row_major(x: jax.Array, copy: bool = True) -> jax.Array:
    """x, pinned (with `copy`) to a row-major layout of its logical shape: an optimization barrier
    on the flattened array. A barrier on x itself would not do: layout assignment can still make a
    transpose feeding it a free column-major view, which a dot then reads as transposed."""
    return lax.optimization_barrier(x.reshape(-1)).reshape(x.shape) if copy else x


def transpose_copy(x: jax.Array, copy: bool = True) -> jax.Array:
    """x with its last two axes swapped, for use as a dot operand. With `copy`, a row-major copy
    that XLA cannot fold into the dot as a transposed operand; x is pinned first too, as a dot's
    result would otherwise be computed transposed (a form XLA CPU cannot run in bf16)."""
    return row_major(jnp.swapaxes(row_major(x, copy), -1, -2), copy)


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
    result. The one-hot part of (softmax - onehot) is, in the CPU form (`copy_transposes`), a
    gather / scatter-add of N rows; elsewhere it is folded into the saved matrix in the forward's
    exp fusion, which a sharded program partitions without moving the embedding."""
    return _output_ce(h, w, targets, tied, copy_transposes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _output_ce(h, w, targets, tied, copy):
    return _output_ce_fwd(h, w, targets, tied, copy)[0]


def _output_ce_fwd(h, w, targets, tied, copy):
    logits = _logits(h, w, tied)
    m = jnp.max(logits, axis=-1)
    if copy:
        # The CPU form (it goes with the row-major copies): exp(logits - max) straight to the
        # compute dtype and z summed from exactly those values, one pass writing [N, V] in bf16
        # instead of an fp32 exp, a convert and a sum (docs/performance.md). On TPU the same form
        # made XLA keep 3 GiB more per chip (AFM-on-device, 1024 v5p), so it is not used there.
        e = jnp.exp(logits - m[:, None]).astype(h.dtype)
        z = jnp.sum(e.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return m + jnp.log(z) - picked, (h, w, targets, e, z)
    # The sharded form (TPU, GPU, meshes that shard weights two ways): the one-hot part is
    # folded into the saved [N, V] matrix, g = e - z onehot = z (softmax - onehot), in the same
    # fusion as the exp. No gather of embedding rows by target and no scatter-add into dW: with
    # the batch sharded over fsdp and the embedding's width too, the SPMD partitioner could lay
    # neither out and replicated them (an "involuntary full rematerialization").
    e32 = jnp.exp(logits - m[:, None])
    z = jnp.sum(e32, axis=-1)
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype)[None, :] == targets[:, None]
    picked = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    g = (e32 - jnp.where(onehot, z[:, None], 0.0)).astype(h.dtype)
    return m + jnp.log(z) - picked, (h, w, targets, g, z)


def _output_ce_bwd(tied, copy, res, dloss):
    h, w, targets, e, z = res
    f32 = jnp.float32
    # d loss_i / d logits_i = (e_i / z_i - onehot(target_i)) * dloss_i
    r = dloss / z
    h32 = h.astype(f32)
    hs = (h32 * r[:, None]).astype(h.dtype)  # the row scaling of e, moved onto h for dW
    if not copy:  # e holds e - z onehot already (the sharded form above): two GEMMs, nothing else
        if tied:  # w [V, D]
            dh = jnp.dot(e, w, preferred_element_type=f32) * r[:, None]
            dw = _mm(hs.T, e).T
        else:  # w [D, V]
            dh = lax.dot_general(e, w, _NT, preferred_element_type=f32) * r[:, None]
            dw = _mm(hs.T, e)
        return dh.astype(h.dtype), dw.astype(w.dtype), None
    picked_h = -(h32 * dloss[:, None])  # the one-hot rows of dW
    if tied:  # w [V, D]
        dh = jnp.dot(e, w, preferred_element_type=f32) * r[:, None] - dloss[:, None] * w[targets].astype(f32)
        dw = transpose_copy(_mm(transpose_copy(hs, copy), e), copy)  # ([D, N] @ [N, V])^T
        dw = dw.at[targets].add(picked_h)  # rows: a scatter into columns of [D, V] is slow on CPU
    else:  # w [D, V]
        dh = (lax.dot_general(e, w, _NT, preferred_element_type=f32) * r[:, None]
              - dloss[:, None] * w[:, targets].T.astype(f32))
        dw = _mm(transpose_copy(hs, copy), e)  # [D, V]
        dw = dw.at[:, targets].add(picked_h.T)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_output_ce.defvjp(_output_ce_fwd, _output_ce_bwd)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _joined_backward(x: jax.Array, w: jax.Array, grads: list, copy: bool) -> tuple[jax.Array, list]:
    """dx and each column block's dw (fp32) of x [N, D] @ w [D, M1 + M2 + ...] run as one GEMM,
    from the blocks' cotangents `grads` [N, Mi] (brought to x's dtype here). Weight gradients are
    x^T @ grad, transposing only the small x.

    The CPU form (`copy`, dot_transposes=copy): each block through GEMMs of its own. On a CPU,
    concatenating the blocks' gradients costs more than the narrower GEMMs save
    (docs/performance.md); elsewhere (XLA's TPU program) they are joined into one wide GEMM."""
    xt = transpose_copy(x, copy)
    bounds = list(itertools.accumulate((g.shape[1] for g in grads), initial=0))
    if copy:
        gs = [g.astype(x.dtype) for g in grads]
        dx = functools.reduce(operator.add, (lax.dot_general(g, w[:, a:b], _NT, preferred_element_type=jnp.float32)
                                             for g, (a, b) in zip(gs, itertools.pairwise(bounds))))
        return dx, [_mm(xt, g) for g in gs]
    dy = jnp.concatenate(grads, axis=1).astype(x.dtype)  # [N, M1 + M2 + ...]
    dx = lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)
    dw = _mm(xt, dy)  # one [D, N] @ [N, M] for every block
    return dx, [dw[:, a:b] for a, b in itertools.pairwise(bounds)]


def swiglu_mlp(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
               copy_transposes: bool = False) -> jax.Array:
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down for h [N, D], operands in h's dtype with fp32
    accumulation.

    The result is in h's dtype, or in fp32 in the CPU form (`copy_transposes`), where the
    residual add then takes it without a rounding pass (+2-3% for nano bf16, docs/performance.md).
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
    w_gu = jnp.concatenate([w_gate, w_up], axis=1)  # [D, 2F]
    gu32 = _mm(h, w_gu)
    gu = checkpoint_name(gu32.astype(cdt), "mlp_gate_up")  # [N, 2F]
    # The CPU form takes the product from the fp32 GEMM output rather than from its bf16 copy:
    # +3-4% for nano bf16 (docs/performance.md). The backward still reads the bf16 copy, so its
    # derivative is taken at the rounded gate and up values, as any bf16 residual would give.
    src = gu32 if copy else gu
    g32, u32 = src[:, :f].astype(jnp.float32), src[:, f:].astype(jnp.float32)
    a = (g32 * jax.nn.sigmoid(g32) * u32).astype(cdt)
    y = _mm(a, w_down)
    if not copy:  # the CPU form returns the fp32 result: no rounding pass before the residual add
        y = y.astype(cdt)
    return y, (h, w_gu, w_down, gu, a)


def _mlp_bwd(copy, res, dy):
    h, w_gu, w_down, gu, a = res
    cdt = h.dtype
    dy = dy.astype(cdt)
    f = w_gu.shape[1] // 2
    # Weight gradients are (small^T) @ (big in its natural layout): the [N, F] activations and
    # gradients are never transposed, only h, dy and the small [D, F] results.
    d_down = transpose_copy(_mm(transpose_copy(dy, copy), a), copy)  # ([D, N] @ [N, F])^T = [F, D]
    da = lax.dot_general(dy, w_down, _NT, preferred_element_type=jnp.float32)  # [N, F]
    g32, u32 = gu[:, :f].astype(jnp.float32), gu[:, f:].astype(jnp.float32)
    s32 = jax.nn.sigmoid(g32)
    du = da * g32 * s32
    dg = da * u32 * s32 * (1.0 + g32 * (1.0 - s32))
    dh, (d_g, d_u) = _joined_backward(h, w_gu, [dg, du], copy)
    return dh.astype(cdt), d_g.astype(w_gu.dtype), d_u.astype(w_gu.dtype), d_down.astype(w_down.dtype)


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
    return (y[:, :mq], y[:, mq : mq + mk], y[:, mq + mk :]), (x, w)


def _qkv_bwd(copy, res, grads):
    x, w = res
    dx, dws = _joined_backward(x, w, [g.astype(x.dtype) for g in grads], copy)
    return (dx.astype(x.dtype), *(d.astype(w.dtype) for d in dws))


_qkv.defvjp(_qkv_fwd, _qkv_bwd)


def linear(x: jax.Array, w: jax.Array, *, copy_transposes: bool = False) -> jax.Array:
    """x [N, K] @ w [K, M], fp32 result. With `copy_transposes` (the CPU path) a hand-written
    backward whose weight gradient reads a row-major copy of x^T; without, plain autodiff: a dot
    XLA is free to lay out as it likes, as on TPU."""
    if not copy_transposes:
        return _mm(x, w)
    return _linear(x, w, copy_transposes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x, w, copy):
    return _mm(x, w)


def _linear_fwd(x, w, copy):
    return _mm(x, w), (x, w)


def _linear_bwd(copy, res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    dx = lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)  # dy @ w^T, row-major
    dw = _mm(transpose_copy(x, copy), dy)  # [K, N] @ [N, M]
    return dx.astype(x.dtype), dw.astype(w.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _bnt(a, b):
    """[B, M, K] @ [B, N, K]^T -> [B, M, N], fp32 out."""
    return lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _bnn(a, b):
    """[B, M, K] @ [B, K, N] -> [B, M, N], fp32 out."""
    return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def causal_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, copy_transposes: bool = False,
                         blocks: int | None = None) -> jax.Array:
    """Causal grouped-query attention over positions 0..n-1, q [B, S, H, D], k and v
    [B, S, KV, D], returning [B, S, H, D] in q's dtype.

    Batched GEMMs over (batch, kv head) with the query group folded into the rows. The queries are
    cut into `blocks` blocks of positions (default: S // 128, at most 4, when S divides): block j
    attends only to keys [0, (j + 1) S / blocks), which skips (blocks - 1) / (2 blocks) of the
    masked-out score work. The softmax scale is applied to q; the backward keeps the
    probabilities from the forward, and computes dK and dV as (Q^T dS)^T and (dO^T P)^T, so only
    [rows, head_dim] operands are transposed."""
    s = q.shape[1]
    if blocks is None:
        blocks = next((n for n in (4, 3, 2) if s % n == 0 and s // n >= 128), 1)
    if s % blocks:
        raise ValueError(f"attention blocks: {blocks} does not divide sequence length {s}")
    return _attention(q, k, v, copy_transposes, blocks)


def _fold_q(x, nb, copy, kvh):
    """[B, S, H, D] -> per query block j, [B*KV, G*bs, D] (rows: group-major, then position)."""
    b, s, h, d = x.shape
    g, bs = h // kvh, s // nb
    x = x.reshape(b, nb, bs, kvh, g, d).transpose(1, 0, 3, 4, 2, 5).reshape(nb, b * kvh, g * bs, d)
    return [row_major(x[j], copy) for j in range(nb)]


def _unfold_q(blocks, b, s, kvh, g, d):
    """Inverse of `_fold_q`: blocks of [B*KV, G*bs, D] -> [B, S, H, D]."""
    nb = len(blocks)
    bs = s // nb
    x = jnp.stack(blocks).reshape(nb, b, kvh, g, bs, d).transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(b, s, kvh * g, d)


def _fold_kv(x, copy):
    b, s, kvh, d = x.shape
    return row_major(x.transpose(0, 2, 1, 3).reshape(b * kvh, s, d), copy)


def _causal_mask(j, g, bs):
    """[G*bs, (j+1)*bs]: row r (position j*bs + r % bs) may see keys at or before it."""
    pos = j * bs + jnp.arange(g * bs) % bs
    return jnp.arange((j + 1) * bs)[None, :] <= pos[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, copy, nb):
    return _attn_fwd(q, k, v, copy, nb)[0]


def _attn_fwd(q, k, v, copy, nb):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g, bs = h // kvh, s // nb
    cdt = q.dtype
    qb = _fold_q((q.astype(jnp.float32) * d**-0.5).astype(cdt), nb, copy, kvh)  # nb x [B*KV, G*bs, D]
    kt = _fold_kv(k, copy)  # [B*KV, T, D]
    vt = _fold_kv(v, copy)
    ps, outs = [], []
    for j in range(nb):
        t = (j + 1) * bs
        scores = jnp.where(_causal_mask(j, g, bs), _bnt(qb[j], kt[:, :t]), -jnp.inf)  # [B*KV, G*bs, t]
        e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(cdt)
        ps.append(p)
        outs.append(_bnn(p, vt[:, :t]).astype(cdt))  # [B*KV, G*bs, D]
    y = _unfold_q(outs, b, s, kvh, g, d)
    return y, (qb, kt, vt, ps)


def _attn_bwd(copy, nb, res, dy):
    qb, kt, vt, ps = res
    bk, s, d = kt.shape
    cdt = kt.dtype
    b, h = dy.shape[0], dy.shape[2]
    kvh = bk // b
    g, bs = h // kvh, s // nb
    dob = _fold_q(dy.astype(cdt), nb, copy, kvh)

    dk = jnp.zeros((bk, s, d), jnp.float32)
    dv = jnp.zeros((bk, s, d), jnp.float32)
    dqs = []
    for j in range(nb):
        t = (j + 1) * bs
        p, do, qj = ps[j], dob[j], qb[j]
        # dV = P^T dO and dK = dS^T Q, computed as (dO^T P)^T and (Q^T dS)^T: [B*KV, t, D]
        dv = dv.at[:, :t].add(transpose_copy(_bnn(transpose_copy(do, copy), p), copy))
        dp = _bnt(do, vt[:, :t])  # [B*KV, G*bs, t]
        p32 = p.astype(jnp.float32)
        ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))).astype(cdt)
        dk = dk.at[:, :t].add(transpose_copy(_bnn(transpose_copy(qj, copy), ds), copy))
        dqs.append(_bnn(ds, kt[:, :t]) * d**-0.5)  # [B*KV, G*bs, D]
    dq = _unfold_q(dqs, b, s, kvh, g, d)
    dk = dk.reshape(b, kvh, s, d).transpose(0, 2, 1, 3)
    dv = dv.reshape(b, kvh, s, d).transpose(0, 2, 1, 3)
    return dq.astype(cdt), dk.astype(cdt), dv.astype(cdt)


_attention.defvjp(_attn_fwd, _attn_bwd)
