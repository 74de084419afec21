"""Logical axis names -> mesh axes.

Model code names the axes of its arrays (`embed`, `mlp`, `heads`, ...) and never a mesh axis. This
table decides where each logical axis lives on the mesh (`slice`, `data`, `fsdp`, `tensor`):

- `batch` over slice x data x fsdp: every data-parallel and FSDP rank takes its own part of the
  batch (`slice` is data parallelism across TPU slices, over the data-centre network).
- `embed` (the model width of weights) over fsdp: ZeRO-3 style sharding of parameters and
  optimizer state; XLA all-gathers a layer's weights before use and reduce-scatters its grads.
- `heads`, `kv_heads`, `mlp`, `vocab` over tensor: Megatron-style tensor parallelism (column
  parallel in, row parallel out, one all-reduce per block in forward and backward).
- everything else (`length`, `head_dim`, `layers`, `norm`, `act_embed`) replicated.

Activations use `act_embed` for their model width so that FSDP shards weights, not activations.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[Optional[str], ...]

DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("slice", "data", "fsdp"),
    "embed": "fsdp",
    "act_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "length": None,
    "head_dim": None,
    "layers": None,
    "norm": None,
}

_ACTIVE: contextvars.ContextVar[Optional[tuple[Mesh, dict]]] = contextvars.ContextVar(
    "crosstrain_mesh_rules", default=None
)


def logical_to_spec(axes: Sequence[Optional[str]], rules: dict | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry these logical names.

    Mesh axes of size 1 are dropped, and a mesh axis is never used twice in one spec.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes: Sequence[Optional[str]], rules: dict | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: dict | None = None) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, DEFAULT_RULES if rules is None else rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Optional[tuple[Mesh, dict]]:
    """The (mesh, rules) of the enclosing `activate`, or None (for kernels run under shard_map)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """A sharding constraint at a layer boundary; a no-op when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, rules))
