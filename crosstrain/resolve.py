"""Every `auto` choice of the model config, decided once from the devices of the run's mesh.

Model code never asks which backend it runs on: the entry points (train, bench, eval, generate,
export, `plan --aot`) call `resolve_model` with the devices the mesh will hold (for `plan --aot`,
the TPU topology's devices) and hand the model a config with no `auto` left. The user's config
(and so `RUN_DIR/config.yaml`) keeps what was asked for, so a run stays portable between
machines; `summary.json` records what each choice became under `resolved`.

| choice | auto on TPU | GPU | CPU | elsewhere |
|---|---|---|---|---|
| attention | splash if head_dim % 128 == 0 and seq_len % 128 == 0, else reference | cudnn (bf16/fp16, head_dim % 8 == 0 and <= 128), else reference | fused | reference |
| activation_dtype | compute dtype | compute dtype | float32 | compute dtype |
| dot_transposes | fold | fold | copy (fold when the mesh shards weights over both fsdp and tensor) | fold |
| kernel_mode | compiled | interpret | interpret | interpret |
| compute_dtype | bfloat16 | bfloat16 | the faster GEMMs on this CPU (measured, cached) | bfloat16 |
| remat | the least recomputation whose planned memory fits (none, selective, attention, full) |||  |

Explicit choices are honoured, and refused with a one-line error when they cannot run here
(`attention=splash` with head_dim 64, `attention=cudnn` off a GPU, `kernel_mode=compiled` off a
TPU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from crosstrain.config import ModelConfig
from crosstrain.errors import ConfigError

log = logging.getLogger("crosstrain")

# Policies remat=auto tries, least recomputation first.
REMAT_ORDER = ("none", "selective", "attention", "full")


@dataclass(frozen=True)
class Resolved:
    platform: str
    attention: str
    activation_dtype: str
    dot_transposes: str
    compute_dtype: str
    remat: str
    kernel_mode: str
    why: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "why"}

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


def platform_of(devices: Sequence[Any]) -> str:
    p = devices[0].platform.lower()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def _attention(m: ModelConfig, platform: str) -> tuple[str, str]:
    from crosstrain.model.attention import splash_shape_problem

    want = m.attention
    if want == "splash":
        problem = splash_shape_problem(m.head_dim, m.seq_len)
        if problem:
            raise ConfigError("model.attention", f"splash needs head_dim and seq_len in multiples of 128: {problem}")
        return want, "as configured"
    if want == "cudnn" and platform != "gpu":
        raise ConfigError("model.attention", f"cudnn attention runs on NVIDIA GPUs, not on {platform}")
    if want != "auto":
        return want, "as configured"
    if platform == "tpu":
        problem = splash_shape_problem(m.head_dim, m.seq_len)
        if problem is None:
            return "splash", "TPU: the Splash kernel"
        return "reference", f"TPU, but Splash cannot take this shape ({problem})"
    if platform == "gpu":
        if m.compute_dtype == "bfloat16" and m.head_dim % 8 == 0 and m.head_dim <= 128:
            return "cudnn", "GPU: cuDNN's flash attention"
        return "reference", "GPU, but cuDNN attention needs bf16 and head_dim <= 128 in multiples of 8"
    if platform == "cpu":
        return "fused", "CPU: batched GEMMs in causal query blocks with a hand-written backward"
    return "reference", f"no tuned kernel for {platform}"


def _device_capacity_bytes(devices: Sequence[Any]) -> tuple[Optional[float], Any]:
    """Usable memory per device and the catalog chip (None, None when unknown)."""
    from crosstrain import hardware
    from crosstrain.planner.model import FAMILIES

    dev = devices[0]
    if dev.platform == "cpu":
        # Forced host devices share the machine's memory; no peak measurement is needed here.
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None, None
        return total * FAMILIES["cpu"].usable / len(devices), None
    chip = hardware.detect_chip(dev)
    if chip is None:
        return None, None
    fam = FAMILIES[chip.family]
    return (chip.hbm_gib / chip.devices_per_chip * fam.usable - fam.reserved_gib) * hardware.GIB, chip


def planned_bytes(m: ModelConfig, *, remat: str, flash: bool, tensor: int, fsdp: int, data: int,
                  micro_per_rank: int, chip=None) -> float:
    """The planner's per-device memory for crosstrain's own step (reserve excluded)."""
    from crosstrain.hardware import get_chip
    from crosstrain.planner.model import Layout, estimate

    lay = Layout(tp=tensor, dp=data, fsdp=fsdp, microbatch=max(1, micro_per_rank), remat=remat,
                 sequence_parallel=False)
    est = estimate(m, chip or get_chip("tpu-v5p"), lay, global_batch=max(1, micro_per_rank) * data * fsdp,
                   flash=flash, implementation="crosstrain")
    return sum(v for k, v in est.memory.items() if k != "reserved")


def _remat(m: ModelConfig, devices, attention: str, mesh_sizes: Optional[dict[str, int]],
           micro_per_rank: Optional[int]) -> tuple[str, str]:
    if m.remat != "auto":
        return m.remat, "as configured"
    capacity, chip = _device_capacity_bytes(devices)
    if capacity is None or mesh_sizes is None or micro_per_rank is None:
        return "none", "memory of this device unknown: nothing recomputed"
    data = mesh_sizes.get("slice", 1) * mesh_sizes.get("data", 1)
    for policy in REMAT_ORDER:
        need = planned_bytes(m, remat=policy, flash=attention in ("splash", "cudnn"), tensor=mesh_sizes.get("tensor", 1),
                             fsdp=mesh_sizes.get("fsdp", 1), data=data, micro_per_rank=micro_per_rank, chip=chip)
        if need <= capacity:
            return policy, f"the least recomputation that fits: {need / 2**30:.1f} of {capacity / 2**30:.1f} GiB planned"
    return "full", f"nothing fits the planned {capacity / 2**30:.1f} GiB per device; recomputing the most"


# On a CPU, bf16 is chosen when its measured GEMM rate beats fp32's by this factor; the CPUs
# measured, and how their steps followed their GEMM rates: docs/performance.md, "compute_dtype=auto".
BF16_CPU_ADVANTAGE = 1.15


def cpu_compute_dtype(ceiling: dict[str, float]) -> tuple[str, str]:
    """(dtype, why) for a CPU whose large-matmul TFLOP/s are `ceiling` {"fp32", "bf16"}."""
    ratio = ceiling["bf16"] / ceiling["fp32"]
    dtype = "bfloat16" if ratio >= BF16_CPU_ADVANTAGE else "float32"
    return dtype, (f"this CPU's bf16 GEMMs run at {ratio:.2f}x its fp32 ones "
                   f"({1e3 * ceiling['bf16']:.0f} vs {1e3 * ceiling['fp32']:.0f} GFLOP/s, measured once and cached)")


def _compute_dtype(m: ModelConfig, platform: str) -> tuple[str, str]:
    if m.compute_dtype != "auto":
        return m.compute_dtype, "as configured"
    if platform == "cpu":
        from crosstrain.hardware import cpu_matmul_ceiling

        return cpu_compute_dtype(cpu_matmul_ceiling())
    return "bfloat16", f"{platform}: bf16 matrix units"


def _dot_transposes(m: ModelConfig, platform: str, mesh_sizes: Optional[dict[str, int]]) -> tuple[str, str]:
    if m.dot_transposes != "auto":
        return m.dot_transposes, "as configured"
    if platform != "cpu":
        return "fold", f"{platform}: transposes folded into the GEMMs by the compiler"
    sizes = mesh_sizes or {}
    if sizes.get("fsdp", 1) > 1 and sizes.get("tensor", 1) > 1:
        # The CPU form pins its operands row-major through a flattened copy, which cannot carry a
        # weight sharded two ways: the SPMD partitioner would replicate it (an involuntary full
        # rematerialization). Such meshes on a CPU exist to test sharding, not for speed.
        return "fold", "CPU, but the mesh shards weights over fsdp and tensor: the sharded form"
    return "copy", "CPU: row-major copies keep bf16 GEMMs on XLA CPU's fast path"


def resolve_model(m: ModelConfig, devices: Sequence[Any], *, mesh_sizes: Optional[dict[str, int]] = None,
                  micro_per_rank: Optional[int] = None) -> tuple[ModelConfig, Resolved]:
    """`m` with every `auto` decided for `devices`, and the record of what each became.

    `mesh_sizes` (axis -> size) and `micro_per_rank` (sequences per batch shard per microbatch)
    let remat=auto check the planned memory; without them it keeps everything."""
    platform = platform_of(devices)
    compute, why_compute = _compute_dtype(m, platform)
    m = dataclasses.replace(m, compute_dtype=compute)
    attention, why_attn = _attention(m, platform)
    activation = m.activation_dtype
    if activation == "auto":
        activation = "float32" if platform == "cpu" else m.compute_dtype
    transposes, why_transposes = _dot_transposes(m, platform, mesh_sizes)
    kernel_mode = m.kernel_mode
    if kernel_mode == "auto":
        kernel_mode = "compiled" if platform == "tpu" else "interpret"
    if kernel_mode == "compiled" and attention == "splash" and platform != "tpu":
        raise ConfigError("model.kernel_mode", f"compiled Pallas TPU kernels need TPU devices, not {platform}; "
                                               "use model.kernel_mode=interpret (or auto)")
    remat, why_remat = _remat(m, devices, attention, mesh_sizes, micro_per_rank)
    resolved = Resolved(platform=platform, attention=attention, activation_dtype=activation,
                        dot_transposes=transposes, compute_dtype=m.compute_dtype, remat=remat,
                        kernel_mode=kernel_mode,
                        why=(f"compute_dtype={compute}: {why_compute}", f"attention={attention}: {why_attn}",
                             f"dot_transposes={transposes}: {why_transposes}", f"remat={remat}: {why_remat}"))
    model = dataclasses.replace(m, attention=attention, activation_dtype=activation, dot_transposes=transposes,
                                remat=remat, kernel_mode=kernel_mode)
    return model, resolved
