import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from crosstrain.config import load_config
from crosstrain.flops import flops_per_token, matmul_params, param_count
from crosstrain.model import (
    count_params,
    decoder,
    forward,
    init_cache,
    init_params,
    loss_fn,
    output_logits,
    param_axes,
    params_sha256,
)
from crosstrain.model.transformer import ROPE_CONSTANT_MAX, apply_rope, rms_norm, rope_tables


def fp32(name="tiny", *extra):
    return load_config(name, ["model.compute_dtype=float32", *extra]).model


@pytest.mark.parametrize("preset", ["tiny", "demo", "nano", "afm-on-device-3b", "afm-server-core"])
def test_param_count_matches_formula(preset):
    """The parameter table (model/params.py) against the one closed form (flops.param_count)."""
    cfg = load_config(preset).model
    assert count_params(cfg) == param_count(cfg)


def test_param_count_matches_real_arrays_and_untied_head():
    cfg = fp32("tiny", "model.tie_embeddings=false")
    params = init_params(cfg, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)
    one_layer = sum(x[0].size for x in jax.tree.leaves(params["layers"]))
    assert one_layer == param_count(cfg, part="layer")
    assert "lm_head" in params
    axes = param_axes(cfg)
    for leaf, ax in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert leaf.ndim == len(ax)


def test_afm_on_device_size_is_close_to_the_report():
    cfg = load_config("afm-on-device-3b").model
    non_embedding = count_params(cfg) - cfg.vocab * cfg.hidden
    assert abs(non_embedding - 2.58e9) / 2.58e9 < 0.02
    assert abs(cfg.vocab * cfg.hidden - 0.15e9) / 0.15e9 < 0.02


def test_flops_per_token_by_hand():
    cfg = load_config("nano").model
    d, L = 384, 6
    per_layer = d * 6 * 64 * 2 + d * 2 * 64 * 2 + 3 * d * 1024
    n = L * per_layer + d * 8192
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, attention="full") == 6 * n + 12 * L * 6 * 64 * 256
    assert flops_per_token(cfg, attention="causal") == 6 * n + 6 * L * 6 * 64 * 256
    # crosstrain's MFU counts what a causal model computes: half the score matrix.
    assert flops_per_token(cfg) == flops_per_token(cfg, attention="causal")
    assert flops_per_token(cfg, training=False) == 2 * n + 2 * L * 6 * 64 * 256


def test_rms_norm_and_rope_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    w = rng.normal(size=(8,)).astype(np.float32)
    got = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6))
    np.testing.assert_allclose(got, reference.rms_norm(x.astype(np.float64), w, 1e-6), rtol=1e-5, atol=1e-6)
    pos = np.arange(5) + 3
    cos, sin = rope_tables(jnp.asarray(pos), 8, 10_000.0)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np.stack([reference.rope(x[b].astype(np.float64), pos, 10_000.0) for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_tables_are_constants_when_positions_are_static():
    """Static positions (training, evaluation) give numpy tables, equal to the traced ones, so a
    step's program carries them as constants: no cos or sin is left for XLA to fuse into every
    RoPE fusion and evaluate per element of q and k."""
    pos = np.arange(300) + 7
    cos, sin = rope_tables(pos, 64, 10_000.0)
    assert isinstance(cos, np.ndarray) and cos.dtype == np.float32 and cos.shape == (300, 64)
    tcos, tsin = rope_tables(jnp.asarray(pos), 64, 10_000.0)
    np.testing.assert_allclose(cos, np.asarray(tcos), atol=2e-5)
    np.testing.assert_allclose(sin, np.asarray(tsin), atol=2e-5)
    cfg = fp32("tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, cfg.seq_len + 1), jnp.int32)
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, tokens, cfg)))(params))
    assert " cos " not in grad_jaxpr and " sin " not in grad_jaxpr
    decode = lambda p, c, pos: decoder(p, tokens[:, :1], cfg, start_pos=pos, cache=c)  # noqa: E731
    decode_jaxpr = str(jax.make_jaxpr(decode)(params, init_cache(cfg, 2, 8), jnp.int32(3)))
    assert " cos " in decode_jaxpr  # positions traced while decoding: tables computed in the program
    long = fp32("tiny", f"model.seq_len={ROPE_CONSTANT_MAX // cfg.head_dim + 1}")
    long_jaxpr = str(jax.make_jaxpr(lambda p, t: decoder(p, t, long)[0])(params, jnp.zeros((1, long.seq_len), jnp.int32)))
    assert " cos " in long_jaxpr  # past ROPE_CONSTANT_MAX entries the tables are computed, not constants


def test_rope_is_relative():
    """Scores between rotated q and k depend only on the distance between their positions."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)

    def score(pq, pk):
        cq, sq = rope_tables(jnp.asarray([pq]), 16, 500_000.0)
        ck, sk = rope_tables(jnp.asarray([pk]), 16, 500_000.0)
        return float(jnp.sum(apply_rope(jnp.asarray(q), cq, sq) * apply_rope(jnp.asarray(k), ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


@pytest.mark.parametrize("extra", [(), ("model.tie_embeddings=false",), ("model.qk_norm=false",), ("model.scan_layers=false",)])
def test_forward_matches_numpy_reference(extra):
    cfg = fp32("tiny", *extra)
    params = init_params(cfg, jax.random.key(3))
    # Norm scales of 1 would hide a misplaced scale: perturb them.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.3 + 0.1 if "norm" in jax.tree_util.keystr(path) else x, params
    )
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, size=(2, 12))
    got = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    want = reference.forward(jax.device_get(params), tokens, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_causality():
    cfg = fp32()
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, size=(1, 16))
    base = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    for t in (5, 11, 15):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % cfg.vocab
        out = np.asarray(forward(params, jnp.asarray(changed), cfg))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


@pytest.mark.parametrize("scan", ["true", "false"])
def test_kv_cache_decode_equals_full_forward(scan):
    cfg = fp32("tiny", f"model.scan_layers={scan}")
    params = init_params(cfg, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab, size=(1, 10)))
    full = np.asarray(forward(params, tokens, cfg))
    cache = init_cache(cfg, 1, 16, dtype=jnp.float32)
    hidden, cache = decoder(params, tokens[:, :4], cfg, start_pos=0, cache=cache)
    steps = [np.asarray(output_logits(params, hidden, cfg))[0]]
    for pos in range(4, 10):
        hidden, cache = decoder(params, tokens[:, pos : pos + 1], cfg, start_pos=jnp.int32(pos), cache=cache)
        steps.append(np.asarray(output_logits(params, hidden, cfg))[0])
    np.testing.assert_allclose(np.concatenate(steps), full[0], rtol=1e-4, atol=1e-4)


def test_bf16_compute_stays_close_to_fp32():
    cfg32 = fp32()
    cfg16 = load_config("tiny", ["model.compute_dtype=bfloat16"]).model
    params = init_params(cfg32, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg32.vocab, size=(2, 16)))
    a = np.asarray(forward(params, tokens, cfg32))
    b = np.asarray(forward(params, tokens, cfg16))
    assert np.max(np.abs(a - b)) < 0.1 * np.max(np.abs(a))


def test_params_sha256_is_stable_and_sensitive():
    cfg = fp32()
    p = init_params(cfg, jax.random.key(0))
    assert params_sha256(p) == params_sha256(init_params(cfg, jax.random.key(0)))
    bumped = dict(p, final_norm=p["final_norm"].at[0].add(1e-3))
    assert params_sha256(bumped) != params_sha256(p)


def test_mlp_result_dtype_per_form():
    """The CPU form hands the residual add its fp32 result (no rounding pass); elsewhere the result
    is in the operands' dtype, as XLA's TPU program has it."""
    from crosstrain.model.fused import swiglu_mlp

    rng = np.random.default_rng(0)
    h, wg, wu = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.bfloat16) for s in ((8, 16), (16, 24), (16, 24)))
    wd = jnp.asarray(rng.normal(size=(24, 16)) * 0.3, jnp.bfloat16)
    cpu = swiglu_mlp(h, wg, wu, wd, copy_transposes=True)
    other = swiglu_mlp(h, wg, wu, wd, copy_transposes=False)
    assert cpu.dtype == jnp.float32 and other.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(cpu), np.asarray(other.astype(jnp.float32)), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("copy", [False, True])
def test_hand_written_gradients_equal_autodiff(copy):
    """Both ways of feeding transposed operands to the backward GEMMs (ModelConfig.dot_transposes)."""
    from crosstrain.model.fused import linear, output_cross_entropy, qkv_projection, swiglu_mlp

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(12, 16)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(16, 24)) * 0.3, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(24, 16)) * 0.3, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(12, 16)), jnp.float32)

    def plain_mlp(h, wg, wu, wd):
        return (jax.nn.silu(h @ wg) * (h @ wu)) @ wd

    ours = jax.vjp(lambda *a: swiglu_mlp(*a, copy_transposes=copy), h, wg, wu, wd)
    want = jax.vjp(plain_mlp, h, wg, wu, wd)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](dy), want[1](dy)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    wq, wk, wv = (jnp.asarray(rng.normal(size=(16, m)) * 0.3, jnp.float32) for m in (8, 4, 4))
    dq, dk, dv = (jnp.asarray(rng.normal(size=(12, m)), jnp.float32) for m in (8, 4, 4))
    ours = jax.vjp(lambda *a: qkv_projection(*a, copy_transposes=copy), h, wq, wk, wv)
    want = jax.vjp(lambda h, wq, wk, wv: (h @ wq, h @ wk, h @ wv), h, wq, wk, wv)
    for a, b in zip(ours[0], want[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1]((dq, dk, dv)), want[1]((dq, dk, dv))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    wo = jnp.asarray(rng.normal(size=(16, 10)) * 0.3, jnp.float32)
    do = jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)
    ours = jax.vjp(lambda h, wo: linear(h, wo, copy_transposes=copy), h, wo)
    want = jax.vjp(lambda h, wo: h @ wo, h, wo)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](do), want[1](do)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    targets = jnp.asarray(rng.integers(0, 30, size=12), jnp.int32)
    for tied, w in ((True, jnp.asarray(rng.normal(size=(30, 16)), jnp.float32)),
                    (False, jnp.asarray(rng.normal(size=(16, 30)), jnp.float32))):
        def plain(h, w):
            logits = h @ (w.T if tied else w)
            return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]

        def fused(h, w):
            return output_cross_entropy(h, w, targets, tied=tied, copy_transposes=copy)

        weights = jnp.asarray(rng.normal(size=12), jnp.float32)
        np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-5, atol=1e-5)
        g1 = jax.grad(lambda h, w: jnp.sum(fused(h, w) * weights), argnums=(0, 1))(h, w)
        g2 = jax.grad(lambda h, w: jnp.sum(plain(h, w) * weights), argnums=(0, 1))(h, w)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,copy,blocks", [(jnp.float32, False, 1), (jnp.float32, True, 2), (jnp.bfloat16, True, 1),
                                               (jnp.bfloat16, False, 2)])
def test_fused_attention_matches_reference_and_its_gradients(dtype, copy, blocks):
    from crosstrain.model.attention import reference_attention
    from crosstrain.model.fused import causal_gqa_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 10, 6, 8)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, 10, 2, 8)), dtype) for _ in range(2))
    pos = jnp.arange(10)
    dy = jnp.asarray(rng.normal(size=q.shape), dtype)
    ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, q_pos=pos, kv_pos=pos), q, k, v)
    ours = jax.vjp(lambda q, k, v: causal_gqa_attention(q, k, v, copy_transposes=copy, blocks=blocks), q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(ours[0], np.float32), np.asarray(ref[0], np.float32), rtol=tol, atol=tol)
    for a, b in zip(ours[1](dy), ref[1](dy)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
