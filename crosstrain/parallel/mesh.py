"""The device mesh: (data, fsdp, tensor), sized from the config, checked before anything compiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from crosstrain.config import Config, MeshConfig
from crosstrain.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int
    tensor: int

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def batch_shards(self) -> int:
        """How many ways the global batch is split (data x fsdp)."""
        return self.data * self.fsdp


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
            f"data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = {product}, "
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
    micro = cfg.train.batch // cfg.train.microbatches
    if micro % shape.batch_shards:
        raise ConfigError(
            "train.batch",
            f"the microbatch of {micro} sequences (train.batch / train.microbatches) is not divisible by the "
            f"data-parallel size mesh.data x mesh.fsdp = {shape.batch_shards}",
        )


def build_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    try:
        # Topology-aware placement on TPU and GPU (neighbours on the fast axes).
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape.sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:
        arr = np.asarray(devices).reshape(shape.sizes)
    return Mesh(arr, AXES)
