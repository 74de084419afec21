"""A plain numpy (float64) AFM-style decoder: the oracle the JAX model is checked against.

Written from the definitions, independently of crosstrain/model: RMSNorm; per-head RMSNorm on q
and k before rotate-half RoPE; grouped-query causal attention; SwiGLU; tied output embedding.
"""

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, base):
    """x [len, heads, dim]: dimension i pairs with i + dim/2 (rotate-half)."""
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v):
    """q [s, h, d]; k, v [s, kv, d]; causal GQA (query head i uses KV head i // (h // kv))."""
    s, h, d = q.shape
    group = h // k.shape[1]
    out = np.zeros_like(q)
    mask = np.tril(np.ones((s, s), dtype=bool))
    for head in range(h):
        kh, vh = k[:, head // group], v[:, head // group]
        scores = q[:, head] @ kh.T / np.sqrt(d)
        scores = np.where(mask, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, head] = p @ vh
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(params, tokens, cfg):
    """Logits [batch, len, vocab] for int tokens [batch, len]."""
    p = {k: v for k, v in params.items()}
    lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    embed = np.asarray(p["embed"], np.float64)
    outs = []
    for seq in np.asarray(tokens):
        x = embed[seq]
        pos = np.arange(len(seq))
        for i in range(cfg.layers):
            h = rms_norm(x, lay["attn_norm"][i], cfg.norm_eps)
            q = np.einsum("sd,dhk->shk", h, lay["wq"][i])
            k = np.einsum("sd,dhk->shk", h, lay["wk"][i])
            v = np.einsum("sd,dhk->shk", h, lay["wv"][i])
            if cfg.qk_norm:
                q = rms_norm(q, lay["q_norm"][i], cfg.norm_eps)
                k = rms_norm(k, lay["k_norm"][i], cfg.norm_eps)
            q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
            x = x + np.einsum("shk,hkd->sd", attention(q, k, v), lay["wo"][i])
            h = rms_norm(x, lay["mlp_norm"][i], cfg.norm_eps)
            act = silu(h @ lay["w_gate"][i]) * (h @ lay["w_up"][i])
            x = x + act @ lay["w_down"][i]
        x = rms_norm(x, np.asarray(p["final_norm"], np.float64), cfg.norm_eps)
        head = embed.T if cfg.tie_embeddings else np.asarray(p["lm_head"], np.float64)
        outs.append(x @ head)
    return np.stack(outs)
