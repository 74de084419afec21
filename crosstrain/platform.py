"""Platform choices that must happen before JAX is imported (no JAX import here): only the
accelerators whose hardware is present, when their plugins are installed without it, and glibc's
huge pages (the entry point, crosstrain/entry.py, restarts the program with them)."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


# The share of a GPU's memory that crosstrain gives XLA's allocator on NVIDIA GPUs (JAX's own
# default is 0.75), and the share the planner calls usable.
GPU_MEMORY_FRACTION = 0.92

# Accelerator plugins JAX may load, and how to tell whether their hardware is on this machine.
_PLUGINS = {
    "tpu": ("libtpu",),
    "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin"),
    "rocm": ("jax_rocm60_plugin", "jax_rocm7_plugin"),
}


def _installed(platform_name: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in _PLUGINS[platform_name])


def _present(platform_name: str) -> bool:
    dev = Path("/dev")
    if platform_name == "tpu":
        return any(dev.glob("accel*")) or (dev / "vfio").is_dir()
    if platform_name == "cuda":
        return any(dev.glob("nvidia[0-9]*")) or any(Path("/proc/driver/nvidia/gpus").glob("*"))
    return (dev / "kfd").exists()


def skip_absent_accelerators() -> None:
    """Choose the platforms JAX probes, when the user chose none (JAX_PLATFORMS unset).

    The `tpu` and `cuda` extras install libtpu and the CUDA plugin so that crosstrain can compile
    for TPU and GPU clusters on any machine (`plan --aot`). On a machine without that hardware,
    JAX's backend probe would print libtpu's warnings and the CUDA plugin's traceback (cuInit
    fails) at every start: use only the accelerators whose hardware is here, plus the CPU.
    Ahead-of-time compiles ask for their topology explicitly and need no probe. On a machine with
    NVIDIA GPUs, XLA's allocator gets GPU_MEMORY_FRACTION of their memory unless the user set it."""
    if _present("cuda") and not any(k in os.environ for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                               "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                               "XLA_PYTHON_CLIENT_ALLOCATOR")):
        # JAX gives XLA's allocator 75% of a GPU's memory by default; the planner plans against
        # GPU_MEMORY_FRACTION of it (what `plan` and `plan --aot` call usable).
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(GPU_MEMORY_FRACTION)
    if os.environ.get("JAX_PLATFORMS"):
        return
    installed = [name for name in _PLUGINS if _installed(name)]
    absent = [name for name in installed if not _present(name)]
    if not absent:
        return
    os.environ["JAX_PLATFORMS"] = ",".join([name for name in installed if name not in absent] + ["cpu"])


def huge_pages_active() -> bool:
    return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_huge_pages(argv: Sequence[str]) -> None:
    """Restart this process (same pid, `exec`) as `sys.executable *argv` with glibc's malloc
    asking for transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), unless already set,
    not Linux/glibc, or CROSSTRAIN_HUGE_PAGES=0.

    XLA's CPU runtime allocates each step's large temporaries afresh; on 4 KiB pages every step
    then pays page faults and TLB misses over hundreds of MB, and the GEMMs slow down (what
    huge pages are worth to a step, measured: docs/performance.md).
    glibc reads its tunables only at start-up, hence the restart; it must run before anything
    heavy is imported."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("CROSSTRAIN_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb=" in tunables:
        return  # off, or the user's own hugetlb setting (which we keep, whatever its value)
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE)
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError:
        return  # run on without; nothing is lost but speed
