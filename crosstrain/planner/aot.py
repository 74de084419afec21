"""Ahead-of-time compilation of crosstrain's real train step for a TPU or GPU cluster, on this machine.

libtpu (the `tpu` extra) compiles for TPU devices that are not present, and the CUDA plugin (the
`cuda` extra) for NVIDIA GPUs that are not present. The step is compiled for the plan's own
cluster, with the plan's layout as the mesh, the plan's microbatches as gradient accumulation,
scanned layers at the model's real depth, and every `auto` resolved for those devices
(`crosstrain.resolve`): Splash attention on TPU and cuDNN's flash attention on GPU where the shape
allows it, bf16 activations, transposes folded.

- TPU: the plan's own topology where libtpu knows it (1024 v5p chips is `v5p:8x8x16`). Several
  slices (`slices`) compile as a multi-slice topology with a hybrid mesh: data parallelism across
  slices over the data-centre network, the rest inside each slice.
- GPU: nodes of 8 GPUs (the catalog's NVLink domain), described to XLA by the chip's target
  description shipped in crosstrain/planner/gpu_targets/ (SM count, clocks, memory, bandwidth,
  compute capability, each with its source) and the CUDA runtime and cuDNN versions installed
  here. The mesh is hybrid the same way: NVLink inside a node, the network across nodes.

What comes back, beside the planner's own figures for the same program:
- `memory_per_chip_gib`: XLA's per-chip memory (arguments + temporaries + outputs not aliased to
  donated inputs), or `fits: false` with what XLA asked for when the compiler refuses.
- `xla_estimated_step_s` (TPU only): the `optimal_seconds` of XLA's TPU cost analysis of the
  compiled step. It is XLA's roofline estimate of the HLO: it counts a `while` body (the scanned
  layers, the microbatch loop) once, not once per iteration, and sees nothing inside Mosaic kernels
  (Splash) or collectives' overlap. crosstrain therefore compiles a one-layer and a two-layer
  program beside the real one and scales: per-layer x layers x microbatches + the rest
  (`xla_estimate_basis` says what was done). XLA's GPU compiler gives no cost analysis, so GPU
  plans carry none (`xla_estimate_basis` says so).
- `involuntary_rematerializations`: tensors the SPMD partitioner had to replicate because it
  could not convert between two shardings (crosstrain/parallel/partitioner.py); 0 for a sound
  program.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Optional

from crosstrain.config import Config, DataConfig, InitConfig
from crosstrain.errors import UserError
from crosstrain.hardware import GIB, Chip

PREFIX = {"tpu-v4": "v4", "tpu-v5p": "v5p", "tpu-v5e": "v5e", "tpu-v6e": "v6e"}
# The largest single slice (ICI domain) per generation; more chips take several slices.
MAX_SLICE = {"tpu-v4": 4096, "tpu-v5p": 8960, "tpu-v5e": 256, "tpu-v6e": 256}


# NVIDIA GPUs with a target description in crosstrain/planner/gpu_targets/.
GPU_TARGETS = ("h100-sxm", "h200", "b200")


def platform_of_chip(chip: str) -> str:
    """"tpu" or "gpu" for a chip crosstrain compiles for, else a UserError naming the ones it does."""
    if chip in PREFIX:
        return "tpu"
    if chip in GPU_TARGETS:
        return "gpu"
    raise UserError(f"--aot: ahead-of-time compilation is for TPU ({', '.join(PREFIX)}) and NVIDIA GPU "
                    f"({', '.join(GPU_TARGETS)}) chips, not {chip}")


def available(platform: str = "tpu") -> bool:
    import importlib.util

    module = "libtpu" if platform == "tpu" else "jax_cuda12_plugin"
    return importlib.util.find_spec(module) is not None


def _gpu_hardware(chip: str) -> str:
    """The shipped hardware description of one GPU of `chip` (crosstrain/planner/gpu_targets/)."""
    from importlib import resources

    return resources.files("crosstrain.planner").joinpath("gpu_targets", f"{chip}.txtpb").read_text()


def gpu_target_config(chip: str) -> str:
    """The GpuTargetConfigProto text for one GPU of `chip`: the shipped hardware description plus
    the versions of the CUDA runtime and cuDNN installed here (what the compiled program would
    load on the GPU hosts)."""
    from jax_cuda12_plugin import _versions  # the `cuda` extra

    text = _gpu_hardware(chip)

    cudnn = _versions.cudnn_get_version()  # 92800 -> 9.28.0
    runtime = _versions.cuda_runtime_get_version()  # 12090 -> 12.9.0
    dnn = (cudnn // 10000, (cudnn % 10000) // 100, cudnn % 100)
    rt = (runtime // 1000, (runtime % 1000) // 10, runtime % 10)
    return (text + 'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}\n"
            f"runtime_version {{ major: {rt[0]} minor: {rt[1]} patch: {rt[2]} }}\n")


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
    """(a name for the cluster, its devices) for `chips` chips of `chip`, compiled for here."""
    if platform_of_chip(chip) == "gpu":
        return _gpu_devices(chip, chips, slices)
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


def gpu_nodes(chip: Chip, chips: int) -> tuple[int, int]:
    """(nodes, GPUs per node) of a cluster of `chips` GPUs in the catalog's NVLink domains."""
    per_node = chip.link_domain
    if chips <= per_node:
        return 1, chips
    if chips % per_node:
        raise UserError(f"--chips: {chip.name} clusters compiled here are whole nodes of {per_node} GPUs "
                        f"(or one partial node), got {chips}")
    return chips // per_node, per_node


def _gpu_devices(chip: str, chips: int, slices: int) -> tuple[str, list]:
    from jax.experimental import topologies

    from crosstrain.hardware import get_chip

    if slices != 1:
        raise UserError("--slices: is for TPU multi-slice; a GPU cluster is nodes of GPUs, sized by --chips")
    nodes, per_node = gpu_nodes(get_chip(chip), chips)
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(chip),
                                            topology=f"1x{nodes}x{per_node}")
    except Exception as e:  # the plugin's refusal is an answer, not a crash
        raise UserError(f"--aot: the CUDA plugin cannot describe {nodes} node(s) x {per_node} {chip}: "
                        f"{str(e).strip().splitlines()[0][:160]}") from None
    return f"{nodes} node(s) x {per_node} {chip}", list(desc.devices)


def gpu_memory_bytes(chip: str) -> float:
    """The device memory XLA sees on one GPU of `chip` (what the driver reports usable), from its
    target description."""
    return float(re.search(r"device_memory_size:\s*(\d+)", _gpu_hardware(chip)).group(1))


def _refusal(message: str) -> dict[str, Any]:
    """What XLA said it needed when it refused to compile, e.g. "... the total memory required for
    HLO temporaries (153.67G) exceeds available HBM (95.74G)"."""
    found = re.search(r"required for ([^(]*)\(([\d.]+)([KMGT])", message)
    if not found:
        return {"xla_required_gib": None, "xla_error": message.strip().splitlines()[0][:200]}
    need = float(found.group(2)) * 1024 ** ("KMGT".index(found.group(3)) - 2)
    return {"xla_required_gib": need,
            "xla_error": f"{found.group(1).strip()} need {need:.2f} GiB, more than the chip's HBM"}


# Without a device XLA cannot autotune its GPU GEMM fusions and takes its default Triton tiling,
# which for some shapes asks for more shared memory than the chip has (seen: a [8192, 10240] fp32
# GEMM on B200, 295,056 bytes of 232,448). On a GPU the autotuner would pick another tiling or
# cuBLAS; here such a program is compiled again with cuBLAS for every GEMM.
_NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def _compile(cfg: Config, devices, logs: Optional[list] = None, notes: Optional[list] = None) -> tuple[Any, Any]:
    """(compiled step, setup) for `cfg` on `devices`; raises JaxRuntimeError on refusal. What
    XLA logged while compiling (crosstrain/parallel/compile_log.py) is appended to `logs`, and
    what was done differently from a compile on the device to `notes`."""
    import jax

    from crosstrain.parallel.compile_log import watch_compiler
    from crosstrain.parallel.rules import activate
    from crosstrain.runtime import abstract_train_state, compile_train_step, make_setup

    setup = make_setup(cfg, devices)
    with activate(setup.mesh):
        try:
            with watch_compiler() as log:
                compiled = compile_train_step(setup.cfg, setup, abstract_train_state(setup))
        except jax.errors.JaxRuntimeError as e:
            if "Shared memory size limit exceeded" not in str(e):
                raise
            with watch_compiler() as log:
                compiled = compile_train_step(setup.cfg, setup, abstract_train_state(setup),
                                              compiler_options=_NO_TRITON_GEMM)
            if notes is not None:
                notes.append("XLA's default Triton tiling of a GEMM needed more shared memory than the chip has "
                             "(no autotuning without a device): compiled with cuBLAS GEMMs")
    if logs is not None:
        logs.append(log)
    return compiled, setup


def _analysis(compiled) -> dict[str, float]:
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}  # None for GPU programs
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

    from crosstrain.planner.model import FAMILIES, Layout, elementwise_bytes_per_token_layer, estimate

    platform = platform_of_chip(chip.name)
    if not available(platform):
        raise UserError("--aot: libtpu is not installed (pip install 'crosstrain[tpu]')" if platform == "tpu" else
                        "--aot: the CUDA plugin is not installed (pip install 'crosstrain[cuda]')")
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
    flash = model.attention in ("splash", "cudnn")
    lay = Layout(tp=tp, dp=dp // (1 if fsdp > 1 else cores), fsdp=fsdp // (cores if fsdp > 1 else 1),
                 microbatch=micro * cores, remat=remat, sequence_parallel=False)
    planner = estimate(model, chip, lay, global_batch=batch, flash=flash, implementation="crosstrain",
                       slice_chips=chips // slices if platform == "tpu" else None)
    planner_bytes = sum(v for k, v in planner.memory.items() if k != "reserved")
    # What the program may use of a chip: all of a TPU's HBM (XLA refuses more); on a GPU, the
    # device memory XLA sees times the fraction crosstrain's runtime gives XLA's allocator
    # (XLA_PYTHON_CLIENT_MEM_FRACTION, set to the planner's usable fraction: crosstrain/platform.py).
    capacity = chip.hbm_gib * GIB if platform == "tpu" else gpu_memory_bytes(chip.name) * FAMILIES["gpu"].usable
    out: dict[str, Any] = {
        "platform": platform,
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
        "capacity_gib": capacity / GIB,
        # The planner's one fused elementwise pass per layer and microbatch: what XLA's measured
        # traffic is divided by (xla_elementwise_passes, below).
        "planner_one_pass_gb_per_layer": elementwise_bytes_per_token_layer(
            model, lay, flash=flash, implementation="crosstrain") * micro * cores * cfg.model.seq_len / 1e9,
    }
    if planner_only:
        return out
    t0 = time.perf_counter()
    logs: list = []
    notes: list[str] = []
    try:
        compiled, _ = _compile(program, devices, logs, notes)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The compiler refuses a program that cannot fit: that is the answer, not a failure.
        refusal = _refusal(str(e))
        if refusal["xla_required_gib"] is not None:
            refusal["xla_required_gib"] *= cores  # XLA speaks per device; a v4 chip is two here
        return {**out, "fits": False, "memory_per_chip_gib": None, "planner_rel_error": None,
                "compile_s": time.perf_counter() - t0, "involuntary_rematerializations": 0, "rematerialized": [],
                **refusal}
    compile_s = time.perf_counter() - t0
    remats = [r for log in logs for r in log.rematerializations]
    full = {k: v * cores if k in ("bytes", "arguments", "flops") else v for k, v in _analysis(compiled).items()}
    del compiled
    result = {
        **out,
        "fits": full["bytes"] <= capacity,
        # XLA's GPU compiler compiles a program that cannot fit, saying only how far its
        # rematerialization got: that line is its refusal.
        "xla_error": next((m for log in logs for m in log.memory), None),
        "memory_per_chip_gib": full["bytes"] / GIB,
        "parameter_and_optimizer_gib": full["arguments"] / GIB,
        "planner_rel_error": (planner_bytes - full["bytes"]) / full["bytes"],
        "compile_s": compile_s,
        "involuntary_rematerializations": len(remats),
        "rematerialized": remats,
        "compile_notes": notes,
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
        result["xla_elementwise_gb_per_layer"] = moved / 1e9
        result["xla_elementwise_passes"] = moved / 1e9 / out["planner_one_pass_gb_per_layer"]
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
        result["xla_estimate_basis"] = (
            "none: XLA's GPU compiler gives no cost analysis (compiled.cost_analysis() is None)" if platform == "gpu"
            else f"XLA's cost analysis gives no optimal_seconds for {chip.name}")
    result["attention_note"] = {"splash": "XLA's estimate does not see inside the Splash kernel (a Mosaic custom call)",
                                "cudnn": "cuDNN's flash attention (custom calls in the HLO)"}.get(
        model.attention, "attention in XLA ops, inside XLA's estimate")
    return result
