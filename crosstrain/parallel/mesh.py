"""The device mesh: (slice, data, fsdp, tensor), sized from the config, checked before anything compiles.

`slice` is data parallelism across TPU slices (multi-slice: slices joined by the data-centre
network, DCN); the other three axes live inside a slice, on its ICI links."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from crosstrain.config import Config, MeshConfig
from crosstrain.errors import ConfigError

AXES = ("slice", "data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int
    tensor: int
    slice: int = 1

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (self.slice, self.data, self.fsdp, self.tensor)

    @property
    def batch_shards(self) -> int:
        """How many ways the global batch is split (slice x data x fsdp)."""
        return self.slice * self.data * self.fsdp


def resolve_shape(mesh: MeshConfig, n_devices: int) -> MeshShape:
    sizes = {k: getattr(mesh, k) for k in AXES}
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if n_devices % known:
            raise ConfigError(
                "mesh",
                f"{' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} does not divide the {n_devices} devices",
            )
        sizes[fill[0]] = n_devices // known
    product = int(np.prod(list(sizes.values())))
    if product != n_devices:
        raise ConfigError(
            "mesh",
            f"slice={sizes['slice']} x data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = {product}, "
            f"but there are {n_devices} devices",
        )
    return MeshShape(**sizes)


def check_model_fits_mesh(cfg: Config, shape: MeshShape) -> None:
    """Divisibility rules a mesh imposes on the model and batch (all raise before compiling)."""
    m = cfg.model
    if m.heads % shape.tensor:
        raise ConfigError("mesh.tensor", f"model.heads ({m.heads}) is not divisible by mesh.tensor ({shape.tensor})")
    if m.kv_heads % shape.tensor:
        raise ConfigError("mesh.tensor", f"model.kv_heads ({m.kv_heads}) is not divisible by mesh.tensor ({shape.tensor})")
    if m.hidden % shape.fsdp:
        raise ConfigError("mesh.fsdp", f"model.hidden ({m.hidden}) is not divisible by mesh.fsdp ({shape.fsdp}): "
                                       "FSDP shards every weight's model width")
    for key in ("ffn", "vocab"):
        if getattr(m, key) % shape.tensor:
            raise ConfigError("mesh.tensor", f"model.{key} ({getattr(m, key)}) is not divisible by mesh.tensor ({shape.tensor})")
    micro = cfg.train.batch // cfg.train.microbatches
    if micro % shape.batch_shards:
        raise ConfigError(
            "train.batch",
            f"the microbatch of {micro} sequences (train.batch / train.microbatches) is not divisible by the "
            f"data-parallel size mesh.slice x mesh.data x mesh.fsdp = {shape.batch_shards}",
        )


def slice_count(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices the devices span (1 where devices carry no slice index)."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def build_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if shape.slice > 1:
        # Hybrid mesh: the slice axis over the data-centre network, the rest inside each slice.
        if slice_count(devices) != shape.slice:
            raise ConfigError("mesh.slice", f"mesh.slice={shape.slice}, but the devices span {slice_count(devices)} slice(s)")
        from jax.experimental import mesh_utils

        ici = (1, shape.data, shape.fsdp, shape.tensor)
        dcn = (shape.slice, 1, 1, 1)
        try:
            arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
        except (ValueError, AssertionError, NotImplementedError):
            # Devices mesh_utils does not lay out (TPU v4 per TensorCore, as libtpu's topologies
            # give them): each slice in device order, slices stacked on the slice axis.
            by_slice: dict[int, list] = {}
            for d in devices:
                by_slice.setdefault(getattr(d, "slice_index", 0) or 0, []).append(d)
            arr = np.stack([np.asarray(sorted(ds, key=lambda d: d.id)).reshape(ici[1:])
                            for _, ds in sorted(by_slice.items())])
        return Mesh(arr, AXES)
    from jax.experimental import mesh_utils

    nodes = len({d.process_index for d in devices})
    if nodes > 1 and devices[0].platform.lower() in ("gpu", "cuda", "rocm"):
        # GPU nodes: NVLink inside a node, the scale-out network across nodes. The nodes go to
        # the outermost axes (data parallelism first), so the inner axes (tensor, fsdp) stay on
        # NVLink where they fit in a node, as multi-slice TPU keeps them on ICI.
        ici, dcn = _split_over_nodes(shape.sizes, nodes)
        try:
            return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, process_is_granule=True),
                        AXES)
        except (ValueError, AssertionError, NotImplementedError):
            pass
    try:
        # Topology-aware placement on TPU and GPU (neighbours on the fast axes).
        arr = mesh_utils.create_device_mesh(shape.sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:
        arr = np.asarray(devices).reshape(shape.sizes)
    return Mesh(arr, AXES)


def _split_over_nodes(sizes: Sequence[int], nodes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inside-a-node, across-nodes) factors of each mesh axis, the nodes taken by the outermost
    axes first."""
    remaining = nodes
    ici, dcn = [], []
    for size in sizes:
        across = math.gcd(size, remaining)
        remaining //= across
        dcn.append(across)
        ici.append(size // across)
    return tuple(ici), tuple(dcn)


# --------------------------------------------------------------------------------------------
# Mesh rules: the default layout per chip, chosen from the device kind (or by name with
# mesh.rule=NAME). A rule fills in only the mesh axes that the preset and --set leave unsaid, so
# an explicit mesh always wins. Recomputation is not a rule's: model.remat=auto picks the least
# that fits the planned memory on the mesh the rule chose (crosstrain/resolve.py).


@dataclass(frozen=True)
class MeshRule:
    name: str
    pattern: str  # regex on "<platform>:<device_kind>"
    data: int
    fsdp: int
    tensor: int
    why: str


MESH_RULES: tuple[MeshRule, ...] = (
    MeshRule("tpu-v4", r"^tpu:TPU v4", 1, -1, 1,
             "3D-torus ICI (600 GB/s per chip) makes the all-gathers of full FSDP cheap; no tensor parallelism needed below ~100B"),
    MeshRule("tpu-v5p", r"^tpu:TPU v5p?$|^tpu:TPU v5p", 1, -1, 1,
             "95 GiB and 1.2 TB/s ICI per chip: full FSDP over the slice, as MaxText and AXLearn run v5p"),
    MeshRule("tpu-v5e", r"^tpu:TPU v5 ?(lite|e)", 1, -1, 1,
             "only 16 GB HBM per chip: shard everything over the 2D torus (model.remat=auto then picks the "
             "least recomputation that fits)"),
    MeshRule("tpu-v6e", r"^tpu:TPU v6", 1, -1, 1,
             "32 GB HBM against 918 TFLOP/s: full FSDP over the slice (model.remat=auto then picks the least "
             "recomputation that fits)"),
    MeshRule("trn1", r"(?i)trn1|trainium1?$|NC_v2", 1, -1, 2,
             "tensor parallelism over the 2 NeuronCores of a chip (on-chip bandwidth), FSDP across chips over NeuronLink"),
    MeshRule("trn2", r"(?i)trn2|trainium2|NC_v3", 1, -1, 4,
             "tensor parallelism over a chip's 4 logical NeuronCores (LNC=2), FSDP across chips on the NeuronLink torus"),
    MeshRule("gpu", r"^gpu:.*(A100|H100|H200|B200)", -1, 8, 1,
             "FSDP inside an 8-GPU NVLink node, data parallelism across nodes so only gradients cross InfiniBand/EFA"),
    MeshRule("cpu", r"^cpu:", -1, 1, 1,
             "host devices share one memory: plain data parallelism"),
)


def rule_names() -> list[str]:
    return [r.name for r in MESH_RULES]


def select_rule(name: str, device) -> MeshRule | None:
    if name == "none":
        return None
    if name != "auto":
        for rule in MESH_RULES:
            if rule.name == name:
                return rule
        raise ConfigError("mesh.rule", f"unknown rule '{name}' (known: auto, none, {', '.join(rule_names())})")
    key = f"{device.platform}:{getattr(device, 'device_kind', '')}"
    for rule in MESH_RULES:
        if re.search(rule.pattern, key):
            return rule
    return None


def apply_mesh_rule(cfg: Config, devices: Sequence[jax.Device]) -> tuple[Config, MeshRule | None]:
    """The config with the selected rule's mesh axes filled in where unset."""
    rule = select_rule(cfg.mesh.rule, devices[0])
    if rule is None:
        return cfg, None
    n = len(devices)
    sizes = {a: getattr(cfg.mesh, a) for a in AXES if f"mesh.{a}" in cfg.explicit}
    if "slice" not in sizes:
        # Devices that span slices: data parallelism across them, everything else inside one.
        sizes["slice"] = slice_count(devices)
    fixed = int(np.prod([v for v in sizes.values() if v != -1])) if sizes else 1
    remaining = n // fixed if fixed and n % fixed == 0 else n
    has_fill = any(v == -1 for v in sizes.values())
    for axis in ("tensor", "fsdp", "data"):  # innermost first: fast axes get the fast links
        if axis in sizes:
            continue
        want = getattr(rule, axis)
        if want == -1:
            sizes[axis] = 1 if has_fill else -1
            has_fill = True
        else:
            sizes[axis] = math.gcd(want, remaining)  # fewer devices than the rule wants: shrink
            remaining //= sizes[axis]
    return cfg.override(mesh=sizes), rule
