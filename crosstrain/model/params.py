"""The parameter pytree: shapes, logical axes and initialisation from one table.

Per-layer weights are stacked on a leading `layers` axis so the decoder can `lax.scan` over them.
Every leaf has a `ParamSpec` naming its logical axes; `parallel/rules.py` maps those to the mesh.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from crosstrain.config import ModelConfig, dtype_of

Params = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str  # "normal" | "ones"
    std: float = 0.0


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    L, d, h, kv, hd, f, v = cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn, cfg.vocab
    # Fan-in scaled normal init; the two projections back into the residual stream are further
    # scaled by 1/sqrt(2 * layers) (GPT-2) so the stream's variance does not grow with depth.
    depth = 1.0 / math.sqrt(2 * L)
    layers = {
        "attn_norm": ParamSpec((L, d), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, d, h, hd), ("layers", "embed", "heads", "head_dim"), "normal", d**-0.5),
        "wk": ParamSpec((L, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal", d**-0.5),
        "wv": ParamSpec((L, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal", d**-0.5),
        "wo": ParamSpec((L, h, hd, d), ("layers", "heads", "head_dim", "embed"), "normal", (h * hd) ** -0.5 * depth),
        "mlp_norm": ParamSpec((L, d), ("layers", "norm"), "ones"),
        "w_gate": ParamSpec((L, d, f), ("layers", "embed", "mlp"), "normal", d**-0.5),
        "w_up": ParamSpec((L, d, f), ("layers", "embed", "mlp"), "normal", d**-0.5),
        "w_down": ParamSpec((L, f, d), ("layers", "mlp", "embed"), "normal", f**-0.5 * depth),
    }
    if cfg.qk_norm:
        layers["q_norm"] = ParamSpec((L, hd), ("layers", "norm"), "ones")
        layers["k_norm"] = ParamSpec((L, hd), ("layers", "norm"), "ones")
    specs: dict[str, Any] = {
        # With tied embeddings this matrix is also the output projection, so its scale is chosen
        # for the logits: std 1/sqrt(hidden) gives unit-variance logits at init.
        "embed": ParamSpec((v, d), ("vocab", "embed"), "normal", d**-0.5),
        "layers": layers,
        "final_norm": ParamSpec((d,), ("norm",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"), "normal", d**-0.5)
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """The tree of logical axes, same structure as the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    dtype = dtype_of(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec)


def _path_seed(path: tuple) -> int:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Fresh parameters. Each leaf's RNG derives from its path, so adding a leaf never changes
    the others. Traceable: wrap in jit with out_shardings to initialise directly sharded."""
    dtype = dtype_of(cfg.param_dtype)

    def make(path, spec: ParamSpec):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        k = jax.random.fold_in(key, _path_seed(path))
        return (spec.std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, param_specs(cfg), is_leaf=_is_spec)


def count_params(cfg: ModelConfig) -> int:
    leaves = jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec)
    return int(sum(np.prod(s.shape) for s in leaves))


def params_sha256(params: Params) -> str:
    """SHA-256 over every parameter's bytes, leaves in sorted path order.

    Bytes are taken in host order; every platform JAX runs on is little-endian."""
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
