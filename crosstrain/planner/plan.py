"""A plan: the best (or a given) layout for a model on N chips, and what the whole run costs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from crosstrain.config import Config
from crosstrain.errors import UserError
from crosstrain.hardware import GIB, Chip, get_chip
from crosstrain.planner.model import Estimate, Layout, mfu
from crosstrain.planner.search import search, smallest_memory

LAYOUT_KEYS = ("tp", "pp", "dp", "fsdp", "cp", "microbatch", "virtual_stages")
SOFTWARE = ("crosstrain", "published")


def parse_parallelism(text: str) -> dict[str, Any]:
    """'tp=8,fsdp=16,pp=1' -> {'tp': 8, 'fsdp': 16, 'pp': 1}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)=(\d+)", part)
        if not m or m.group(1) not in LAYOUT_KEYS:
            raise UserError(f"--parallelism: '{part}' is not KEY=N with KEY one of {', '.join(LAYOUT_KEYS)}")
        if int(m.group(2)) < 1:
            raise UserError(f"--parallelism: {m.group(1)} must be >= 1")
        out[m.group(1)] = int(m.group(2))
    return out


@dataclass
class Options:
    chip: str
    chips: int
    tokens: Optional[float] = None
    parallelism: Optional[dict[str, Any]] = None
    remat: Optional[str] = None
    price: Optional[float] = None  # USD per chip-hour
    power: Optional[float] = None  # W per chip
    power_cap: Optional[float] = None
    pue: float = 1.0
    objective: str = "time"
    slices: int = 1  # TPU slices joined by the data-centre network
    max_days: Optional[float] = None  # a deadline: --objective cost takes the cheapest plan within it
    # Whose training step is priced: crosstrain's own (what `crosstrain train` would run there), or
    # the best published software for the chip as the fitted model knows it (flash attention on
    # every family: Splash, cuDNN/Transformer Engine, NKI; pipeline, context and sequence parallelism).
    software: str = "crosstrain"


def _validate(cfg: Config, chip: Chip, opts: Options) -> int:
    if opts.chips < 1:
        raise UserError(f"--chips: must be >= 1, got {opts.chips}")
    devices = opts.chips * chip.devices_per_chip
    par = opts.parallelism or {}
    product = math.prod(par.get(k, 1) for k in ("tp", "pp", "dp", "fsdp", "cp"))
    if par and all(k in par for k in ("tp", "pp", "dp", "fsdp", "cp")) and product != devices:
        raise UserError(f"--parallelism: tp x pp x dp x fsdp x cp = {product} but {opts.chips} {chip.name} have {devices} devices")
    if devices % product:
        raise UserError(f"--parallelism: {product} devices of parallelism does not divide {devices} devices")
    m = cfg.model
    tp = par.get("tp", 1)
    if m.heads % tp or (m.kv_heads % tp and tp % m.kv_heads):
        raise UserError(f"--parallelism: tp={tp} does not divide model.heads ({m.heads}) and model.kv_heads ({m.kv_heads})")
    if m.layers % par.get("pp", 1):
        raise UserError(f"--parallelism: pp={par['pp']} does not divide model.layers ({m.layers})")
    if m.seq_len % par.get("cp", 1):
        raise UserError(f"--parallelism: cp={par['cp']} does not divide model.seq_len ({m.seq_len})")
    ranks = par.get("dp", 1) * par.get("fsdp", 1)
    if cfg.train.batch % ranks:
        raise UserError(f"--parallelism: dp x fsdp = {ranks} does not divide train.batch ({cfg.train.batch})")
    if opts.remat and opts.remat not in ("none", "selective", "dots", "attention", "full"):
        raise UserError(f"--remat: must be none, selective, dots, attention or full, got {opts.remat}")
    if opts.objective not in ("time", "cost"):
        raise UserError(f"--objective: must be time or cost, got {opts.objective}")
    if opts.software not in SOFTWARE:
        raise UserError(f"--software: must be {' or '.join(SOFTWARE)}, got {opts.software}")
    if opts.max_days is not None and not opts.max_days > 0:
        raise UserError(f"--max-days: must be positive, got {opts.max_days}")
    for name, v in (("--price", opts.price), ("--power", opts.power), ("--pue", opts.pue)):
        if v is not None and v < 0:
            raise UserError(f"{name}: must be >= 0, got {v}")
    return devices


def _fixed(opts: Options) -> dict[str, Any]:
    fixed = dict(opts.parallelism or {})
    if opts.remat:
        fixed["remat"] = opts.remat
    return fixed


def crosstrain_flash(cfg: Config, chip: Chip) -> bool:
    """Whether crosstrain's own step runs a flash kernel on this chip (what `attention=auto`
    resolves to there: Splash on TPU, cuDNN on NVIDIA GPUs, where the shape allows)."""
    from crosstrain.model.attention import splash_shape_problem

    m = cfg.model
    if m.attention not in ("auto", "splash", "cudnn"):
        return False
    if chip.family == "tpu":
        return m.attention in ("auto", "splash") and splash_shape_problem(m.head_dim, m.seq_len) is None
    if chip.family == "gpu":
        return (m.attention in ("auto", "cudnn") and planned_dtype(cfg) == "bfloat16" and m.head_dim % 8 == 0
                and m.head_dim <= 128)
    return False


def planned_dtype(cfg: Config) -> str:
    """The compute dtype priced: an unresolved "auto" is bf16, what accelerators resolve it to."""
    return "bfloat16" if cfg.model.compute_dtype == "auto" else cfg.model.compute_dtype


def best_estimate(cfg: Config, chip: Chip, devices: int, opts: Options) -> tuple[Estimate, int]:
    """The fastest layout the software can run, priced as that software's step. crosstrain's own
    (the default): no pipeline or context parallelism unless pinned, the attention kernel it
    resolves on this chip. "published": the best published software for the chip, with a flash
    kernel on every family and the family's fitted constants."""
    own = opts.software == "crosstrain"
    flash = crosstrain_flash(cfg, chip) if own else True
    implementation = "crosstrain" if own else "efficient"
    est, tried = search(cfg.model, chip, devices, cfg.train.batch, fixed=_fixed(opts), compute_dtype=planned_dtype(cfg),
                        power_cap_w=opts.power_cap, flash=flash, implementation=implementation,
                        slice_chips=opts.chips // max(1, opts.slices))
    if est is not None:
        return est, tried
    pinned = opts.parallelism and all(k in opts.parallelism for k in ("tp", "pp", "dp", "fsdp", "cp")) and opts.remat
    smallest = smallest_memory(cfg.model, chip, devices, cfg.train.batch, fixed=_fixed(opts), flash=flash,
                               implementation=implementation)
    if smallest is None:
        raise UserError(f"--parallelism: no layout of {devices} devices matches the model and batch")
    if pinned:
        return smallest, tried  # a pinned plan that does not fit is a result with fits: false
    raise UserError(
        f"the model fits no layout of {opts.chips} {chip.name}: the leanest needs "
        f"{smallest.memory_per_device_gib * chip.devices_per_chip:.1f} GiB per chip, the chip has "
        f"{smallest.capacity_gib * chip.devices_per_chip:.1f} GiB usable (try more chips)"
    )


def plan(cfg: Config, opts: Options) -> dict[str, Any]:
    chip = get_chip(opts.chip)
    devices = _validate(cfg, chip, opts)
    m, t = cfg.model, cfg.train
    tokens_per_step = t.batch * m.seq_len
    # Whole steps of the global batch: the budget planned is what those steps train on.
    steps = math.ceil((opts.tokens or float(t.steps * tokens_per_step)) / tokens_per_step)
    tokens = float(steps * tokens_per_step)
    est, tried = best_estimate(cfg, chip, devices, opts)
    fastest_days = steps * est.step_time_s / 86400
    chips_used = opts.chips
    notes: list[str] = []
    if opts.objective == "cost" and not opts.parallelism:
        # The cheapest run within the chip budget (and the deadline): fewer chips can be more
        # efficient per chip, and take longer.
        n = opts.chips // 2
        while n >= 1:
            try:
                cand, more = best_estimate(cfg, chip, n * chip.devices_per_chip, Options(**{**opts.__dict__, "chips": n}))
            except UserError:
                break
            tried += more
            in_time = opts.max_days is None or steps * cand.step_time_s / 86400 <= opts.max_days
            if cand.fits and in_time and cand.step_time_s * n < est.step_time_s * chips_used:
                est, chips_used = cand, n
            n //= 2
        days = steps * est.step_time_s / 86400
        if opts.max_days is None and days > 3 * fastest_days:
            notes.append(f"the cheapest plan takes {days:,.1f} days, {days / fastest_days:.0f}x the {fastest_days:,.1f} days "
                         f"on all {opts.chips:,} chips; give --max-days to bound it")
    days = steps * est.step_time_s / 86400
    if opts.max_days is not None and days > opts.max_days:
        notes.append(f"no plan on up to {opts.chips:,} {chip.name} finishes within --max-days {opts.max_days:g}: "
                     f"the fastest takes {fastest_days:,.1f} days")
    seconds = steps * est.step_time_s
    price = chip.price_per_hour if opts.price is None else opts.price
    power = chip.power_w if opts.power is None else opts.power
    chip_hours = chips_used * seconds / 3600
    peak = chip.peak_flops(planned_dtype(cfg)) or chip.peak_flops("bfloat16")
    result = {
        "chip": chip.name,
        "chips": chips_used,
        "software": opts.software,
        "devices": est.devices,
        "parallelism": {k: getattr(est.layout, k) for k in ("tp", "pp", "dp", "fsdp", "cp", "microbatch")},
        "remat": est.layout.remat,
        "layouts_searched": tried,
        "global_batch": t.batch,
        "seq_len": m.seq_len,
        "tokens": tokens,
        "steps": steps,
        "step_time_s": est.step_time_s,
        "tokens_per_s": tokens_per_step / est.step_time_s,
        "tokens_per_s_per_chip": tokens_per_step / est.step_time_s / chips_used,
        "mfu": mfu(est, chip, planned_dtype(cfg)),
        "model_tflops_per_chip": est.model_flops_per_step / est.step_time_s / chips_used / 1e12,
        "peak_tflops_per_chip": peak / 1e12,
        "memory_per_chip_gib": est.memory_per_device_gib * chip.devices_per_chip,
        "memory_capacity_gib": est.capacity_gib * chip.devices_per_chip,
        "fits": est.fits,
        "time_to_train_days": seconds / 86400,
        "chip_hours": chip_hours,
        "price_per_chip_hour": price,
        "cost_usd": chip_hours * price,
        "power_w_per_chip": power,
        "energy_mwh": chip_hours * power * opts.pue / 1e6,
        "time_breakdown": est.time,
        "memory_breakdown_gib": {k: v * chip.devices_per_chip / GIB for k, v in est.memory.items()},
        "notes": notes + est.notes + [
            f"price: {chip.sources.get('price', 'n/a')}" if opts.price is None else f"price: {price} USD per chip-hour (--price)",
            f"power: {chip.sources.get('power', 'n/a')}; chip power only x PUE {opts.pue}" if opts.power is None
            else f"power: {power} W per chip (--power) x PUE {opts.pue}",
        ],
    }
    if opts.software == "published" or chip.family != "cpu":
        from crosstrain.flops import param_count
        from crosstrain.planner.cases import nearest_published

        result["nearest_published"] = nearest_published(chip.family, chip.name, param_count(m) / 1e9, chips_used)
    return result


def compare(cfg: Config, targets: list[tuple[str, int]], base: Options,
            software: tuple[str, ...] = SOFTWARE) -> list[dict[str, Any]]:
    """Each option priced for each software (crosstrain's own step and the best published)."""
    rows = []
    for name, n in targets:
        for sw in software:
            opts = Options(**{**base.__dict__, "chip": name, "chips": n, "parallelism": None, "software": sw})
            try:
                rows.append(plan(cfg, opts))
            except UserError as e:
                rows.append({"chip": name, "chips": n, "software": sw, "fits": False, "error": str(e)})
    return rows


def parse_compare(text: str) -> list[tuple[str, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if ":" not in part:
            raise UserError(f"--compare: '{part}' is not CHIP:N (for example tpu-v5p:2048)")
        name, n = part.rsplit(":", 1)
        get_chip(name)
        try:
            count = int(n)
        except ValueError:
            raise UserError(f"--compare: '{n}' in '{part}' is not a chip count") from None
        if count < 1:
            raise UserError(f"--compare: chip count must be >= 1 in '{part}'")
        out.append((name, count))
    if not out:
        raise UserError("--compare: give at least one CHIP:N")
    return out


def layout_of(result: dict[str, Any]) -> Layout:
    p = result["parallelism"]
    return Layout(tp=p["tp"], pp=p["pp"], dp=p["dp"], fsdp=p["fsdp"], cp=p["cp"], microbatch=p["microbatch"], remat=result["remat"])
