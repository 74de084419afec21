"""`crosstrain train`: build everything from the config, then step, log, evaluate and checkpoint.

The loop keeps the device busy: batches are prepared on a background thread, and a logged step's
metrics are read back only after the next step has been dispatched, so the host never waits for
the device except where it must (logging reads one step behind; checkpoints copy state to host).
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from crosstrain import hardware
from crosstrain.config import Config, config_from_dict, read_preset, resume_differences, save_config
from crosstrain.data.pipeline import build_pipeline, resolve_sources
from crosstrain.errors import UserError
from crosstrain.flops import CROSSTRAIN_CONVENTION, flops_per_token
from crosstrain.model import count_params, init_params, loss_fn, param_axes, params_sha256
from crosstrain.parallel.mesh import apply_mesh_rule, build_mesh, check_model_fits_mesh, resolve_shape
from crosstrain.parallel.rules import activate, logical_to_spec, named_sharding
from crosstrain.train import optimizer
from crosstrain.train.checkpoint import Checkpointer, abstract_like
from crosstrain.train.metrics import MetricsWriter, plot_losses, read_metrics, write_json
from crosstrain.train.step import TrainState, init_state, make_train_step

log = logging.getLogger("crosstrain")


# --------------------------------------------------------------------------------------------
# Pieces shared with bench, eval and generate.


@dataclass
class Setup:
    cfg: Config
    mesh: jax.sharding.Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding
    replicated: NamedSharding


def make_setup(cfg: Config, devices=None) -> Setup:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(cfg.mesh, len(devices))
    check_model_fits_mesh(cfg, shape)
    mesh = build_mesh(shape, devices)
    param_sh = jax.tree.map(
        lambda axes: named_sharding(mesh, axes), param_axes(cfg.model), is_leaf=lambda x: isinstance(x, tuple)
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = TrainState(param_sh, optimizer.OptState(replicated, param_sh, param_sh))
    batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh=mesh))
    return Setup(cfg, mesh, state_sh, batch_sh, replicated)


def init_train_state(setup: Setup) -> TrainState:
    cfg = setup.cfg
    fn = jax.jit(lambda key: init_state(init_params(cfg.model, key)), out_shardings=setup.state_shardings)
    return fn(jax.random.key(cfg.train.seed))


def abstract_train_state(setup: Setup) -> TrainState:
    cfg = setup.cfg
    shapes = jax.eval_shape(lambda key: init_state(init_params(cfg.model, key)), jax.random.key(0))
    return abstract_like(shapes, setup.state_shardings)


def state_from_run(setup: Setup, source: Path) -> TrainState:
    """Fresh optimizer state around the latest parameters of another run (the next AFM stage)."""
    from crosstrain.config import load_run_config
    from crosstrain.model import param_shapes

    if not source.is_dir():
        raise UserError(f"init.from_run: {source} does not exist")
    src_cfg = load_run_config(source)
    mine, theirs = param_shapes(setup.cfg.model), param_shapes(src_cfg.model)
    if jax.tree.structure(mine) != jax.tree.structure(theirs) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))
    ):
        raise UserError(f"init.from_run: the model in {source} has a different shape from this run's model")
    ckpt = Checkpointer(source / "checkpoints", src_cfg.checkpoint)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"init.from_run: {source} has no committed checkpoint")
        src_state, _ = ckpt.restore(step, abstract_train_state(setup))
    finally:
        ckpt.close()
    log.info("initialised parameters from %s (step %d), fresh optimizer state", source, step)
    fn = jax.jit(init_state, out_shardings=setup.state_shardings)
    return fn(src_state.params)


def process_rows(setup: Setup) -> tuple[int, int]:
    """The rows [lo, hi) of the global batch that this process's devices hold."""
    shape = (setup.cfg.train.batch, setup.cfg.model.seq_len + 1)
    index = setup.batch_sharding.addressable_devices_indices_map(shape)
    spans = sorted({(sl[0].start or 0, shape[0] if sl[0].stop is None else sl[0].stop) for sl in index.values()})
    lo, reach = spans[0][0], spans[0][0]
    for a, b in spans:
        if a > reach:
            raise RuntimeError(f"this process's batch rows are not contiguous: {spans}")
        reach = max(reach, b)
    return lo, reach


def global_batch_array(setup: Setup, local: np.ndarray) -> jax.Array:
    """Assemble the global batch from each process's rows."""
    global_shape = (setup.cfg.train.batch, local.shape[1])
    return jax.make_array_from_process_local_data(setup.batch_sharding, local, global_shape)


def total_peak_flops(devices, dtype: str) -> tuple[Optional[float], str]:
    """Peak dense FLOP/s of all devices together, and a note saying where it came from."""
    dev = devices[0]
    chip = hardware.detect_chip(dev)
    if chip is None:
        return None, f"MFU unavailable: device kind '{getattr(dev, 'device_kind', '?')}' is not in the hardware catalog"
    per_chip = chip.peak_flops(dtype)
    if per_chip is None:
        return None, f"MFU unavailable: no published {dtype} peak for {chip.name}"
    if chip.name == "cpu":
        # Forced host devices share one machine: its measured ceiling is the whole budget.
        return per_chip, f"peak {per_chip / 1e12:.3f} TFLOP/s ({dtype}, measured matmul ceiling of this CPU)"
    chips = len(devices) / chip.devices_per_chip
    total = per_chip * chips
    return total, f"peak {per_chip / 1e12:.0f} TFLOP/s per {chip.name} chip x {chips:g} chips ({dtype}, dense)"


def host_tree(tree: Any) -> Any:
    """Gather a (possibly multi-process sharded) tree to host numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def total_state_bytes(state: TrainState) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)))


def per_device_state_bytes(state: TrainState) -> int:
    total = 0
    for leaf in jax.tree.leaves(state):
        shards = leaf.addressable_shards
        if shards:
            total += shards[0].data.nbytes
    return total


# --------------------------------------------------------------------------------------------
# The run.


def _check_resume_config(cfg: Config, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    old = config_from_dict(read_preset(str(path)))
    diffs = resume_differences(old, cfg)
    if diffs:
        raise UserError(
            f"--run-dir: {run_dir} holds a run with a different config ({', '.join(diffs)}); "
            "use a new --run-dir or the same settings"
        )


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=True)


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`. Returns the summary written to summary.json."""
    t_start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    devices = jax.devices()
    cfg, rule = apply_mesh_rule(cfg, devices)
    _check_resume_config(cfg, run_dir)
    resolve_sources(cfg)  # paths and formats, before anything is logged or compiled
    setup = make_setup(cfg, devices)  # validates mesh vs devices and model before any compile
    with activate(setup.mesh):
        return _train(cfg, run_dir, setup, rule, t_start)


def _train(cfg: Config, run_dir: Path, setup: Setup, rule, t_start: float) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    devices = jax.devices()
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    m, t = cfg.model, cfg.train
    n_params = count_params(m)
    log.info(
        "model: %d layers, hidden %d, %d heads (%d KV) x %d, ffn %d, vocab %d, seq %d: %.2fM parameters",
        m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim, m.ffn, m.vocab, m.seq_len, n_params / 1e6,
    )
    shape = setup.mesh.shape
    log.info(
        "devices: %d x %s (%s) in %d process(es); mesh data=%d fsdp=%d tensor=%d",
        len(devices), devices[0].device_kind, devices[0].platform, jax.process_count(),
        shape["data"], shape["fsdp"], shape["tensor"],
    )
    if rule is not None:
        log.info("mesh rule %s: %s", rule.name, rule.why)

    pipeline = build_pipeline(cfg, run_dir=run_dir, write_files=is_main)
    rows = process_rows(setup)
    log.info(
        "data: %d training tokens in %d source(s), %d sequences of %d tokens",
        sum(st.train_end for st in pipeline.stores), len(pipeline.stores),
        sum(len(q) for q in pipeline.train_sequences), m.seq_len,
    )

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None and latest > t.steps:
        raise UserError(f"train.steps: the run in {run_dir} is already at step {latest}, past train.steps={t.steps}")
    t0 = time.perf_counter()
    data_state = None
    if latest is not None:
        state, meta = ckpt.restore(latest, abstract_train_state(setup))
        start = int(meta["step"])
        data_state = meta.get("data", {}).get("iterator")
        log.info("resumed from checkpoint at step %d", start)
    elif cfg.init.from_run:
        state = state_from_run(setup, Path(cfg.init.from_run))
        start = 0
    else:
        state = init_train_state(setup)
        start = 0
    init_s = time.perf_counter() - t0
    if start == t.steps:
        ckpt.close()
        log.info("the run in %s is already complete at step %d", run_dir, start)
        previous = run_dir / "summary.json"
        if previous.is_file():
            import json

            return json.loads(previous.read_text())
        return {"steps": start, "params_sha256": params_sha256(host_tree(state.params))}

    state_bytes = per_device_state_bytes(state)
    log.info(
        "parameters + optimizer state: %.2f MiB per device (%.2f MiB unsharded, fsdp=%d, tensor=%d)",
        state_bytes / 2**20, total_state_bytes(state) / 2**20, shape["fsdp"], shape["tensor"],
    )

    step_fn = jax.jit(
        make_train_step(cfg),
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, setup.replicated),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        lambda params, batch: loss_fn(params, batch, cfg.model),
        in_shardings=(setup.state_shardings.params, setup.batch_sharding),
        out_shardings=setup.replicated,
    )
    batch_struct = jax.ShapeDtypeStruct((t.batch, m.seq_len + 1), jnp.int32, sharding=setup.batch_sharding)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch_struct).compile()
    compile_s = time.perf_counter() - t0
    log.info("compiled the train step in %.1f s", compile_s)

    peak, peak_note = total_peak_flops(devices, m.compute_dtype)
    log.info(peak_note)
    tokens_per_step = t.batch * m.seq_len
    flops_per_step = flops_per_token(m) * tokens_per_step

    def evaluate(params) -> Optional[float]:
        losses = [float(eval_fn(params, global_batch_array(setup, b))) for b in pipeline.eval_batches(t.eval_batches, rows)]
        return float(np.mean(losses)) if losses else None

    writer = MetricsWriter(run_dir / "metrics.jsonl", resume_step=start if latest is not None else None) if is_main else None
    bar = _progress_bar(t.steps, start) if is_main else None
    batches = pipeline.batches(rows, state=data_state)
    if batches.get_state().get("next_index", start) != start:
        raise RuntimeError(f"the data iterator state {batches.get_state()} does not match step {start}")
    step_times: list[float] = []
    last_record: dict[str, Any] = {}
    pending: Optional[tuple[int, Any]] = None
    window_start = time.perf_counter()
    window_steps = 0
    window_wait = 0.0
    last_ckpt_time = time.perf_counter()
    ckpt_stall = 0.0

    def resolve(step: int, metrics: Any, extra: dict[str, Any] | None = None, done_at: float | None = None) -> None:
        """Read a logged step's metrics back (blocking on it) and write its record."""
        nonlocal window_start, window_steps, window_wait, last_record
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter() if done_at is None else done_at
        step_time = (now - window_start) / max(window_steps, 1)
        tps = tokens_per_step / step_time
        record = {
            "step": step,
            "loss": values["loss"],
            "lr": values["lr"],
            "grad_norm": values["grad_norm"],
            "step_time_s": step_time,
            "tokens_per_s": tps,
            "mfu": (flops_per_step / step_time / peak) if peak else None,
            "data_wait_s": window_wait / max(window_steps, 1),
            "tokens_seen": step * tokens_per_step,
            **(extra or {}),
        }
        step_times.append(step_time)
        last_record = record
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        if writer is not None:
            writer.write(record)
        msg = f"step {step}/{t.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} {tps:,.0f} tok/s"
        if record["mfu"] is not None:
            msg += f" mfu {100 * record['mfu']:.1f}%"
        if "eval_loss" in record and record["eval_loss"] is not None:
            msg += f" eval {record['eval_loss']:.4f}"
        if bar is not None:
            bar.set_postfix_str(f"loss {record['loss']:.3f}")
            log.debug(msg)
        else:
            log.info(msg)

    try:
        for i in range(start, t.steps):
            step = i + 1
            w0 = time.perf_counter()
            host_batch = next(batches)
            batch = global_batch_array(setup, host_batch)
            window_wait += time.perf_counter() - w0
            state, metrics = compiled(state, batch)
            window_steps += 1
            if pending is not None:
                resolve(*pending)
                pending = None
            is_last = step == t.steps
            if (t.eval_every and step % t.eval_every == 0) or is_last:
                # Evaluation blocks: note when the step finished so its time excludes the eval.
                jax.block_until_ready(metrics)
                done_at = time.perf_counter()
                eval_loss = evaluate(state.params)
                perplexity = math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None
                resolve(step, metrics, {"eval_loss": eval_loss, "eval_perplexity": perplexity}, done_at)
            elif step % t.log_every == 0 or i == start:
                pending = (step, metrics)
            due = (t.checkpoint_every and step % t.checkpoint_every == 0) or (
                cfg.checkpoint.every_minutes and time.perf_counter() - last_ckpt_time > 60 * cfg.checkpoint.every_minutes
            )
            if due or is_last:
                c0 = time.perf_counter()
                meta = {"step": step, "data": {"iterator": batches.get_state()}, "config": cfg.fingerprint()}
                ckpt.save(step, state, meta, wait=is_last)
                ckpt_stall += time.perf_counter() - c0
                last_ckpt_time = time.perf_counter()
            if bar is not None:
                bar.update(1)
        if pending is not None:
            resolve(*pending)
            pending = None
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()

    params_host = host_tree(state.params)
    digest = params_sha256(params_host)
    wall = time.perf_counter() - t_start
    steady = step_times[1:] or step_times
    median_step = statistics.median(steady) if steady else None
    summary = {
        "final_loss": last_record.get("loss"),
        "eval_loss": last_record.get("eval_loss"),
        "steps": t.steps,
        "tokens_seen": t.steps * tokens_per_step,
        "params_sha256": digest,
        "parameters": n_params,
        "step_time_s": median_step,
        "tokens_per_s": tokens_per_step / median_step if median_step else None,
        "mfu": (flops_per_step / median_step / peak) if (peak and median_step) else None,
        "mfu_note": peak_note,
        "attention_flops": CROSSTRAIN_CONVENTION,
        "compile_s": compile_s,
        "init_s": init_s,
        "checkpoint_stall_s": ckpt_stall,
        "wall_s": wall,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "per_device_state_bytes": state_bytes,
        "resumed_from": latest,
    }
    if is_main:
        write_json(run_dir / "summary.json", summary)
        plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png", title=f"{cfg.description or 'crosstrain'}")
        log.info(
            "done: %d steps, final loss %.4f, held-out loss %s; wrote %s",
            t.steps, summary["final_loss"] if summary["final_loss"] is not None else float("nan"),
            f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a",
            run_dir / "summary.json",
        )
    return summary
