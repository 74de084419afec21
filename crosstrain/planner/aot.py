"""Ahead-of-time compilation of crosstrain's real train step for a TPU topology, on this machine.

libtpu (the `tpu` extra) compiles for TPU devices that are not present. The step is compiled for
the plan's own topology where libtpu knows it (1024 v5p chips is `v5p:8x8x16`), with the plan's
layout as the mesh, the plan's microbatches as gradient accumulation, scanned layers at the
model's real depth, and every `auto` resolved for those TPU devices (`crosstrain.resolve`): so
Splash attention where the shape allows it, bf16 activations, transposes folded. Several slices
(`slices`) compile as a multi-slice topology with a hybrid mesh: data parallelism across slices
over the data-centre network, the rest inside each slice.

What comes back, beside the planner's own figures for the same program:
- `memory_per_chip_gib`: XLA's per-chip memory (arguments + temporaries + outputs not aliased to
  donated inputs), or `fits: false` with what XLA asked for when the compiler refuses.
- `xla_estimated_step_s`: the `optimal_seconds` of XLA's TPU cost analysis of the compiled step.
  It is XLA's roofline estimate of the HLO: it counts a `while` body (the scanned layers, the
  microbatch loop) once, not once per iteration, and sees nothing inside Mosaic kernels (Splash)
  or collectives' overlap. crosstrain therefore compiles a one-layer and a two-layer program beside
  the real one and scales: per-layer x layers x microbatches + the rest
  (`xla_estimate_basis` says what was done).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from crosstrain.config import Config, DataConfig, InitConfig
from crosstrain.errors import UserError
from crosstrain.hardware import GIB, Chip

PREFIX = {"tpu-v4": "v4", "tpu-v5p": "v5p", "tpu-v5e": "v5e", "tpu-v6e": "v6e"}
# The largest single slice (ICI domain) per generation; more chips take several slices.
MAX_SLICE = {"tpu-v4": 4096, "tpu-v5p": 8960, "tpu-v5e": 256, "tpu-v6e": 256}


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def slice_topology(chip: str, chips: int) -> str:
    """The topology name of one slice of `chips` chips ("v5p:8x8x16"), or a UserError."""
    if chip not in PREFIX:
        raise UserError(f"--aot: ahead-of-time compilation is for TPU chips ({', '.join(PREFIX)}), not {chip}")
    if chips < 4 or chips & (chips - 1):
        raise UserError(f"--chips: {PREFIX[chip]} slices compiled here have a power-of-two number of chips >= 4, got {chips}")
    if chips > MAX_SLICE[chip]:
        raise UserError(f"--chips: one {PREFIX[chip]} slice has at most {MAX_SLICE[chip]} chips, got {chips} "
                        f"(use --slices)")
    if chip in ("tpu-v4", "tpu-v5p"):  # 3D torus: grow the smallest later dimension first
        dims = [2, 2, 1]
        while math.prod(dims) < chips:
            i = min(range(3), key=lambda j: (dims[j], -j))
            dims[i] *= 2
        dims.sort()
        dims = [dims[1], dims[2], dims[0]] if dims[0] == 1 else dims
    else:  # 2D torus
        dims = [2, 2]
        while math.prod(dims) < chips:
            dims[0 if dims[0] < dims[1] else 1] *= 2
        dims.sort()
    return f"{PREFIX[chip]}:{'x'.join(map(str, dims))}"


def topology_devices(chip: str, chips: int, slices: int = 1) -> tuple[str, list]:
    from jax.experimental import topologies

    if slices < 1 or chips % slices:
        raise UserError(f"--slices: {slices} does not divide --chips {chips}")
    name = slice_topology(chip, chips // slices)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=slices)
    except Exception as e:  # libtpu's refusal of a topology is a user-facing answer
        message = str(e).strip().splitlines()[0]
        if "lockfile" in message:
            # One process at a time may hold libtpu; another crosstrain (or a test run) has it.
            raise UserError("--aot: libtpu is in use by another process on this machine "
                            "(/tmp/libtpu_lockfile); run again when it has finished") from None
        raise UserError(f"--chips: libtpu does not know the topology {name} x {slices} slice(s): "
                        f"{message[:160]}") from None
    return name, list(desc.devices)


def _refusal(message: str) -> dict[str, Any]:
    """What XLA said it needed when it refused to compile, e.g. "... the total memory required for
    HLO temporaries (153.67G) exceeds available HBM (95.74G)"."""
    found = re.search(r"required for ([^(]*)\(([\d.]+)([KMGT])", message)
    if not found:
        return {"xla_required_gib": None, "xla_error": message.strip().splitlines()[0][:200]}
    need = float(found.group(2)) * 1024 ** ("KMGT".index(found.group(3)) - 2)
    return {"xla_required_gib": need,
            "xla_error": f"{found.group(1).strip()} need {need:.2f} GiB, more than the chip's HBM"}


def _compile(cfg: Config, devices) -> tuple[Any, Any]:
    """(compiled step, setup) for `cfg` on `devices`; raises JaxRuntimeError on refusal."""
    from crosstrain.parallel.rules import activate
    from crosstrain.runtime import abstract_train_state, compile_train_step, make_setup

    setup = make_setup(cfg, devices)
    with activate(setup.mesh):
        return compile_train_step(setup.cfg, setup, abstract_train_state(setup)), setup


def _analysis(compiled) -> dict[str, float]:
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    return {"bytes": float(total), "arguments": float(ma.argument_size_in_bytes),
            "flops": float(cost.get("flops", 0.0)), "seconds": float(cost.get("optimal_seconds", 0.0))}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z\-]+)\((.*)$")


def _array_bytes(text: str) -> int:
    """Bytes of every array type in `text` (a tuple type sums its elements)."""
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _ARRAY.findall(text))


def elementwise_bytes(hlo_text: str) -> float:
    """HBM bytes that the entry computation of an optimized HLO module moves outside its matmuls:
    each elementwise or reduction fusion (kind kLoop / kInput) and each layout copy reads its
    operands and writes its result. Matmul fusions (kOutput), custom calls (Splash) and
    collectives are left out; so are while loops' bodies (compile unrolled programs)."""
    lines = hlo_text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    size: dict[str, int] = {}
    total = 0
    for line in lines[start + 1:]:
        if line.rstrip() == "}":
            break
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        name, kind, op, rest = found.groups()
        size[name] = _array_bytes(kind)
        moves = op == "copy" or (op == "fusion" and re.search(r"kind=k(Loop|Input)\b", rest) is not None)
        if moves:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            total += size[name] + sum(size.get(o, 0) for o in operands)
    return float(total)


def _program(cfg: Config, *, layers: int, remat: str, batch: int, microbatches: int, mesh: dict[str, int],
             scan: bool = True) -> Config:
    return cfg.override(model={"layers": layers, "remat": remat, "scan_layers": scan},
                        train={"batch": batch, "microbatches": microbatches}, mesh={**mesh, "rule": "none"},
                        data=DataConfig(), init=InitConfig())


def compile_step(cfg: Config, chip: Chip, parallelism: dict[str, int], chips: int, remat: str, *,
                 slices: int = 1, estimate_layers: bool = True, planner_only: bool = False) -> dict[str, Any]:
    """Compile the plan's step for its topology and compare with the planner.

    `estimate_layers`: also compile unrolled 1- and 2-layer programs of one microbatch to scale
    XLA's time estimate (seconds each, even at 1024 chips)."""
    import jax

    from crosstrain.planner.model import Layout, elementwise_bytes_per_token_layer, estimate

    if not available():
        raise UserError("--aot: libtpu is not installed (pip install 'crosstrain[tpu]')")
    if parallelism.get("pp", 1) > 1 or parallelism.get("cp", 1) > 1:
        raise UserError("--aot: crosstrain's train step has no pipeline or context parallelism; plan with pp=1, cp=1")
    topo, devices = topology_devices(chip.name, chips, slices)
    tp, fsdp, dp = parallelism.get("tp", 1), parallelism.get("fsdp", 1), parallelism.get("dp", 1)
    if dp % slices:
        raise UserError(f"--slices: the plan's data parallelism ({dp}) is not a multiple of {slices} slices")
    # libtpu lays TPU v4 topologies out per TensorCore (2 devices a chip) where JAX on a v4 host
    # runs one megacore device a chip: the extra factor goes to the batch axes, and a chip's
    # memory is the sum of its cores'.
    cores = max(1, len(devices) // chips)
    if cores > 1:
        if fsdp > 1:
            fsdp *= cores
        else:
            dp *= cores
    mesh = {"slice": slices, "data": dp // slices, "fsdp": fsdp, "tensor": tp}
    ranks = dp * fsdp
    per_rank = cfg.train.batch // ranks
    if per_rank < 1:
        raise UserError(f"--aot: train.batch ({cfg.train.batch}) is smaller than the {ranks} batch shards of the compiled mesh")
    micro = min(max(1, parallelism.get("microbatch", per_rank) // cores), per_rank)
    n_micro = max(1, per_rank // micro)
    batch = micro * n_micro * ranks
    L = cfg.model.layers
    program = _program(cfg, layers=L, remat=remat, batch=batch, microbatches=n_micro, mesh=mesh)
    from crosstrain.resolve import resolve_model

    model, resolved = resolve_model(program.model, devices)
    flash = model.attention == "splash"
    lay = Layout(tp=tp, dp=dp // (1 if fsdp > 1 else cores), fsdp=fsdp // (cores if fsdp > 1 else 1),
                 microbatch=micro * cores, remat=remat, sequence_parallel=False)
    planner = estimate(model, chip, lay, global_batch=batch, flash=flash, implementation="crosstrain",
                       slice_chips=chips // slices)
    planner_bytes = sum(v for k, v in planner.memory.items() if k != "reserved")
    out: dict[str, Any] = {
        "topology": topo + (f" x {slices} slices" if slices > 1 else ""),
        "slices": slices,
        "chips": chips,
        "devices_per_chip": cores,
        "mesh": mesh,
        "program": f"{L} scanned layers, {batch} sequences of {cfg.model.seq_len} ({n_micro} microbatch(es) of "
                   f"{micro} per rank), remat {remat}",
        "attention": model.attention,
        "resolved": resolved.to_dict(),
        "planner_memory_per_chip_gib": planner_bytes / GIB,
        "planner_step_time_s": planner.step_time_s,
        "planner_compute_s": planner.time["compute_s"],
        "capacity_gib": chip.hbm_gib,
    }
    if planner_only:
        return out
    t0 = time.perf_counter()
    try:
        compiled, _ = _compile(program, devices)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The compiler refuses a program that cannot fit: that is the answer, not a failure.
        refusal = _refusal(str(e))
        if refusal["xla_required_gib"] is not None:
            refusal["xla_required_gib"] *= cores  # XLA speaks per device; a v4 chip is two here
        return {**out, "fits": False, "memory_per_chip_gib": None, "planner_rel_error": None,
                "compile_s": time.perf_counter() - t0, **refusal}
    compile_s = time.perf_counter() - t0
    full = {k: v * cores if k in ("bytes", "arguments", "flops") else v for k, v in _analysis(compiled).items()}
    del compiled
    result = {
        **out,
        "fits": full["bytes"] <= chip.hbm_gib * GIB,
        "memory_per_chip_gib": full["bytes"] / GIB,
        "parameter_and_optimizer_gib": full["arguments"] / GIB,
        "planner_rel_error": (planner_bytes - full["bytes"]) / full["bytes"],
        "compile_s": compile_s,
        "xla_flops_per_chip": full["flops"],
        "xla_optimal_seconds": full["seconds"],
    }
    if estimate_layers and L > 2:
        # optimal_seconds counts each while body once: scale a layer's share from 1- and 2-layer
        # programs of one microbatch, then multiply out.
        # Unrolled layers, one microbatch: no while loop, so every op is counted.
        one, two = (_compile(_program(cfg, layers=n, remat=remat, batch=micro * ranks, microbatches=1,
                                      mesh=mesh, scan=False), devices)[0] for n in (1, 2))
        moved = (elementwise_bytes(two.as_text()) - elementwise_bytes(one.as_text())) * cores
        one, two = _analysis(one), _analysis(two)
        result["xla_layer_flops_per_chip"] = two["flops"] - one["flops"]
        # XLA's elementwise traffic per layer and microbatch against the planner's one fused pass.
        one_pass = elementwise_bytes_per_token_layer(model, lay, flash=flash, implementation="crosstrain") \
            * micro * cores * cfg.model.seq_len
        result["xla_elementwise_gb_per_layer"] = moved / 1e9
        result["planner_one_pass_gb_per_layer"] = one_pass / 1e9
        result["xla_elementwise_passes"] = moved / one_pass
        per_layer = max(two["seconds"] - one["seconds"], 0.0)
        rest = max(one["seconds"] - per_layer, 0.0)
        result["xla_estimated_step_s"] = n_micro * (per_layer * L + rest)
        result["xla_estimate_basis"] = (f"1- and 2-layer programs: {per_layer * 1e3:.3f} ms per layer per "
                                        f"microbatch x {L} layers x {n_micro} microbatches + {rest * 1e3:.3f} ms")
    else:
        result["xla_estimated_step_s"] = full["seconds"]
        result["xla_estimate_basis"] = ("optimal_seconds of the compiled step as XLA reports it (while bodies "
                                        "counted once: a lower bound)")
    if not result["xla_estimated_step_s"]:
        result["xla_estimated_step_s"] = None
        result["xla_estimate_basis"] = f"XLA's cost analysis gives no optimal_seconds for {chip.name}"
    result["attention_note"] = ("XLA's estimate does not see inside the Splash kernel (a Mosaic custom call)"
                                if flash else "attention in XLA ops, inside XLA's estimate")
    return result
