"""Platform choice that must happen before JAX is imported (no JAX import here)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def skip_absent_tpu() -> None:
    """With libtpu installed (the `tpu` extra, for ahead-of-time TPU compiles) on a machine without
    TPU devices, JAX's backend probe prints libtpu warnings and waits; use the CPU directly. Only
    when the user chose no platform and no CUDA plugin is installed."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if any(Path("/dev").glob("accel*")) or Path("/dev/vfio").is_dir():
        return
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
