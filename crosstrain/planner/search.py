"""Search the layouts (tp, pp, dp, fsdp, cp, microbatch, remat) that fit, fastest or cheapest."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional

from crosstrain.config import ModelConfig
from crosstrain.hardware import Chip
from crosstrain.planner.model import Estimate, Layout, estimate

REMATS = ("none", "selective", "full")
# Source-stated layout settings that candidate layouts carry through unchanged.
LAYOUT_FLAGS = ("keep_gathered", "gather_bytes", "reduce_bytes", "tp_comm_overlap", "host_offload", "vocab_tiles", "logit_bytes", "dp_overlap",
                "state_bytes", "remat_blocks")
# crosstrain's own step also has the "attention" policy (model/transformer.py).
CROSSTRAIN_REMATS = ("none", "selective", "attention", "full")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_dividing(n: int, limit: int = 64) -> list[int]:
    out, p = [], 1
    while p <= min(n, limit):
        if n % p == 0:
            out.append(p)
        p *= 2
    return out


def candidate_layouts(
    m: ModelConfig,
    chip: Chip,
    devices: int,
    global_batch: int,
    fixed: Optional[dict] = None,
    remats: tuple[str, ...] = REMATS,
) -> Iterable[Layout]:
    """Every layout of `devices` the model and batch allow; `fixed` pins some fields."""
    fixed = fixed or {}
    domain = chip.link_domain * chip.devices_per_chip

    def choices(name: str, options: list[int]) -> list[int]:
        return [fixed[name]] if fixed.get(name) is not None else options

    tps = [t for t in divisors(devices) if t <= 64 and m.heads % t == 0 and (m.kv_heads % t == 0 or t % m.kv_heads == 0)
           and (t <= domain or t == 1)]
    for tp in choices("tp", tps):
        if devices % tp:
            continue
        rest_tp = devices // tp
        pps = [p for p in divisors(rest_tp) if p <= 64 and m.layers % p == 0]
        for pp in choices("pp", pps):
            if rest_tp % pp:
                continue
            rest_pp = rest_tp // pp
            cps = [c for c in divisors(rest_pp) if c <= 16 and m.seq_len % c == 0 and (c == 1 or m.seq_len >= 16384)]
            for cp in choices("cp", cps):
                if rest_pp % cp:
                    continue
                ranks = rest_pp // cp
                for fsdp in choices("fsdp", divisors(ranks)):
                    if ranks % fsdp or (fixed.get("fsdp_divides") and fixed["fsdp_divides"] % fsdp):
                        continue
                    dp = ranks // fsdp
                    if fixed.get("dp") is not None and dp != fixed["dp"]:
                        continue
                    if global_batch % (dp * fsdp):
                        continue
                    per_rank = global_batch // (dp * fsdp)
                    micros = _powers_of_two_dividing(per_rank, 16 if pp > 1 else per_rank)
                    if pp == 1 and per_rank not in micros:
                        micros.append(per_rank)
                    # Interleaved pipeline schedules (Megatron's virtual stages): each stage's layers
                    # split into v chunks (uneven stages allowed, as Llama 3 ran 126 layers on 16), which
                    # divides the bubble by v.
                    stages = [fixed["virtual_stages"]] if fixed.get("virtual_stages") else (
                        [v for v in (1, 2, 4) if pp * v <= m.layers] if pp > 1 else [1])
                    for micro in choices("microbatch", micros):
                        for remat in ([fixed["remat"]] if fixed.get("remat") else remats):
                            for v in stages:
                                yield Layout(tp=tp, pp=pp, dp=dp, fsdp=fsdp, cp=cp, microbatch=micro, remat=remat,
                                             zero1=bool(fixed.get("zero1", False)), virtual_stages=v,
                                             sequence_parallel=fixed.get("sequence_parallel", True),
                                             **{k: fixed[k] for k in LAYOUT_FLAGS if k in fixed})


def search(
    m: ModelConfig,
    chip: Chip,
    devices: int,
    global_batch: int,
    *,
    fixed: Optional[dict] = None,
    glu: bool = True,
    compute_dtype: str = "bfloat16",
    flash: Optional[bool] = None,
    require_fit: bool = True,
    power_cap_w: Optional[float] = None,
    implementation: str = "efficient",
    slice_chips: Optional[int] = None,
    framework: Optional[str] = None,
    sliding_window: Optional[tuple[int, int]] = None,
    attention_kernel: Optional[str] = None,
) -> tuple[Optional[Estimate], int]:
    """(fastest fitting estimate or None, number of layouts tried). With require_fit=False the
    fastest layout is returned even if none fits (fitting ones are still preferred).

    implementation="crosstrain" searches the layouts crosstrain's trainer runs (no pipeline or
    context parallelism, no sequence parallelism) priced as its own step. `framework` ("jax" or
    "pytorch") names published software's framework where it is not the family's usual one;
    `sliding_window` (window, local layers) a model whose local layers attend to a band;
    `attention_kernel` ("cudnn" or "flash2") the GPU flash kernel, where not the chip's best."""
    fixed = crosstrain_fixed(fixed, m) if implementation == "crosstrain" else fixed
    best: Optional[Estimate] = None
    best_any: Optional[Estimate] = None
    tried = 0
    remats = CROSSTRAIN_REMATS if implementation == "crosstrain" else REMATS
    for lay in candidate_layouts(m, chip, devices, global_batch, fixed, remats):
        tried += 1
        est = estimate(m, chip, lay, global_batch=global_batch, glu=glu, compute_dtype=compute_dtype, flash=flash,
                       power_cap_w=power_cap_w, implementation=implementation, slice_chips=slice_chips,
                       framework=framework, sliding_window=sliding_window, attention_kernel=attention_kernel)
        if best_any is None or est.step_time_s < best_any.step_time_s:
            best_any = est
        if est.fits and (best is None or est.step_time_s < best.step_time_s):
            best = est
    if best is None and not require_fit:
        best = best_any
    return best, tried


def crosstrain_fixed(fixed: Optional[dict], m: Optional[ModelConfig] = None) -> dict:
    """Pins for crosstrain's own trainer: pp = cp = 1 and no sequence parallelism unless given,
    and FSDP degrees that divide the model width (crosstrain shards weights' `embed` axis)."""
    out = dict(fixed or {})
    if m is not None:
        out.setdefault("fsdp_divides", m.hidden)
    for key, value in (("pp", 1), ("cp", 1), ("sequence_parallel", False)):
        if out.get(key) is None:
            out[key] = value
    return out


def smallest_memory(
    m: ModelConfig, chip: Chip, devices: int, global_batch: int, *, fixed: Optional[dict] = None, glu: bool = True,
    flash: Optional[bool] = None, implementation: str = "efficient",
) -> Optional[Estimate]:
    """The layout needing the least memory per device (to report a plan that does not fit)."""
    fixed = crosstrain_fixed(fixed, m) if implementation == "crosstrain" else fixed
    best = None
    for lay in candidate_layouts(m, chip, devices, global_batch, fixed):
        est = estimate(m, chip, lay, global_batch=global_batch, glu=glu, flash=flash, implementation=implementation)
        if best is None or est.memory_per_device_gib < best.memory_per_device_gib:
            best = est
    return best


def with_layout(lay: Layout, **changes) -> Layout:
    return replace(lay, **changes)
