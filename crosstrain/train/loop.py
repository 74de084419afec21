"""`crosstrain train`: build everything from the config, then step, log, evaluate and checkpoint.

The loop keeps the device busy: batches are prepared on a background thread, and a logged step's
metrics are read back only after the next step has been dispatched, so the host never waits for
the device except where it must (logging reads one step behind; checkpoints copy state to host).
"""

from __future__ import annotations

import json
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
from crosstrain.config import Config, check_paths, load_run_config, resume_differences, save_config
from crosstrain.data.pipeline import build_pipeline, resolve_sources
from crosstrain.errors import UserError
from crosstrain.flops import CROSSTRAIN_CONVENTION, flops_per_token
from crosstrain.model import count_params, init_params, loss_fn, param_axes, params_sha256
from crosstrain.parallel.mesh import AXES, apply_mesh_rule, build_mesh, check_model_fits_mesh, resolve_shape
from crosstrain.parallel.rules import activate, logical_to_spec, named_sharding
from crosstrain.resolve import Resolved, resolve_model
from crosstrain.train import optimizer
from crosstrain.train.checkpoint import Checkpointer, abstract_like
from crosstrain.train.faults import GoodputLedger, Preemption, SpikeDetector, TrainingHalted
from crosstrain.files import write_json
from crosstrain.train.metrics import MetricsWriter, plot_losses, read_metrics
from crosstrain.train.tensorboard import TensorBoardWriter
from crosstrain.train.step import TrainState, init_state, make_train_step

log = logging.getLogger("crosstrain")


# --------------------------------------------------------------------------------------------
# Pieces shared with bench, eval and generate.


@dataclass
class Setup:
    """What a run computes with: `cfg` has every model `auto` resolved for the mesh's devices
    (`resolved` records the choices); the user's own config is kept by the caller."""

    cfg: Config
    mesh: jax.sharding.Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding
    replicated: NamedSharding
    resolved: Resolved


def make_setup(cfg: Config, devices=None) -> Setup:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(cfg.mesh, len(devices))
    check_model_fits_mesh(cfg, shape)
    model, resolved = resolve_model(
        cfg.model, devices, mesh_sizes=dict(zip(AXES, shape.sizes)),
        micro_per_rank=cfg.train.batch // cfg.train.microbatches // shape.batch_shards,
    )
    cfg = cfg.replace(model=model)
    mesh = build_mesh(shape, devices)
    param_sh = jax.tree.map(
        lambda axes: named_sharding(mesh, axes), param_axes(cfg.model), is_leaf=lambda x: isinstance(x, tuple)
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = TrainState(param_sh, optimizer.OptState(replicated, param_sh, param_sh), replicated, replicated)
    batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh=mesh))
    return Setup(cfg, mesh, state_sh, batch_sh, replicated, resolved)


def init_train_state(setup: Setup) -> TrainState:
    cfg = setup.cfg
    fn = jax.jit(lambda key: init_state(init_params(cfg.model, key), cfg.train.seed), out_shardings=setup.state_shardings)
    return fn(jax.random.key(cfg.train.seed))


def abstract_train_state(setup: Setup) -> TrainState:
    cfg = setup.cfg
    shapes = jax.eval_shape(lambda key: init_state(init_params(cfg.model, key)), jax.random.key(0))
    return abstract_like(shapes, setup.state_shardings)


def latest_state_of(source: Path, source_cfg: Config, setup: Setup, field: str) -> tuple[int, TrainState]:
    """(step, state) of another run's latest valid checkpoint, restored onto `setup`'s mesh;
    `field` names the setting that pointed there, for the error when it has none."""
    ckpt = Checkpointer(source / "checkpoints", source_cfg.checkpoint, primary=False)
    try:
        found = ckpt.restore_latest(abstract_train_state(setup))
    finally:
        ckpt.close()
    if found is None:
        raise UserError(f"{field}: {source} has no valid checkpoint")
    step, state, _ = found
    return step, state


def state_from_run(setup: Setup, source: Path) -> TrainState:
    """Fresh optimizer state around the latest parameters of another run (the next AFM stage)."""
    from crosstrain.model import param_shapes

    if not source.is_dir():
        raise UserError(f"init.from_run: {source} does not exist")
    src_cfg = load_run_config(source)
    mine, theirs = param_shapes(setup.cfg.model), param_shapes(src_cfg.model)
    if jax.tree.structure(mine) != jax.tree.structure(theirs) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))
    ):
        raise UserError(f"init.from_run: the model in {source} has a different shape from this run's model")
    step, src_state = latest_state_of(source, src_cfg, setup, "init.from_run")
    log.info("initialised parameters from %s (step %d), fresh optimizer state", source, step)
    fn = jax.jit(lambda p: init_state(p, setup.cfg.train.seed), out_shardings=setup.state_shardings)
    return fn(src_state.params)


def compile_train_step(cfg: Config, setup: Setup, state: TrainState, teacher=None):
    """The train step jitted with the mesh's shardings (state donated) and compiled ahead of time
    for `state` (concrete or abstract) and a global batch of token ids; call inside `activate`.
    With a `teacher` (train/distill.py) its parameters are the step's fourth argument."""
    index = jax.ShapeDtypeStruct((), jnp.int32)
    batch_struct = jax.ShapeDtypeStruct((cfg.train.batch, cfg.model.seq_len + 1), jnp.int32,
                                        sharding=setup.batch_sharding)
    if teacher is None:
        step_fn = jax.jit(
            make_train_step(cfg),
            in_shardings=(setup.state_shardings, setup.batch_sharding, setup.replicated),
            out_shardings=(setup.state_shardings, setup.replicated),
            donate_argnums=(0,),
        )
        return step_fn.lower(state, batch_struct, index).compile()
    step_fn = jax.jit(
        make_train_step(cfg, teacher.cfg.model),
        in_shardings=(setup.state_shardings, setup.batch_sharding, setup.replicated, teacher.shardings),
        out_shardings=(setup.state_shardings, setup.replicated),
        donate_argnums=(0,),
    )
    return step_fn.lower(state, batch_struct, index, teacher.params).compile()


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
    if not (run_dir / "config.yaml").is_file():
        return
    diffs = resume_differences(load_run_config(run_dir), cfg)
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


def train(cfg: Config, run_dir: Path, *, started: Optional[float] = None, devices=None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`. Returns the summary written to summary.json.

    `started` is the perf_counter() reading when the process began, for the goodput ledger;
    `devices` the devices to train on (default: all)."""
    started = time.perf_counter() if started is None else started
    check_paths(cfg)  # the data, tokenizer, init and teacher it will read
    run_dir.mkdir(parents=True, exist_ok=True)
    devices = list(jax.devices() if devices is None else devices)
    if cfg.init.from_hf:
        from crosstrain.hf import apply_hf_model

        cfg = apply_hf_model(cfg, Path(cfg.init.from_hf))
    if cfg.distill.teacher:
        teacher_vocab = load_run_config(Path(cfg.distill.teacher)).model.vocab
        if teacher_vocab != cfg.model.vocab:
            raise UserError(f"distill.teacher: the teacher's vocabulary ({teacher_vocab}) differs from the student's "
                            f"({cfg.model.vocab}); distillation needs the same tokenizer")
    if cfg.distill.teacher and not cfg.data.tokenizer and (Path(cfg.distill.teacher) / "tokenizer.json").is_file():
        # The student reads the teacher's tokens: same tokenizer, same vocabulary.
        cfg = cfg.override(data={"tokenizer": str((Path(cfg.distill.teacher) / "tokenizer.json").absolute())})
    cfg, rule = apply_mesh_rule(cfg, devices)
    _check_resume_config(cfg, run_dir)
    resolve_sources(cfg)  # paths and formats, before anything is logged or compiled
    setup = make_setup(cfg, devices)  # validates mesh vs devices and model before any compile
    with activate(setup.mesh):
        return Trainer(cfg, run_dir, setup, rule, started).run()


def lost_seconds(records: list[dict[str, Any]], after_step: int) -> float:
    """Wall time that logged records past `after_step` stood for (each record's step_time_s
    covers the steps since the record before it)."""
    total, previous = 0.0, after_step
    for r in sorted(records, key=lambda r: r["step"]):
        if r["step"] > after_step and r.get("step_time_s") is not None:
            total += r["step_time_s"] * (r["step"] - max(previous, after_step))
            previous = r["step"]
        elif r["step"] <= after_step:
            previous = r["step"]
    return total


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, setup: Setup, rule, started: float):
        # `asked` is the config as the user gave it (written to config.yaml, portable); `cfg` is
        # what runs here, every `auto` resolved for these devices.
        self.asked = cfg
        cfg = setup.cfg
        self.cfg, self.run_dir, self.setup, self.rule, self.started = cfg, run_dir, setup, rule, started
        self.m, self.t = cfg.model, cfg.train
        self.is_main = jax.process_index() == 0
        self.devices = list(setup.mesh.devices.flat)
        self.ledger = GoodputLedger(run_dir / "goodput.json", write=self.is_main)
        self.preemption = Preemption()
        self.detector = SpikeDetector(cfg.faults.spike_sigma, cfg.faults.spike_window)
        self.nonfinite = 0
        self.rollbacks: list[dict[str, Any]] = []
        self.step_seconds: dict[int, float] = {}
        self.last_record: dict[str, Any] = {}
        self.step_times: list[float] = []
        self.tokens_per_step = self.t.batch * self.m.seq_len
        self.loop_start: Optional[float] = None
        self.eval_s = self.loop_restore_s = self.loop_recomputed_s = 0.0
        self.resume_restore_s = self.resume_lost_s = 0.0
        self.ckpt_time = time.perf_counter()
        self.tb: Optional[TensorBoardWriter] = None
        self.profiling = False

    # ---- set-up ----------------------------------------------------------------------------

    def _log_header(self) -> None:
        m, cfg = self.m, self.cfg
        log.info(
            "model: %d layers, hidden %d, %d heads (%d KV) x %d, ffn %d, vocab %d, seq %d: %.2fM parameters",
            m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim, m.ffn, m.vocab, m.seq_len, count_params(m) / 1e6,
        )
        shape = self.setup.mesh.shape
        log.info(
            "devices: %d x %s (%s) in %d process(es); mesh slice=%d data=%d fsdp=%d tensor=%d",
            len(self.devices), self.devices[0].device_kind, self.devices[0].platform, jax.process_count(),
            shape["slice"], shape["data"], shape["fsdp"], shape["tensor"],
        )
        if self.rule is not None:
            log.info("mesh rule %s: %s", self.rule.name, self.rule.why)
        log.info("resolved for %s: %s", self.setup.resolved.platform, self.setup.resolved.describe())
        for why in self.setup.resolved.why:
            log.info("  %s", why)
        if cfg.faults.spike_sigma:
            log.info("loss-spike rollback on: %.1f sigma over %d steps", cfg.faults.spike_sigma, cfg.faults.spike_window)

    def _restore(self) -> tuple[TrainState, int, Optional[dict], Optional[int]]:
        """(state, start step, data iterator state, restored checkpoint step)."""
        t0 = time.perf_counter()
        found = self.ckpt.restore_latest(abstract_train_state(self.setup))
        if found is not None:
            step, state, meta = found
            self.detector = SpikeDetector(self.cfg.faults.spike_sigma, self.cfg.faults.spike_window, meta.get("spike_window"))
            self.nonfinite = int(meta.get("nonfinite_skipped", 0))
            self.rollbacks = list(meta.get("rollbacks", []))
            self.resume_restore_s = time.perf_counter() - t0
            log.info("resumed from checkpoint %d (%.1f s)", step, time.perf_counter() - t0)
            return state, int(meta["step"]), meta.get("data", {}).get("iterator"), step
        if self.cfg.init.from_run:
            return state_from_run(self.setup, Path(self.cfg.init.from_run)), 0, None, None
        if self.cfg.init.from_hf:
            from crosstrain.hf import load_hf_params

            params = load_hf_params(Path(self.cfg.init.from_hf), self.m)
            log.info("initialised parameters from Hugging Face model %s, fresh optimizer state", self.cfg.init.from_hf)
            fn = jax.jit(lambda p: init_state(p, self.t.seed), out_shardings=self.setup.state_shardings)
            return fn(params), 0, None, None
        return init_train_state(self.setup), 0, None, None

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data": {"iterator": self.batches.get_state()},
            "config": self.asked.fingerprint(),
            "spike_window": self.detector.state(),
            "nonfinite_skipped": self.nonfinite,
            "rollbacks": self.rollbacks,
            "rng": {"seed": self.t.seed, "note": "TrainState.rng holds the live key"},
        }

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, m, t = self.cfg, self.m, self.t
        setup = self.setup
        if self.is_main:
            save_config(self.asked, self.run_dir / "config.yaml")
        self._log_header()
        self.pipeline = build_pipeline(cfg, run_dir=self.run_dir, write_files=self.is_main)
        self.rows = process_rows(setup)
        log.info(
            "data: %d training tokens in %d source(s), %d sequences of %d tokens",
            sum(st.train_end for st in self.pipeline.stores), len(self.pipeline.stores),
            sum(len(q) for q in self.pipeline.train_sequences), m.seq_len,
        )
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint, primary=self.is_main)
        state, start, data_state, restored = self._restore()
        if start > t.steps:
            raise UserError(f"train.steps: the run in {self.run_dir} is already at step {start}, past train.steps={t.steps}")
        records = read_metrics(self.run_dir / "metrics.jsonl") if self.is_main else []
        if restored is not None:
            self.resume_lost_s = self.ledger.lost(lost_seconds(records, start))
        self.state_bytes = per_device_state_bytes(state)
        self.peak, self.peak_note = total_peak_flops(self.devices, m.compute_dtype)
        self.flops_per_step = flops_per_token(m) * self.tokens_per_step
        if start == t.steps:
            self.ckpt.close()
            log.info("the run in %s is already complete at step %d", self.run_dir, start)
            previous = self.run_dir / "summary.json"
            if previous.is_file():
                return json.loads(previous.read_text())
            # Killed between the last checkpoint and the summary: rebuild it from the records.
            self.state, self.step = state, start
            self.last_record = records[-1] if records else {}
            self.step_times = [r["step_time_s"] for r in records if r.get("step_time_s")]
            return self._finish()

        log.info(
            "parameters + optimizer state: %.2f MiB per device (%.2f MiB unsharded, fsdp=%d, tensor=%d)",
            self.state_bytes / 2**20, total_state_bytes(state) / 2**20, setup.mesh.shape["fsdp"], setup.mesh.shape["tensor"],
        )
        self.eval_fn = jax.jit(
            lambda params, batch: loss_fn(params, batch, m),
            in_shardings=(setup.state_shardings.params, setup.batch_sharding),
            out_shardings=setup.replicated,
        )
        self.teacher = None
        if cfg.distill.teacher:
            from crosstrain.train.distill import load_teacher

            self.teacher = load_teacher(cfg, setup, self.devices)
        t0 = time.perf_counter()
        self.compiled = compile_train_step(cfg, setup, state, self.teacher)
        self.ledger.current.compile_s += time.perf_counter() - t0
        log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
        log.info(self.peak_note)

        self.writer = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step=start if restored is not None else None) if self.is_main else None
        # Events past `start` (from an attempt that got further than its last checkpoint) are
        # purged, as metrics.jsonl drops its records past it: one curve, each step once.
        self.tb = TensorBoardWriter(self.run_dir / "tensorboard", resume_step=start) if self.is_main else None
        self.batches = self.pipeline.batches(self.rows, state=data_state)
        if data_state is None and start:
            raise RuntimeError("a resumed run must have a data iterator state")
        self.bar = _progress_bar(t.steps, start) if self.is_main else None
        self.state, self.step = state, start
        self.ledger.current.startup_s = time.perf_counter() - self.started
        self.preemption.install()
        preempted = False
        try:
            preempted = self._loop()
        finally:
            self.preemption.uninstall()
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()
            if self.profiling:
                self._stop_profile()
            if self.tb is not None:
                self.tb.flush()
            self.ckpt.close()
            self._account()
        if preempted:
            if self.tb is not None:
                self.tb.close()
            return {"preempted": True, "step": self.step}
        return self._finish()

    def _loop(self) -> bool:
        """Train to train.steps. Returns True if stopped by a preemption (state saved)."""
        t = self.t
        self.window_start = self.loop_start = self.last_done = self.ckpt_time = time.perf_counter()
        self.window_steps, self.window_wait = 0, 0.0
        pending = None
        while self.step < t.steps:
            if self.preemption.requested():
                if pending is not None:
                    self._resolve(*pending)
                self.ckpt.save(self.step, self.state, self._meta(self.step), wait=True)
                log.info("preempted (SIGTERM): saved step %d; run again to resume", self.step)
                return True
            w0 = time.perf_counter()
            batch_index = int(self.batches.get_state()["next_index"])
            host_batch = next(self.batches)
            batch = global_batch_array(self.setup, host_batch)
            self.window_wait += time.perf_counter() - w0
            if t.profile_start and self.step + 1 == t.profile_start and not self.profiling:
                self._start_profile()
            if self.teacher is None:
                self.state, metrics = self.compiled(self.state, batch, jnp.int32(batch_index))
            else:
                self.state, metrics = self.compiled(self.state, batch, jnp.int32(batch_index), self.teacher.params)
            self.step += 1
            if self.profiling and self.step >= t.profile_start + t.profile_steps - 1:
                self._stop_profile()
            self.window_steps += 1
            step = self.step
            if pending is not None and self._resolve(*pending):
                pending = None
                continue  # rolled back: self.step and the data iterator were reset
            pending = (step, metrics)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                # Evaluation blocks: finish this step's record first so its time excludes eval.
                if self._resolve(*pending):
                    pending = None
                    continue
                pending = None
                self._evaluate(step)
            due = (t.checkpoint_every and step % t.checkpoint_every == 0) or (
                self.cfg.checkpoint.every_minutes
                and time.perf_counter() - self.ckpt_time > 60 * self.cfg.checkpoint.every_minutes
            )
            if due or step == t.steps:
                self.ckpt.save(step, self.state, self._meta(step), wait=step == t.steps)
                self.ckpt_time = time.perf_counter()
            self.ckpt.seal_pending()
            if self.bar is not None:
                self.bar.update(1)
        if pending is not None:
            self._resolve(*pending)
        return False

    def _start_profile(self) -> None:
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(out), create_perfetto_trace=True)
        self.profiling = True
        log.info("profiling steps %d..%d into %s", self.t.profile_start,
                 self.t.profile_start + self.t.profile_steps - 1, out)

    def _stop_profile(self) -> None:
        jax.block_until_ready(self.state)
        jax.profiler.stop_trace()
        self.profiling = False
        log.info("profile written under %s (XProf/TensorBoard: --logdir %s; Perfetto: *.trace.json.gz)",
                 self.run_dir / "profile", self.run_dir / "profile")

    def _resolve(self, step: int, metrics: Any) -> bool:
        """Read a step's metrics (one step behind the device), watch for faults, log. Returns
        True if it triggered a rollback."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        self.step_seconds[step] = now - self.last_done
        self.last_done = now
        if values["skipped"]:
            self.nonfinite += 1
            log.warning("step %d: non-finite loss or gradient (loss %s); update skipped", step, values["loss"])
            if self.cfg.faults.nonfinite == "halt":
                self._record(step, values, now)
                raise TrainingHalted(f"faults.nonfinite=halt: non-finite loss or gradient at step {step}")
        limit = self.detector.observe(values["loss"]) if self.detector.enabled else None
        if limit is not None:
            self._rollback(step, values["loss"], limit)
            return True
        t = self.t
        if step % t.log_every == 0 or step == 1 or step == t.steps or (t.eval_every and step % t.eval_every == 0):
            self._record(step, values, now)
        return False

    def _record(self, step: int, values: dict[str, float], now: float, extra: Optional[dict] = None) -> None:
        step_time = (now - self.window_start) / max(self.window_steps, 1)
        tps = self.tokens_per_step / step_time
        record = {
            "step": step,
            "loss": values["loss"],
            "lr": values["lr"],
            "grad_norm": values["grad_norm"],
            "step_time_s": step_time,
            "tokens_per_s": tps,
            "mfu": (self.flops_per_step / step_time / self.peak) if self.peak else None,
            "data_wait_s": self.window_wait / max(self.window_steps, 1),
            "tokens_seen": step * self.tokens_per_step,
            "skipped": int(values["skipped"]),
            **({"distill_loss": values["distill_loss"]} if "distill_loss" in values else {}),
            "nonfinite_skipped": self.nonfinite,
            **(extra or {}),
        }
        self.step_times.append(step_time)
        self.last_record = record
        self.window_start, self.window_steps, self.window_wait = time.perf_counter(), 0, 0.0
        if self.writer is not None:
            self.writer.write(record)
        if self.tb is not None:
            self.tb.write(record)
        msg = f"step {step}/{self.t.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} {tps:,.0f} tok/s"
        if record["mfu"] is not None:
            msg += f" mfu {100 * record['mfu']:.1f}%"
        if record.get("eval_loss") is not None:
            msg += f" eval {record['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.3f}")
        else:
            log.info(msg)
        self._account()

    def _evaluate(self, step: int) -> None:
        t0 = time.perf_counter()
        losses = [
            float(self.eval_fn(self.state.params, global_batch_array(self.setup, b)))
            for b in self.pipeline.eval_batches(self.t.eval_batches, self.rows)
        ]
        eval_loss = float(np.mean(losses)) if losses else None
        self.eval_s += time.perf_counter() - t0
        if self.last_record.get("step") == step:
            self.last_record["eval_loss"] = eval_loss
            self.last_record["eval_perplexity"] = math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None
            if self.writer is not None:
                self.writer.amend_last(self.last_record)
            if self.tb is not None:
                self.tb.write(self.last_record, keys=("eval_loss", "eval_perplexity"))
            if eval_loss is not None:
                log.info("step %d held-out loss %.4f", step, eval_loss)
        self.window_start = time.perf_counter()

    def _rollback(self, step: int, loss: float, limit: float) -> None:
        """PaLM-style: back to the last checkpoint before the spike, skipping the batches since."""
        t0 = time.perf_counter()
        spike_batch = int(self.batches.get_state()["next_index"]) - 1 - (self.step - step)
        self.ckpt.seal_pending(block=True)  # an async save still in flight may be the target
        target = self.ckpt.latest_valid_step(before=step)
        if target is None:
            log.warning("step %d: loss %.4f above %.4f but no checkpoint to roll back to; continuing", step, loss, limit)
            return
        self.ckpt.discard_after(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("crosstrain-rollback")
        state, meta = self.ckpt.restore(target, abstract_train_state(self.setup))
        resume_batch = spike_batch + 1 + self.cfg.faults.spike_skip
        from_batch = int(meta["data"]["iterator"]["next_index"])
        event = {"spike_step": step, "loss": loss, "threshold": limit, "restored_step": target,
                 "skipped_batches": [from_batch, resume_batch]}
        log.warning(
            "step %d: loss spike %.4f > %.4f; rolled back to step %d, skipping batches %d..%d",
            step, loss, limit, target, from_batch + 1, resume_batch,
        )
        self.rollbacks = list(meta.get("rollbacks", [])) + [event]
        self.detector = SpikeDetector(self.cfg.faults.spike_sigma, self.cfg.faults.spike_window, meta.get("spike_window"))
        self.nonfinite = int(meta.get("nonfinite_skipped", 0))
        redo = sum(sec for s, sec in self.step_seconds.items() if target < s)
        self.step_seconds = {s: sec for s, sec in self.step_seconds.items() if s <= target}
        if self.writer is not None:
            self.writer.truncate(target)
        if self.tb is not None:
            self.tb.close()
            self.tb = TensorBoardWriter(self.run_dir / "tensorboard", resume_step=target)
        self.state, self.step = state, target
        self.batches = self.pipeline.batches(self.rows, state={"next_index": resume_batch})
        self.loop_recomputed_s += redo
        self.loop_restore_s += time.perf_counter() - t0
        self.window_start = self.last_done = time.perf_counter()
        self.window_steps, self.window_wait = 0, 0.0
        if self.bar is not None:
            self.bar.n = target
            self.bar.refresh()

    # ---- accounting and the end ----------------------------------------------------------------

    def _account(self) -> None:
        """Refresh this attempt's goodput buckets from the counters and write the ledger."""
        now = time.perf_counter()
        cur = self.ledger.current
        cur.wall_s = now - self.started
        cur.checkpoint_stall_s = self.ckpt.stall_s
        cur.restore_s = self.resume_restore_s + self.loop_restore_s
        cur.recomputed_s = self.resume_lost_s + self.loop_recomputed_s
        cur.eval_s = self.eval_s
        if self.loop_start is not None:
            in_loop = now - self.loop_start
            cur.productive_s = max(0.0, in_loop - self.eval_s - self.ckpt.stall_s - self.loop_restore_s - self.loop_recomputed_s)
        self.ledger.save()

    def _finish(self) -> dict[str, Any]:
        t = self.t
        params_host = host_tree(self.state.params)
        digest = params_sha256(params_host)
        steady = self.step_times[1:] or self.step_times
        median_step = statistics.median(steady) if steady else None
        self._account()
        total, current = self.ledger.total().report(), self.ledger.current.report()
        summary = {
            "final_loss": self.last_record.get("loss"),
            "eval_loss": self.last_record.get("eval_loss"),
            "steps": t.steps,
            "tokens_seen": t.steps * self.tokens_per_step,
            "params_sha256": digest,
            "parameters": count_params(self.m),
            "step_time_s": median_step,
            "tokens_per_s": self.tokens_per_step / median_step if median_step else None,
            "mfu": (self.flops_per_step / median_step / self.peak) if (self.peak and median_step) else None,
            "mfu_note": self.peak_note,
            "attention_flops": CROSSTRAIN_CONVENTION,
            "compile_s": current["compile_s"],
            "nonfinite_skipped": self.nonfinite,
            "rollbacks": self.rollbacks,
            "goodput": total["goodput"],
            "badput_s": {k: total[k] for k in ("startup_s", "restore_s", "checkpoint_stall_s", "recomputed_s", "eval_s", "other_s")},
            "wall_s": total["wall_s"],
            "attempts": self.ledger.attempts,
            "this_attempt": current,
            "devices": len(self.devices),
            "device_kind": self.devices[0].device_kind,
            "resolved": self.setup.resolved.to_dict(),
            "per_device_state_bytes": self.state_bytes,
        }
        if self.tb is not None:
            self.tb.write({"step": t.steps, "goodput": summary["goodput"]})
            self.tb.close()
        if self.is_main:
            write_json(self.run_dir / "summary.json", summary)
            plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png",
                        title=self.cfg.description or "crosstrain")
            log.info(
                "done: %d steps, final loss %s, held-out loss %s; goodput %.1f%% over %d attempt(s); wrote %s",
                t.steps, f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a",
                f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a",
                100 * (summary["goodput"] or 0), self.ledger.attempts, self.run_dir / "summary.json",
            )
        return summary
