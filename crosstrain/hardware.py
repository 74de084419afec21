"""The accelerator catalog: one table of chips, used by the trainer's MFU and by the planner.

Figures are per chip, dense (no structured sparsity), as their vendors publish them; the source of
each is given beside the entry. A JAX "device" is not always a chip: a TPU v4/v5p chip is one
device (megacore), a Trainium1 chip is two NeuronCores, a Trainium2 chip four logical
NeuronCores under the default LNC=2 configuration; `devices_per_chip` converts.

The `cpu` entry has no published peak: its peak is this machine's measured large-matmul rate
(`cpu_matmul_ceiling`), measured once per machine and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from crosstrain.errors import UserError
from crosstrain.files import atomic_write
from crosstrain.paths import cache_dir

GIB = 1024**3


@dataclass(frozen=True)
class Chip:
    name: str
    description: str
    # Regexes matched against JAX's `device.device_kind`.
    patterns: tuple[str, ...]
    # Dense peak FLOP/s per chip by compute dtype, in TFLOP/s.
    peak_tflops: dict[str, float]
    hbm_gib: float
    hbm_gbps: float  # HBM bandwidth, GB/s
    devices_per_chip: int = 1
    # Fast domain (ICI / NeuronLink / NVLink): per-chip collective bandwidth, GB/s in each
    # direction, and how many chips it joins.
    link_gbps: float = 0.0
    link_domain: int = 1
    # Scale-out network (DCN / EFA / InfiniBand) per chip, GB/s in each direction.
    scaleout_gbps: float = 0.0
    power_w: float = 0.0  # per chip, for energy estimates
    price_per_hour: float = 0.0  # per chip, USD, on-demand list price (override with --price)
    family: str = "gpu"  # tpu | gpu | trainium | cpu: selects the planner's efficiency constants
    mxu: int = 0  # systolic array dimension where it differs from the family's (TPU v6e: 256)
    # Fraction of the dense bf16 peak that the best large matmul reaches on this chip, measured
    # (a maximum-achievable-matmul benchmark, cited in sources["matmul"]); 0: the planner's family
    # value.
    matmul_eff: float = 0.0
    # Flash-attention kernels benchmarked on this chip, best first: (kernel, the fraction of the
    # dense bf16 peak at which it runs causal attention's forward and backward, counted as the
    # planner counts them), cited in sources["attention"]. Empty: the planner's family value.
    attention: tuple[tuple[str, float], ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def attention_eff(self, kernel: Optional[str] = None) -> Optional[float]:
        """The benchmarked efficiency of `kernel` on this chip; the chip's best benchmarked kernel
        where `kernel` is None or has no benchmark here (on A100, cuDNN's and Transformer Engine's
        fused attention are FlashAttention-2's generation: FlashAttention-3's techniques need
        Hopper); None where the chip has none."""
        table = dict(self.attention)
        if kernel in table:
            return table[kernel]
        return self.attention[0][1] if self.attention else None

    def peak_flops(self, dtype: str) -> Optional[float]:
        """Dense peak FLOP/s per chip for a compute dtype ("bfloat16" or "float32")."""
        key = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
        tflops = self.peak_tflops.get(key)
        return None if tflops is None else tflops * 1e12


# Maximum achievable matmul FLOPS (BF16, no sparsity) measured by scanning large GEMM shapes,
# as a fraction of the datasheet peak.
_MAMF = {"a100": ("A100 SXM", 267.9, 312.0), "h100": ("H100 SXM", 792.1, 989.0), "b200": ("B200 SXM", 1745.0, 2250.0)}


def _mamf(gpu: str) -> float:
    return _MAMF[gpu][1] / _MAMF[gpu][2]


def _mamf_source(gpu: str, note: str = "") -> str:
    name, measured, peak = _MAMF[gpu]
    return (f"stas00/ml-engineering compute/accelerator/README.md, 'Maximum Achievable Matmul FLOPS comparison "
            f"table' (mamf-finder.py): {name} {measured} of {peak:.0f} TFLOPS ({100 * measured / peak:.1f}%){note}")

# The GPU flash-attention kernels the planner tells apart (`attention_kernel`).
ATTENTION_KERNELS = ("cudnn", "flash2")

# Flash-attention kernels' forward and backward rates (TFLOP/s, bf16, head dim 128, causal
# forward), as their authors measured them. The benchmarks count the backward as 2.5 forwards (it
# recomputes the scores); the planner counts 2 (model.py: the kernel's own recomputation is part
# of its rate), so a kernel's efficiency is 3 forward-FLOPs over the time of a forward and a
# backward: 3 / (peak / fwd + 2.5 * peak / bwd).
_ATTENTION = {
    "a100": (312.0, {"flash2": (0.73 * 312.0, 0.63 * 312.0)},
             "FlashAttention-2 (Dao 2023, arXiv 2307.08691) on A100 80GB: up to 73% of peak in the forward "
             "and 63% in the backward; on A100 the other fused kernels (cuDNN's, Transformer Engine's) are of "
             "its generation"),
    "h100": (989.0, {"cudnn": ((518 + 529) / 2, (499 + 518) / 2), "flash2": ((319 + 333) / 2, (310 + 318) / 2)},
             "FlashAttention-3 paper (Shah et al. 2024, arXiv 2407.08608), H100 SXM5, head dim 128, at 4k and "
             "8k tokens: cuDNN forward (causal) 518 / 529 and backward 499 / 518 TFLOP/s (FlashAttention-3 "
             "beside it: 579 / 602 and 542 / 559); FlashAttention-2 319 / 333 and 310 / 318 ('only 35% "
             "utilization on the H100'). cudnn stands for Hopper's fused kernels (cuDNN, Transformer Engine, "
             "FlashAttention-3); flash2 for FlashAttention-2 (flash-attn 2.x, PyTorch SDPA's flash backend)"),
}


def _attention(gpu: str) -> tuple[tuple[str, float], ...]:
    peak, kernels, _ = _ATTENTION[gpu]
    return tuple((k, 3.0 / (peak / fwd + 2.5 * peak / bwd)) for k, (fwd, bwd) in kernels.items())


def _attention_source(gpu: str, note: str = "") -> str:
    rates = ", ".join(f"{k} {100 * e:.1f}%" for k, e in _attention(gpu))
    return f"{_ATTENTION[gpu][2]}{note}; as the planner counts attention FLOPs: {rates} of peak"


_TPU_PRICES = "cloud.google.com/tpu/pricing, on-demand per chip-hour (2025 list prices; they change, override with --price)"

CATALOG: dict[str, Chip] = {
    c.name: c
    for c in [
        Chip(
            "tpu-v4", "Google Cloud TPU v4", (r"^TPU v4",), {"bf16": 275.0},
            hbm_gib=32, hbm_gbps=1200, link_gbps=270, link_domain=4096, scaleout_gbps=3.1,
            power_w=170, price_per_hour=3.22, family="tpu",
            sources={
                "compute": "cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16, 32 GiB HBM2 at 1200 GBps",
                "links": "same page: all-reduce bandwidth 1.1 PB/s per 4096-chip pod = 270 GB/s per chip; "
                         "DCN: estimate, 100 Gbps NIC per 4-chip host",
                "power": "same page: measured mean 170 W (min/mean/max 90/170/192 W)",
                "price": _TPU_PRICES + ": $3.22",
            },
        ),
        Chip(
            "tpu-v5e", "Google Cloud TPU v5e", (r"^TPU v5 ?lite", r"^TPU v5e"), {"bf16": 197.0},
            hbm_gib=16e9 / GIB, hbm_gbps=819, link_gbps=200, link_domain=256, scaleout_gbps=3.1,
            power_w=200, price_per_hour=1.20, family="tpu",
            sources={
                "compute": "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16, 16 GB HBM2 at 819 GBps",
                "links": "same page: 400 GBps bidirectional ICI per chip (all-reduce 51.2 TB/s per 256 chips); "
                         "DCN 2 x 100 Gbps NIC per 8-chip host",
                "power": "not published by Google: estimate",
                "price": _TPU_PRICES + ": $1.20",
            },
        ),
        Chip(
            "tpu-v5p", "Google Cloud TPU v5p", (r"^TPU v5p?$", r"^TPU v5p"), {"bf16": 459.0, "int8": 918.0},
            hbm_gib=95, hbm_gbps=2765, link_gbps=600, link_domain=8960, scaleout_gbps=6.25,
            power_w=400, price_per_hour=4.20, family="tpu",
            sources={
                "compute": "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16, 95 GiB HBM2e at 2765 GBps; int8: 918 TOPS "
                           "(Google Cloud's v5p announcement, 2023-12-06: '459 teraFLOPS of bfloat16 ... or 918 teraOPs of Int8')",
                "links": "same page: 1200 GBps bidirectional ICI per chip (4800 Gbps), 8960-chip pod; DCN 50 Gbps per chip",
                "power": "not published by Google: estimate",
                "price": _TPU_PRICES + ": $4.20",
            },
        ),
        Chip(
            "tpu-v6e", "Google Cloud TPU v6e (Trillium)", (r"^TPU v6 ?lite", r"^TPU v6e"), {"bf16": 918.0, "int8": 1836.0},
            hbm_gib=32e9 / GIB, hbm_gbps=1638, link_gbps=400, link_domain=256, scaleout_gbps=12.5,
            power_w=300, price_per_hour=2.70, family="tpu", mxu=256,
            sources={
                "compute": "cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16, 1836 TOPS int8, 32 GB HBM at 1638 GBps",
                "links": "same page: 800 GBps bidirectional ICI per chip, 256-chip pod; DCN: estimate (100 Gbps per chip)",
                "power": "not published by Google: estimate (Google states 67% better energy efficiency than v5e)",
                "price": _TPU_PRICES + ": $2.70",
            },
        ),
        Chip(
            "trn1", "AWS Trainium (trn1.32xlarge: 16 chips)", (r"(?i)trn1", r"(?i)trainium1?$", r"^NC_v2"),
            {"bf16": 190.0, "fp32": 47.5},
            hbm_gib=32, hbm_gbps=820 * GIB / 1e9, devices_per_chip=2, link_gbps=192, link_domain=16,
            scaleout_gbps=6.25, power_w=300, price_per_hour=21.50 / 16, family="trainium",
            sources={
                "compute": "awsdocs-neuron Trainium architecture: 2 NeuronCore-v2, 190 BF16 / 47.5 FP32 TFLOPS, "
                           "32 GiB at 820 GiB/s",
                "links": "NeuronLink-v2 in a 16-chip 2D torus (4 links per chip; 192 GB/s per direction is our "
                         "estimate); EFA 800 Gbps per trn1.32xlarge = 50 Gbps per chip (trn1 architecture page)",
                "power": "not published by AWS: estimate",
                "price": "AWS EC2 on-demand trn1.32xlarge $21.50/h (us-east-1) / 16 chips",
            },
        ),
        Chip(
            "trn2", "AWS Trainium2 (trn2.48xlarge: 16 chips; UltraServer: 64)", (r"(?i)trn2", r"(?i)trainium2", r"^NC_v3"),
            {"bf16": 667.0, "fp32": 181.0, "fp8": 1299.0},
            hbm_gib=96, hbm_gbps=2900, devices_per_chip=4, link_gbps=640, link_domain=64,
            scaleout_gbps=25.0, power_w=500, price_per_hour=3.00, family="trainium",
            sources={
                "compute": "awsdocs-neuron Trainium2 architecture: 8 NeuronCore-v3, 667 BF16 / 181 FP32 / 1299 FP8 "
                           "TFLOPS, 96 GiB at 2.9 TB/s; LNC=2 gives 4 logical cores per chip",
                "links": "NeuronLink-v3 1.28 TB/s per chip (bidirectional), 16 chips per trn2.48xlarge in a 4x4 torus, "
                         "64 per UltraServer; EFAv3 3.2 Tbps per instance = 200 Gbps per chip (Trn2 architecture page)",
                "power": "not published by AWS: estimate",
                "price": "assumed $3.00 per chip-hour (~$48/h per trn2.48xlarge); check your region and override",
            },
        ),
        Chip(
            "a100-40gb", "NVIDIA A100 SXM 40GB", (r"A100.*40GB",), {"bf16": 312.0, "fp32": 19.5},
            hbm_gib=40e9 / GIB, hbm_gbps=1555, link_gbps=300, link_domain=8, scaleout_gbps=25.0,
            power_w=400, price_per_hour=32.77 / 8, family="gpu", matmul_eff=_mamf("a100"),
            attention=_attention("a100"),
            sources={
                "attention": _attention_source("a100"),
                "matmul": _mamf_source("a100"),
                "compute": "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 19.5 FP32, 40 GB HBM2 at 1555 GB/s",
                "links": "NVLink 3: 600 GB/s bidirectional per GPU, 8 per HGX node; 200 Gbps HDR InfiniBand per GPU "
                         "(DGX A100)",
                "power": "NVIDIA A100 SXM datasheet: 400 W TDP",
                "price": "AWS EC2 on-demand p4d.24xlarge $32.77/h / 8 GPUs",
            },
        ),
        Chip(
            "a100-80gb", "NVIDIA A100 SXM 80GB", (r"A100",), {"bf16": 312.0, "fp32": 19.5},
            hbm_gib=80e9 / GIB, hbm_gbps=2039, link_gbps=300, link_domain=8, scaleout_gbps=25.0,
            power_w=400, price_per_hour=40.97 / 8, family="gpu", matmul_eff=_mamf("a100"),
            attention=_attention("a100"),
            sources={
                "attention": _attention_source("a100"),
                "matmul": _mamf_source("a100"),
                "compute": "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 19.5 FP32, 80 GB HBM2e at 2039 GB/s",
                "links": "NVLink 3: 600 GB/s bidirectional per GPU, 8 per HGX node; 200 Gbps HDR InfiniBand per GPU "
                         "(DGX A100)",
                "power": "NVIDIA A100 SXM datasheet: 400 W TDP",
                "price": "AWS EC2 on-demand p4de.24xlarge $40.97/h / 8 GPUs",
            },
        ),
        Chip(
            "h100-sxm", "NVIDIA H100 SXM 80GB", (r"H100 80GB HBM3", r"H100 SXM", r"^NVIDIA H100$"),
            {"bf16": 989.0, "fp32": 67.0, "fp8": 1979.0},
            hbm_gib=80e9 / GIB, hbm_gbps=3350, link_gbps=450, link_domain=8, scaleout_gbps=50.0,
            power_w=700, price_per_hour=55.04 / 8, family="gpu", matmul_eff=_mamf("h100"),
            attention=_attention("h100"),
            sources={
                "attention": _attention_source("h100"),
                "matmul": _mamf_source("h100"),
                "compute": "NVIDIA H100 datasheet, SXM: 989 TFLOPS dense BF16, 1979 FP8, 67 FP32, 80 GB HBM3 at 3.35 TB/s",
                "links": "NVLink 4: 900 GB/s bidirectional per GPU, 8 per HGX node; 400 Gbps NDR InfiniBand per GPU",
                "power": "NVIDIA H100 SXM datasheet: up to 700 W",
                "price": "AWS EC2 on-demand p5.48xlarge $55.04/h (after the June 2025 price cut) / 8 GPUs",
            },
        ),
        Chip(
            "h200", "NVIDIA H200 SXM 141GB", (r"H200",), {"bf16": 989.0, "fp32": 67.0, "fp8": 1979.0},
            hbm_gib=141e9 / GIB, hbm_gbps=4800, link_gbps=450, link_domain=8, scaleout_gbps=50.0,
            power_w=700, price_per_hour=8.00, family="gpu", matmul_eff=_mamf("h100"),
            attention=_attention("h100"),
            sources={
                "attention": _attention_source("h100", "; the H200 has the same compute"),
                "matmul": _mamf_source("h100", "; the H200 has the same compute (the table's later H100/H200 "
                                               "row: 794.5, 80.3%)"),
                "compute": "NVIDIA H200 datasheet, SXM: 989 TFLOPS dense BF16, 141 GB HBM3e at 4.8 TB/s",
                "links": "NVLink 4: 900 GB/s bidirectional per GPU, 8 per HGX node; 400 Gbps per GPU scale-out",
                "power": "NVIDIA H200 SXM datasheet: up to 700 W",
                "price": "assumed $8.00 per GPU-hour (cloud list prices for 8-GPU H200 nodes vary); override",
            },
        ),
        Chip(
            "b200", "NVIDIA B200 (HGX B200)", (r"B200",), {"bf16": 2250.0, "fp32": 75.0, "fp8": 4500.0},
            hbm_gib=180e9 / GIB, hbm_gbps=8000, link_gbps=900, link_domain=8, scaleout_gbps=50.0,
            power_w=1000, price_per_hour=14.00, family="gpu", matmul_eff=_mamf("b200"),
            sources={
                "matmul": _mamf_source("b200"),
                "compute": "NVIDIA HGX B200 specifications, per GPU: 2.25 PFLOPS dense BF16, 4.5 FP8, 180 GB HBM3e at 8 TB/s",
                "links": "NVLink 5: 1.8 TB/s bidirectional per GPU, 8 per HGX node; 400 Gbps per GPU scale-out",
                "power": "NVIDIA HGX B200: 1000 W per GPU",
                "price": "assumed $14.00 per GPU-hour (cloud list prices for 8-GPU B200 nodes vary); override",
            },
        ),
    ]
}


def chip_names() -> list[str]:
    return sorted([*CATALOG, "cpu"])


def get_chip(name: str) -> Chip:
    if name == "cpu":
        return cpu_chip()
    if name not in CATALOG:
        raise UserError(f"--chip: unknown chip '{name}' (known: {', '.join(chip_names())})")
    return CATALOG[name]


def detect_chip(device) -> Optional[Chip]:
    """The catalog entry for a JAX device, or None when the device kind is not catalogued."""
    if device.platform == "cpu":
        return cpu_chip()
    kind = getattr(device, "device_kind", "")
    for chip in CATALOG.values():
        if any(re.search(p, kind) for p in chip.patterns):
            return chip
    return None


# --------------------------------------------------------------------------------------------
# The CPU: peak = measured large-matmul rate on this machine.


def cpu_model() -> str:
    """This machine's CPU model name, as /proc/cpuinfo gives it (with the model number, since
    virtual machines often name only the vendor)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return f"{model} (model {fields['model']})" if fields.get("model") else model


def _cpu_identity() -> str:
    import jax

    return f"{cpu_model()}|{os.cpu_count()}|{jax.__version__}"


def measure_matmul_tflops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on the default device, best of `repeats`.

    bf16 inputs accumulate into an fp32 result (preferred_element_type), the way the model asks
    for its matmuls.
    """
    import jax
    import jax.numpy as jnp

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e12


def measure_matmul_ceiling() -> dict[str, float]:
    """fp32 and bf16 (fp32-accumulating) large-matmul TFLOP/s of the default device: the best of 8
    runs each at 1024^3 and 2048^3 (on the 2-core VM the two sizes swap places from run to run)."""
    return {key: max(measure_matmul_tflops(n, dtype=dt, repeats=8) for n in (1024, 2048))
            for key, dt in (("fp32", "float32"), ("bf16", "bfloat16"))}


def cpu_matmul_ceiling(*, refresh: bool = False) -> dict[str, float]:
    """This machine's fp32 and bf16 large-matmul TFLOP/s, cached per CPU model, core count and
    JAX version."""
    ident = _cpu_identity()
    path = cache_dir() / f"cpu_peak_{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("identity") == ident:
                return {"fp32": float(data["fp32"]), "bf16": float(data["bf16"])}
        except (OSError, ValueError, KeyError):
            pass
    result = measure_matmul_ceiling()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"identity": ident, **result}))
    except OSError:
        pass
    return result


def cpu_chip() -> Chip:
    peaks = cpu_matmul_ceiling()
    return Chip(
        "cpu",
        f"this machine's CPU ({os.cpu_count()} cores)",
        (),
        {"fp32": peaks["fp32"], "bf16": peaks["bf16"]},
        hbm_gib=_host_memory_gib(),
        hbm_gbps=20.0,
        link_gbps=20.0,
        link_domain=1,
        family="cpu",
        sources={
            "compute": "measured on this machine: best of 8 1024^3 and 8 2048^3 matmuls per dtype (hardware.cpu_matmul_ceiling)",
            "memory": "host RAM; bandwidth an assumed 20 GB/s",
        },
    )


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 0.0
