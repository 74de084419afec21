"""Ahead-of-time compilation of crosstrain's real train step for a TPU topology, on this machine.

libtpu (the `tpu` extra) compiles for TPU devices that are not present: the compiled program
reports XLA's per-chip memory (arguments + temporaries + outputs not aliased to donated inputs) and
FLOPs. The step is compiled at the model's real depth with scanned layers (the layer body compiles
once whatever the depth, so this costs no more than a shallow proxy; 1- and 2-layer programs were
tried and XLA's buffer assignment is not linear enough at small depths to extrapolate from them),
and again one layer shallower for the per-layer figure, on a slice of at most 64 chips with the
plan's per-rank batch. The planner is evaluated on exactly that program, so the two numbers
compare like with like.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from crosstrain.config import Config
from crosstrain.errors import UserError
from crosstrain.hardware import GIB, Chip

TOPOLOGIES = {  # chips -> topology name, per TPU generation (small slices that compile quickly)
    "tpu-v4": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"},
    "tpu-v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"},
    "tpu-v5e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
    "tpu-v6e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
}
PREFIX = {"tpu-v4": "v4", "tpu-v5p": "v5p", "tpu-v5e": "v5e", "tpu-v6e": "v6e"}


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def _proxy_mesh(parallelism: dict[str, int], chips: int) -> tuple[int, dict[str, int]]:
    """A crosstrain mesh on at most 64 chips with the plan's tensor parallelism and batch split."""
    tp = parallelism.get("tp", 1)
    n = min(chips, 64)
    n = max(tp, 4, 2 ** int(math.log2(max(n, 1))))
    fsdp = n // tp if parallelism.get("fsdp", 1) > 1 else 1
    data = n // (tp * fsdp)
    return n, {"data": data, "fsdp": fsdp, "tensor": tp}


def _refusal(message: str) -> dict[str, Any]:
    """What XLA said it needed when it refused to compile, e.g. "... the total memory required for
    HLO temporaries (153.67G) exceeds available HBM (95.74G)"."""
    found = re.search(r"required for ([^(]*)\(([\d.]+)([KMGT])", message)
    if not found:
        return {"xla_required_gib": None, "xla_error": message.strip().splitlines()[0][:200]}
    need = float(found.group(2)) * 1024 ** ("KMGT".index(found.group(3)) - 2)
    return {"xla_required_gib": need,
            "xla_error": f"{found.group(1).strip()} need {need:.2f} GiB, more than the chip's HBM"}


def compile_step(cfg: Config, chip: Chip, parallelism: dict[str, int], chips: int, remat: str) -> dict[str, Any]:
    import jax
    from jax.experimental import topologies

    from crosstrain.config import config_from_dict
    from crosstrain.parallel.rules import activate
    from crosstrain.planner.model import Layout, estimate
    from crosstrain.train.loop import abstract_train_state, compile_train_step, make_setup

    if chip.name not in TOPOLOGIES:
        raise UserError(f"--aot: ahead-of-time compilation is for TPU chips ({', '.join(TOPOLOGIES)}), not {chip.name}")
    if not available():
        raise UserError("--aot: libtpu is not installed (pip install 'crosstrain[tpu]')")
    if parallelism.get("pp", 1) > 1 or parallelism.get("cp", 1) > 1:
        raise UserError("--aot: crosstrain's train step has no pipeline or context parallelism; plan with pp=1, cp=1")
    n, mesh = _proxy_mesh(parallelism, chips)
    topo_name = f"{PREFIX[chip.name]}:{TOPOLOGIES[chip.name][n]}"
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo_name).devices
    per_rank = cfg.train.batch // max(1, parallelism.get("dp", 1) * parallelism.get("fsdp", 1))
    micro = parallelism.get("microbatch", per_rank)
    ranks = mesh["data"] * mesh["fsdp"]
    batch = micro * ranks
    L = cfg.model.layers
    lay = Layout(tp=mesh["tensor"], dp=mesh["data"], fsdp=mesh["fsdp"], microbatch=micro, remat=remat, sequence_parallel=False)
    planner = estimate(dataclasses.replace(cfg.model, remat=remat), chip, lay, global_batch=batch, flash=False,
                       implementation="crosstrain")
    planner_bytes = sum(v for k, v in planner.memory.items() if k != "reserved")
    out: dict[str, Any] = {
        "topology": topo_name,
        "proxy": f"{n} chips, mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}, {micro} sequences "
                 f"per rank, {L} scanned layers, remat {remat}",
        "planner_memory_per_chip_gib": planner_bytes / GIB,
        "capacity_gib": chip.hbm_gib,
    }
    results = {}
    for layers in (L, L - 1) if L > 1 else (1, 2):
        raw = cfg.to_dict()
        # Compile what a TPU would run: scanned layers, the TPU's attention choice and activation
        # dtype rather than this CPU host's "auto" picks.
        raw["model"].update({"layers": layers, "remat": remat, "scan_layers": True})
        if raw["model"].get("attention", "auto") == "auto":
            raw["model"]["attention"] = "reference"
        if raw["model"].get("activation_dtype", "auto") == "auto":
            raw["model"]["activation_dtype"] = raw["model"]["compute_dtype"]
        if raw["model"].get("dot_transposes", "auto") == "auto":
            raw["model"]["dot_transposes"] = "fold"
        raw["train"].update({"batch": batch, "microbatches": 1})
        raw["mesh"] = {**mesh, "rule": "none"}
        raw["data"] = {}
        proxy = config_from_dict(raw)
        setup = make_setup(proxy, devices)
        with activate(setup.mesh):
            try:
                compiled = compile_train_step(proxy, setup, abstract_train_state(setup))
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                # The compiler refuses a program that cannot fit: that is the answer, not a failure.
                return {**out, "fits": False, "memory_per_chip_gib": None, "planner_rel_error": None,
                        **_refusal(str(e))}
        ma = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        total = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
        results[layers] = (total, ma.argument_size_in_bytes, float(cost.get("flops", 0.0)))
    deeper, shallower = max(results), min(results)
    memory = results[L][0]
    return {
        **out,
        "memory_per_chip_gib": memory / GIB,
        "memory_per_layer_gib": (results[deeper][0] - results[shallower][0]) / GIB,
        "parameter_and_optimizer_gib": results[L][1] / GIB,
        "flops_per_chip": results[L][2],
        "planner_rel_error": (planner_bytes - memory) / memory,
        "fits": memory <= chip.hbm_gib * GIB,
    }
