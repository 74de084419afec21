"""The AFM-style decoder: parameter table (params.py), layers (transformer.py), kernels (attention.py)."""

from crosstrain.model.params import (
    count_params,
    init_params,
    param_axes,
    param_shapes,
    param_specs,
    params_sha256,
)
from crosstrain.model.transformer import decoder, forward, init_cache, loss_fn, output_logits, token_losses

__all__ = [
    "count_params",
    "decoder",
    "forward",
    "init_cache",
    "init_params",
    "loss_fn",
    "output_logits",
    "param_axes",
    "param_shapes",
    "param_specs",
    "params_sha256",
    "token_losses",
]
