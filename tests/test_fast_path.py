"""The bf16 fast path of crosstrain/model/fused.py, read from the compiled HLO.

fused.py relies on this: XLA's CPU backend runs a bf16 x bf16 -> fp32 dot on its fast kernels
only in the row-major forms A @ B and A @ B^T. A transpose it folds into a dot (A^T @ B, the form
of every weight gradient) makes it convert both operands to fp32 and take a slower path. With
`copy_transposes` the hand-written backward rules feed every dot a row-major copy that XLA cannot
fold. These tests compile the rules (forward and backward, bf16) on the CPU and check each dot of
the optimized HLO: bf16 operands, row-major layouts, the left operand contracting its last axis.
A change of XLA that folds the copies away again, or of fused.py that loses one, fails here."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from crosstrain.config import load_config
from crosstrain.model import init_params
from crosstrain.model.fused import causal_gqa_attention, linear, output_cross_entropy, qkv_projection, swiglu_mlp
from crosstrain.train.step import init_state, make_train_step

# `%name = bf16[64,128]{1,0} op(...)`: the result of one HLO instruction.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?\s+([\w\-]+)\((.*)$")


def _ints(text):
    return tuple(int(x) for x in (text or "").split(",") if x)


def compiled_dots(text):
    """[(name, [(dtype, shape, layout) of each operand], {lhs/rhs_*_dims})] of every dot in an
    optimized HLO module (inside fusions too: operands are looked up in their own computation)."""
    out = []
    for computation in re.split(r"\n(?=\S)", text):
        lines = computation.splitlines()
        defs = {}
        for line in lines:
            m = _INSTR.match(line)
            if m:
                defs[m.group(1)] = (m.group(2), _ints(m.group(3)), _ints(m.group(4)))
        for line in lines:
            m = _INSTR.match(line)
            if not m or m.group(5) != "dot":
                continue
            args = m.group(6).split("),")[0]
            operands = [defs.get(name) for name in re.findall(r"%([\w.\-]+)", args)]
            assert len(operands) == 2 and None not in operands, f"cannot read the operands of: {line.strip()}"
            dims = {k: _ints(v) for k, v in re.findall(r"(\w+_dims)=\{([\d,]*)\}", m.group(6))}
            out.append((m.group(1), operands, dims))
    return out


def row_major(layout, rank):
    return layout == tuple(range(rank - 1, -1, -1))


def slow_forms(dots):
    """The dots not in a form the bf16 fast kernels run, each with why."""
    bad = []
    for name, ((lt, ls, ll), (rt, rs, rl)), dims in dots:
        why = []
        if (lt, rt) != ("bf16", "bf16"):
            why.append(f"operands {lt} x {rt}")
        if not (row_major(ll, len(ls)) and row_major(rl, len(rs))):
            why.append(f"layouts {ll} x {rl}")
        if dims.get("lhs_contracting_dims") != (len(ls) - 1,):
            why.append(f"left operand contracts axis {dims.get('lhs_contracting_dims')} of {len(ls)} (A^T @ B)")
        if dims.get("rhs_contracting_dims") not in ((len(rs) - 2,), (len(rs) - 1,)):
            why.append(f"right operand contracts axis {dims.get('rhs_contracting_dims')}")
        if why:
            bad.append(f"{name}: {', '.join(why)}")
    return bad


def _rules(copy: bool):
    """Forward + backward of each hand-written rule in bf16, as functions of bf16 inputs."""
    rng = np.random.default_rng(0)

    def bf(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.1, jnp.bfloat16)

    n, d, f, v = 64, 128, 256, 512
    targets = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)

    def grad_of(fn, *args):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))), args

    return {
        "swiglu_mlp": grad_of(lambda h, g, u, w: swiglu_mlp(h, g, u, w, copy_transposes=copy),
                              bf(n, d), bf(d, f), bf(d, f), bf(f, d)),
        "qkv_projection": grad_of(lambda h, q, k, w: sum(jnp.sum(x) for x in qkv_projection(h, q, k, w, copy_transposes=copy)),
                                  bf(n, d), bf(d, d), bf(d, d // 4), bf(d, d // 4)),
        "linear": grad_of(lambda h, w: linear(h, w, copy_transposes=copy), bf(n, d), bf(d, d)),
        "output_cross_entropy tied": grad_of(
            lambda h, w: output_cross_entropy(h, w, targets, tied=True, copy_transposes=copy), bf(n, d), bf(v, d)),
        "output_cross_entropy lm_head": grad_of(
            lambda h, w: output_cross_entropy(h, w, targets, tied=False, copy_transposes=copy), bf(n, d), bf(d, v)),
        "causal_gqa_attention": grad_of(lambda q, k, w: causal_gqa_attention(q, k, w, copy_transposes=copy, blocks=2),
                                        bf(2, 64, 4, 32), bf(2, 64, 2, 32), bf(2, 64, 2, 32)),
    }


def test_every_dot_of_the_hand_written_rules_is_on_the_bf16_fast_path():
    for name, (fn, args) in _rules(copy=True).items():
        dots = compiled_dots(fn.lower(*args).compile().as_text())
        assert len(dots) >= 2, f"{name}: expected its backward dots at least, found {len(dots)}"
        assert slow_forms(dots) == [], f"{name}: dots off the bf16 fast path: {slow_forms(dots)}"


def test_without_the_copies_xla_folds_transposes_into_slow_dots():
    """What the copies are there for, so the check above is known to be able to fail."""
    folded = {name: slow_forms(compiled_dots(fn.lower(*args).compile().as_text()))
              for name, (fn, args) in _rules(copy=False).items()}
    assert folded["swiglu_mlp"] and folded["output_cross_entropy tied"], folded
    assert any("A^T @ B" in why for whys in folded.values() for why in whys)


def _step_dots(transposes: str):
    cfg = load_config("tiny", ["model.compute_dtype=bfloat16", f"model.dot_transposes={transposes}",
                               "model.attention=fused", "model.activation_dtype=float32", "model.remat=none"])
    state = init_state(init_params(cfg.model, jax.random.key(0)))
    batch = jnp.zeros((cfg.train.batch, cfg.model.seq_len + 1), jnp.int32)
    return cfg, compiled_dots(jax.jit(make_train_step(cfg)).lower(state, batch, jnp.int32(0)).compile().as_text())


def test_the_compiled_bf16_train_step_has_no_transposed_dot():
    """The whole tiny step as the trainer compiles it on a CPU (dot_transposes "auto" is "copy"
    there): every dot is on the fast path (every weight matmul of a layer, the attention output
    projection included, has a hand-written backward). With the transposes folded, the same
    check finds A^T @ B dots."""
    cfg, dots = _step_dots("copy")
    assert len(dots) >= 10 * cfg.model.layers
    assert slow_forms(dots) == []
    _, folded = _step_dots("fold")
    assert any("A^T" in why for why in slow_forms(folded))
