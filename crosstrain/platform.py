"""Platform choices that must happen before JAX is imported (no JAX import here): the CPU when libtpu
is installed without TPUs, and glibc's huge pages (the entry point, crosstrain/entry.py, restarts
the program with them)."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


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
