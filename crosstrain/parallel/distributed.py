"""Many processes: `jax.distributed` set-up and `crosstrain launch` for localhost.

A process joins a multi-process job when told how (flags or CROSSTRAIN_* variables) or when it
runs under a cluster JAX detects itself (Cloud TPU multi-host slices, SLURM, Open MPI). It must
happen before JAX touches a device, so the CLI calls `initialize` first thing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from crosstrain.errors import UserError

log = logging.getLogger("crosstrain")

ENV_COORDINATOR = "CROSSTRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "CROSSTRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "CROSSTRAIN_PROCESS_ID"
ENV_CPU_DEVICES = "CROSSTRAIN_CPU_DEVICES"
ENV_HEARTBEAT = "CROSSTRAIN_HEARTBEAT_S"

# A peer that stops answering is declared dead after this many seconds without a heartbeat
# (JAX's default is 100 s), and then every other process is stopped by the coordination service;
# a process at its end waits at most SHUTDOWN_S for the others that are still alive: JAX's own
# default, 300 s. A process that fails does not wait there (`abandon`): its peers are most likely
# stuck in a collective waiting for it. (A "late" process 0 at this barrier was once such a case:
# process 1 had failed in a checkpoint save, process 0 waited in the save's collective.)
HEARTBEAT_S = 15
SHUTDOWN_S = 300


@dataclass(frozen=True)
class ProcessSpec:
    coordinator: Optional[str] = None
    num_processes: int = 1
    process_id: int = 0
    cpu_devices: Optional[int] = None


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}: expected an integer, got {value!r}") from None


def spec_from(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
              process_id: Optional[int] = None, cpu_devices: Optional[int] = None) -> ProcessSpec:
    """Flags first, then CROSSTRAIN_* environment variables."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    cpus = cpu_devices if cpu_devices is not None else _env_int(ENV_CPU_DEVICES)
    num = 1 if num is None else num
    pid = 0 if pid is None else pid
    if num < 1:
        raise UserError(f"--num-processes: must be >= 1, got {num}")
    if not 0 <= pid < num:
        raise UserError(f"--process-id: must be in [0, {num}), got {pid}")
    if num > 1 and not coordinator:
        raise UserError("--coordinator: a multi-process run needs the coordinator's host:port")
    if cpus is not None and cpus < 1:
        raise UserError(f"--cpu-devices: must be >= 1, got {cpus}")
    return ProcessSpec(coordinator, num, pid, cpus)


def _cluster_detected() -> bool:
    """Environments where jax.distributed.initialize() finds its peers by itself."""
    env = os.environ
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


_JOINED = False


def joined() -> bool:
    """Whether this process has joined a multi-process job (jax.distributed is up)."""
    return _JOINED


def abandon(code: int) -> None:
    """End a process of a multi-process job that failed, now, with `code`: not through JAX's
    shutdown barrier at interpreter exit. The others are most likely waiting for this one in a
    collective and will never reach that barrier, so the failure would sit there for SHUTDOWN_S
    unseen. Leaving at once, the launcher or the scheduler sees the status at once, and the
    coordination service ends the others within HEARTBEAT_S. A save in flight is left unsealed,
    which the next start clears."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def initialize(spec: ProcessSpec) -> None:
    global _JOINED
    import jax

    if spec.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", spec.cpu_devices)
    if spec.num_processes > 1 or _cluster_detected():
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):
            pass  # newer JAX picks a CPU collectives backend by itself
    if spec.num_processes > 1:
        jax.distributed.initialize(spec.coordinator, num_processes=spec.num_processes, process_id=spec.process_id,
                                   **_timeouts())
        _JOINED = True
    elif _cluster_detected():
        # SLURM, Open MPI or a multi-host Cloud TPU slice: JAX reads the coordinator, the process
        # count and this process's rank from the cluster's own environment.
        jax.distributed.initialize(**_timeouts())
        _JOINED = True


def finish() -> None:
    """End this process's part in a multi-process job as soon as its work is done: JAX's shutdown
    barrier now, not at interpreter exit (where JAX registers it, after Python has joined the
    process's threads and run its other hooks). A no-op without jax.distributed."""
    import jax

    global _JOINED
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    _JOINED = False


def _timeouts() -> dict[str, int]:
    heartbeat = _env_int(ENV_HEARTBEAT) or HEARTBEAT_S
    if heartbeat < 1:
        raise UserError(f"{ENV_HEARTBEAT}: must be >= 1 second, got {heartbeat}")
    return {"heartbeat_timeout_seconds": heartbeat, "shutdown_timeout_seconds": max(SHUTDOWN_S, 2 * heartbeat)}


# --------------------------------------------------------------------------------------------
# crosstrain launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_forced_device_count(flags: str) -> str:
    return " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))


def launch(command: Sequence[str], *, processes: int, devices_per_process: Optional[int], port: Optional[int] = None,
           grace_s: float = 10.0, process_caches: Optional[str] = None) -> int:
    """Run `crosstrain <command>` as `processes` local processes joined through 127.0.0.1.

    Output lines are forwarded with a `[pI]` prefix. If one process fails, the others are ended
    and its exit status is returned; SIGINT/SIGTERM to the launcher are passed on.
    `process_caches`: a folder under which each process gets its own $CROSSTRAIN_CACHE (p0, p1, ...)
    and working directory, sharing no local directory, as processes on separate hosts do.
    """
    if processes < 1:
        raise UserError(f"--processes: must be >= 1, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise UserError(f"--devices-per-process: must be >= 1, got {devices_per_process}")
    if not command:
        raise UserError("launch: give the crosstrain command to run after --, e.g. -- train --preset tiny ...")
    if command[0] == "launch":
        raise UserError("launch: the command to launch cannot itself be launch")
    port = port or free_port()
    children: list[subprocess.Popen] = []
    lock = threading.Lock()

    def pump(i: int, stream) -> None:
        for line in iter(stream.readline, ""):
            with lock:
                sys.stdout.write(f"[p{i}] {line}")
                sys.stdout.flush()
        stream.close()

    for i in range(processes):
        env = dict(os.environ)
        env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes), ENV_PROCESS_ID: str(i)})
        if devices_per_process is not None:
            env[ENV_CPU_DEVICES] = str(devices_per_process)
            env["XLA_FLAGS"] = _strip_forced_device_count(env.get("XLA_FLAGS", ""))
        env["PYTHONUNBUFFERED"] = "1"
        cwd = None
        if process_caches:
            own = os.path.join(os.path.abspath(process_caches), f"p{i}")
            os.makedirs(own, exist_ok=True)
            env["CROSSTRAIN_CACHE"], cwd = own, own
        child = subprocess.Popen(
            [sys.executable, "-m", "crosstrain", *command], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd,
        )
        children.append(child)
    pumps = [threading.Thread(target=pump, args=(i, c.stdout), daemon=True) for i, c in enumerate(children)]
    for t in pumps:
        t.start()

    def end_all(sig=signal.SIGTERM) -> None:
        for c in children:
            if c.poll() is None:
                try:
                    os.killpg(c.pid, sig)
                except ProcessLookupError:
                    pass

    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        end_all(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed and status == 0:
                i, status = failed[0]
                with lock:
                    sys.stdout.write(f"[launch] process {i} exited with status {status}; ending the others\n")
                end_all(signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                while any(c.poll() is None for c in children) and time.monotonic() < deadline:
                    time.sleep(0.05)
                end_all(signal.SIGKILL)
            if all(code is not None for code in (c.poll() for c in children)):
                break
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    if status < 0:  # killed by a signal
        status = 128 - status
    if received and status == 0:
        status = 128 + received[0]
    return status
