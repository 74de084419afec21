"""The profiling script's own arithmetic: busy time as a union of intervals, GEMM shapes and
FLOPs read from a compiled program."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_step  # noqa: E402


def test_busy_time_counts_overlapping_kernels_once():
    # microseconds in, milliseconds out: [0, 1.5) ms and [3, 4) ms, nested and touching spans merged
    spans = [(3000, 4000), (0, 1000), (500, 1500), (200, 300), (1500, 1500)]
    assert profile_step.busy_ms(spans) == pytest.approx(2.5)
    assert profile_step.busy_ms([]) == 0.0


@pytest.mark.parametrize("batch", [None, 3])
def test_gemm_shapes_and_flops_come_from_the_compiled_program(batch):
    lead = () if batch is None else (batch,)
    a = jnp.ones(lead + (256, 128), jnp.bfloat16)
    b = jnp.ones(lead + (128, 64), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32) * 2.0)
    found = profile_step.dot_flops(f.lower(a, b).compile().as_text())
    assert list(found.values()) == [(2 * (batch or 1) * 256 * 128 * 64,
                                     ("" if batch is None else f"{batch} x ") + "256x128x64 bf16")]


def test_gemm_outside_a_fusion_is_named_by_its_dot():
    hlo = """HloModule m, entry_computation_layout={(f32[8,4]{1,0}, f32[4,2]{1,0})->f32[8,2]{1,0}}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[8,2] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  ROOT %dot.7 = f32[8,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    assert profile_step.dot_flops(hlo) == {"dot.7": (2 * 8 * 4 * 2, "8x4x2 f32")}
