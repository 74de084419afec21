"""Ahead-of-time compilation of crosstrain's real train step for a TPU topology, on this machine.

libtpu (the `tpu` extra) compiles for TPU devices that are not present: the compiled program
reports XLA's per-chip memory (arguments + temporaries + outputs not aliased to donated inputs) and
FLOPs. A full-size model may take long to compile, so the step is compiled as a proxy with 1 and 2
layers (a scanned layer is compiled once whatever the depth) on a topology of at most 64 chips, and
the memory is extrapolated linearly in the number of layers; the planner is evaluated on exactly
that proxy program, so the two numbers compare like with like.
"""

from __future__ import annotations

import dataclasses
import math
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


def compile_step(cfg: Config, chip: Chip, parallelism: dict[str, int], chips: int, remat: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from crosstrain.config import config_from_dict
    from crosstrain.parallel.rules import activate
    from crosstrain.planner.model import Layout, estimate
    from crosstrain.train.loop import abstract_train_state, make_setup
    from crosstrain.train.step import make_train_step

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
    results = {}
    for layers in (1, 2):
        raw = cfg.to_dict()
        raw["model"].update({"layers": layers, "remat": remat})
        raw["train"].update({"batch": batch, "microbatches": 1})
        raw["mesh"] = {**mesh, "rule": "none"}
        raw["data"] = {}
        proxy = config_from_dict(raw)
        setup = make_setup(proxy, devices)
        with activate(setup.mesh):
            step = jax.jit(make_train_step(proxy), in_shardings=(setup.state_shardings, setup.batch_sharding, setup.replicated),
                           out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=(0,))
            batch_struct = jax.ShapeDtypeStruct((batch, proxy.model.seq_len + 1), jnp.int32, sharding=setup.batch_sharding)
            compiled = step.lower(abstract_train_state(setup), batch_struct, jax.ShapeDtypeStruct((), jnp.int32)).compile()
        ma = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        total = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
        results[layers] = (total, ma.argument_size_in_bytes, float(cost.get("flops", 0.0)))
    per_layer = results[2][0] - results[1][0]
    L = cfg.model.layers
    memory = results[1][0] + (L - 1) * per_layer
    lay = Layout(tp=mesh["tensor"], dp=mesh["data"], fsdp=mesh["fsdp"], microbatch=micro, remat=remat, sequence_parallel=False)
    proxy_cfg = dataclasses.replace(cfg.model, remat=remat)
    planner = estimate(proxy_cfg, chip, lay, global_batch=batch, flash=False, implementation="crosstrain")
    planner_bytes = sum(v for k, v in planner.memory.items() if k != "reserved")
    return {
        "topology": topo_name,
        "proxy": f"{n} chips, mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}, {micro} sequences "
                 f"per rank, 1 and 2 layers extrapolated to {L}",
        "memory_per_chip_gib": memory / GIB,
        "memory_one_layer_gib": results[1][0] / GIB,
        "memory_per_layer_gib": per_layer / GIB,
        "parameter_and_optimizer_gib": (results[1][1] + (L - 1) * (results[2][1] - results[1][1])) / GIB,
        "flops_per_chip_one_layer_program": results[1][2],
        "planner_memory_per_chip_gib": planner_bytes / GIB,
        "planner_rel_error": (planner_bytes - memory) / memory,
        "fits": memory <= chip.hbm_gib * GIB,
        "capacity_gib": chip.hbm_gib,
    }
