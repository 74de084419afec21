"""`crosstrain bench`: measure the real train step on the present hardware.

Compile time; steady-state step time (median of timed windows after warm-up, each window ending in
a device sync, so asynchronous dispatch is measured as it runs in training); tokens/s; achieved
model FLOP/s and MFU against the catalog peak; this machine's large-matmul ceiling measured in the
same run (fp32 and bf16 inputs with fp32 accumulation) and the fraction of it achieved; host
overhead per step (time to dispatch a step, during which the host prepares nothing else); data
wait per step (time to take the next batch from the prefetching iterator); and the planner's
predicted step time for this device beside the measured one.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from crosstrain import hardware
from crosstrain.config import Config
from crosstrain.data.pipeline import build_pipeline
from crosstrain.flops import CONVENTION_NOTE, CROSSTRAIN_CONVENTION, flops_per_token
from crosstrain.parallel.mesh import apply_mesh_rule
from crosstrain.parallel.rules import activate
from crosstrain.platform import huge_pages_active
from crosstrain.runtime import (
    compile_train_step,
    computed,
    global_batch_array,
    init_train_state,
    make_setup,
    process_rows,
    total_peak_flops,
)


def predicted_step_time(cfg: Config, setup, devices) -> tuple[float | None, str]:
    from crosstrain.planner.model import Layout, estimate

    chip = hardware.detect_chip(devices[0])
    if chip is None:
        return None, "device not in the catalog"
    shape = setup.mesh.shape
    ranks = shape["data"] * shape["fsdp"]
    lay = Layout(tp=shape["tensor"], dp=shape["data"], fsdp=shape["fsdp"], remat=cfg.model.remat,
                 microbatch=cfg.train.batch // cfg.train.microbatches // ranks, sequence_parallel=False)
    if chip.name == "cpu":
        # The CPU's peak is the whole machine's, however many host devices are forced.
        lay = Layout(remat=cfg.model.remat, microbatch=cfg.train.batch // cfg.train.microbatches, sequence_parallel=False)
    est = estimate(cfg.model, chip, lay, global_batch=cfg.train.batch, flash=cfg.model.attention in ("splash", "cudnn"),
                   compute_dtype=cfg.model.compute_dtype,
                   implementation="crosstrain")
    return est.step_time_s, f"planner, {chip.name} family constants"


def bench(cfg: Config, *, steps: int = 20, warmup: int = 3, window: int = 4, profile: Path | None = None) -> dict[str, Any]:
    """Time the train step. With `profile`, the timed windows are traced with jax.profiler into
    that folder (XProf / TensorBoard's profile plugin, and a Perfetto trace)."""
    devices = jax.devices()
    cfg, _ = apply_mesh_rule(cfg, devices)
    setup = make_setup(cfg, devices)
    asked, cfg = cfg, setup.cfg  # every model `auto` resolved for these devices
    m, t = cfg.model, cfg.train
    tokens_per_step = t.batch * m.seq_len
    # On a CPU the matmul ceiling is also MFU's peak: measured once here and cached, so the report
    # has one figure for both (total_peak_flops reads the cache).
    ceiling = (hardware.cpu_matmul_ceiling(refresh=True) if devices[0].platform == "cpu"
               else hardware.measure_matmul_ceiling())
    with activate(setup.mesh):
        pipeline = build_pipeline(cfg, write_files=False)
        rows = process_rows(setup)
        batches = pipeline.batches(rows)
        state = init_train_state(setup)
        t0 = time.perf_counter()
        compiled = compile_train_step(cfg, setup, state)
        compile_s = time.perf_counter() - t0

        def run(n: int) -> tuple[float, float, float, float]:
            nonlocal state
            wait = fetch = dispatch = 0.0
            start = time.perf_counter()
            metrics = None
            for _ in range(n):
                w0 = time.perf_counter()
                index = int(batches.get_state()["next_index"])
                batch = global_batch_array(setup, next(batches))
                w1 = time.perf_counter()
                # Data wait: batch time the device was idle for (nothing dispatched still running).
                if metrics is None or computed(metrics):
                    wait += w1 - w0
                state, metrics = compiled(state, batch, jnp.int32(index))
                w2 = time.perf_counter()
                fetch += w1 - w0
                dispatch += w2 - w1
            jax.block_until_ready(metrics)
            return (time.perf_counter() - start) / n, wait / n, dispatch / n, fetch / n

        run(warmup)
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(profile), create_perfetto_trace=True)
        try:
            windows = [run(window) for _ in range(max(1, steps // window))]
        finally:
            if profile is not None:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
    step_time = statistics.median(w[0] for w in windows)
    data_wait = statistics.median(w[1] for w in windows)
    host = statistics.median(w[2] for w in windows)
    data_fetch = statistics.median(w[3] for w in windows)
    fpt = flops_per_token(m)
    achieved = fpt * tokens_per_step / step_time
    peak, peak_note = total_peak_flops(devices, m.compute_dtype)
    key = "bf16" if m.compute_dtype == "bfloat16" else "fp32"
    predicted, predicted_note = predicted_step_time(cfg, setup, devices)
    return {
        "tokens_per_s": tokens_per_step / step_time,
        "step_time_s": step_time,
        "tokens_per_step": tokens_per_step,
        "compile_s": compile_s,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "mfu_note": peak_note,
        "matmul_ceiling_tflops": ceiling,
        "fraction_of_matmul_ceiling": achieved / (ceiling[key] * 1e12),
        "host_overhead_s": host,
        "host_overhead_fraction": host / step_time,
        "data_wait_s": data_wait,
        "data_wait_fraction": data_wait / step_time,
        "data_fetch_s": data_fetch,
        "predicted_step_time_s": predicted,
        "predicted_note": predicted_note,
        "flops_per_token": fpt,
        "attention_flops": CROSSTRAIN_CONVENTION,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "cpu_model": hardware.cpu_model(),
        # glibc's transparent huge pages for this process (crosstrain/platform.py); what they are
        # worth to a CPU step: docs/performance.md.
        "huge_pages": huge_pages_active(),
        "timed_steps": len(windows) * window,
        "profile": str(profile) if profile is not None else None,
        "resolved": setup.resolved.to_dict(),
        "config": asked.to_dict(),
    }


def describe(r: dict[str, Any]) -> str:
    c = r["matmul_ceiling_tflops"]
    lines = [
        f"step {r['step_time_s'] * 1e3:.1f} ms ({r['timed_steps']} timed steps), {r['tokens_per_s']:,.0f} tokens/s, "
        f"compile {r['compile_s']:.1f} s",
        f"model FLOP/s {r['achieved_tflops'] * 1e3:.1f} GFLOP/s = {100 * r['fraction_of_matmul_ceiling']:.0f}% of this "
        f"machine's matmul ceiling (fp32 {c['fp32'] * 1e3:.0f}, bf16 {c['bf16'] * 1e3:.0f} GFLOP/s)",
        f"MFU {100 * r['mfu']:.1f}% ({r['mfu_note']}; {CONVENTION_NOTE})" if r["mfu"] is not None
        else f"MFU n/a ({r['mfu_note']})",
        f"host overhead {r['host_overhead_s'] * 1e3:.2f} ms/step ({100 * r['host_overhead_fraction']:.2f}%), "
        f"data wait {r['data_wait_s'] * 1e3:.2f} ms/step ({100 * r['data_wait_fraction']:.2f}%; "
        f"taking a batch {r['data_fetch_s'] * 1e3:.2f} ms, the rest behind the running step)"
        + ("" if r["huge_pages"] else "; huge pages off (run through the `crosstrain` program for them)"),
    ]
    if r["predicted_step_time_s"]:
        lines.append(f"planner predicted {r['predicted_step_time_s'] * 1e3:.1f} ms/step "
                     f"({r['predicted_step_time_s'] / r['step_time_s']:.2f}x measured)")
    return "\n".join(lines)
