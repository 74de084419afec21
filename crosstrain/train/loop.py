"""`crosstrain train`: build everything from the config, then step, log, evaluate and checkpoint.

The loop keeps the device busy: batches are prepared on a background thread, and a logged step's
metrics are read back only after the next step has been dispatched, so the host never waits for
the device except where it must (logging reads one step behind; checkpoints copy state to host).
The pieces it shares with other commands (setup, states, the compiled step, batches) are in
crosstrain/runtime.py; its clocks (step times, goodput, profiling) in train/timing.py; where its
records go (metrics.jsonl, TensorBoard, the log) in train/metrics.py.

Over 400 lines on purpose: `Trainer` is one loop whose parts (step, read-back, record, evaluate,
checkpoint, roll back, resume) share its state: the step, the train state, the data iterator and
the fault state. Split across modules they would pass all of it around.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from crosstrain.config import Config, check_paths, load_run_config, resume_differences, save_config, schedule_change
from crosstrain.data.pipeline import build_pipeline, resolve_sources
from crosstrain.errors import UserError
from crosstrain.evaluate import batched_windows, summarize, window_sums, windows
from crosstrain.files import write_json
from crosstrain.flops import CONVENTION_NOTE, CROSSTRAIN_CONVENTION, flops_per_token
from crosstrain.hf import apply_hf_model, load_hf_params
from crosstrain.model import count_params, params_sha256
from crosstrain.parallel.mesh import apply_mesh_rule
from crosstrain.parallel.rules import activate
from crosstrain.storage import checkpoint_dir, local_run, push, remote_of
from crosstrain.runtime import (
    Setup,
    abstract_train_state,
    compile_train_step,
    computed,
    global_batch_array,
    host_tree,
    init_train_state,
    load_teacher,
    make_setup,
    per_device_state_bytes,
    process_rows,
    state_around,
    state_from_run,
    total_peak_flops,
    total_state_bytes,
)
from crosstrain.train.checkpoint import Checkpointer
from crosstrain.train.faults import Preemption, SpikeDetector, TrainingHalted, any_process
from crosstrain.train.metrics import Records, plot_losses, read_metrics
from crosstrain.train.step import TrainState
from crosstrain.train.timing import Goodput, ProfileWindow, StepTimer

log = logging.getLogger("crosstrain")


def _check_resume_config(cfg: Config, run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        return
    old = load_run_config(run_dir)
    diffs = resume_differences(old, cfg)
    if not diffs and (why := schedule_change(old, cfg)):
        raise UserError(why)
    if diffs:
        raise UserError(
            f"--run-dir: {remote_of(run_dir) or run_dir} holds a run with a different config ({', '.join(diffs)}); "
            "use a new --run-dir or the same settings"
        )


def train(cfg: Config, run_dir: Path, *, started: Optional[float] = None, devices=None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`. Returns the summary written to summary.json.

    `started` is the perf_counter() reading when the process began, for the goodput ledger;
    `devices` the devices to train on (default: all)."""
    started = time.perf_counter() if started is None else started
    check_paths(cfg)  # the data, tokenizer, init and teacher it will read
    run_dir.mkdir(parents=True, exist_ok=True)
    devices = list(jax.devices() if devices is None else devices)
    if cfg.init.from_hf:
        cfg = apply_hf_model(cfg, Path(cfg.init.from_hf))
    teacher = local_run(cfg.distill.teacher, "distill.teacher") if cfg.distill.teacher else None
    if teacher is not None:
        teacher_vocab = load_run_config(teacher).model.vocab
        if teacher_vocab != cfg.model.vocab:
            raise UserError(f"distill.teacher: the teacher's vocabulary ({teacher_vocab}) differs from the student's "
                            f"({cfg.model.vocab}); distillation needs the same tokenizer")
    if teacher is not None and not cfg.data.tokenizer and (teacher / "tokenizer.json").is_file():
        # The student reads the teacher's tokens: same tokenizer, same vocabulary.
        cfg = cfg.override(data={"tokenizer": str((teacher / "tokenizer.json").absolute())})
    cfg, rule = apply_mesh_rule(cfg, devices)
    _check_resume_config(cfg, run_dir)
    resolve_sources(cfg)  # paths and formats, before anything is logged or compiled
    setup = make_setup(cfg, devices)  # validates mesh vs devices and model before any compile
    with activate(setup.mesh):
        return Trainer(cfg, run_dir, setup, rule, started).run()


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, setup: Setup, rule, started: float):
        # `asked` is the config as the user gave it (written to config.yaml, portable); `cfg` is
        # what runs here, every `auto` resolved for these devices.
        self.asked = cfg
        cfg = setup.cfg
        self.cfg, self.run_dir, self.setup, self.rule = cfg, run_dir, setup, rule
        self.where = remote_of(run_dir) or run_dir  # what the user named: the bucket's URL for a run kept there
        self.m, self.t = cfg.model, cfg.train
        self.is_main = jax.process_index() == 0
        self.devices = list(setup.mesh.devices.flat)
        self.tokens_per_step = self.t.batch * self.m.seq_len
        self.goodput = Goodput(run_dir / "goodput.json", write=self.is_main, started=started)
        self.timer = StepTimer()
        self.profile = ProfileWindow(run_dir / "profile", self.t.profile_start, self.t.profile_steps)
        self.preemption = Preemption()
        self.detector = SpikeDetector(cfg.faults.spike_sigma, cfg.faults.spike_window)
        self.nonfinite = 0
        self.rollbacks: list[dict[str, Any]] = []
        self.last_record: dict[str, Any] = {}
        self.records: Optional[Records] = None

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

    def _sync(self, step: Optional[int] = None) -> None:
        """Process 0 of a run kept in a bucket: its files (records, log, TensorBoard, plots) to the
        bucket, each written whole."""
        if self.is_main and remote_of(self.run_dir):
            if self.records is not None:
                self.records.flush()
            push(self.run_dir)

    def _restore(self) -> tuple[TrainState, int, Optional[dict], Optional[int], float]:
        """(state, start step, data iterator state, restored checkpoint step, seconds restoring)."""
        t0 = time.perf_counter()
        found = self.ckpt.restore_latest(abstract_train_state(self.setup))
        if found is not None:
            step, state, meta = found
            self._restore_fault_state(meta)
            log.info("resumed from checkpoint %d (%.1f s)", step, time.perf_counter() - t0)
            return state, int(meta["step"]), meta.get("data", {}).get("iterator"), step, time.perf_counter() - t0
        if self.cfg.init.from_run:
            return state_from_run(self.setup, local_run(self.cfg.init.from_run, "init.from_run")), 0, None, None, 0.0
        if self.cfg.init.from_hf:
            params = load_hf_params(Path(self.cfg.init.from_hf), self.m)
            log.info("initialised parameters from Hugging Face model %s, fresh optimizer state", self.cfg.init.from_hf)
            return state_around(self.setup, params), 0, None, None, 0.0
        return init_train_state(self.setup), 0, None, None, 0.0

    def _restore_fault_state(self, meta: dict[str, Any]) -> None:
        """The spike window, skip count and rollbacks as a checkpoint recorded them."""
        self.detector = SpikeDetector(self.cfg.faults.spike_sigma, self.cfg.faults.spike_window, meta.get("spike_window"))
        self.nonfinite = int(meta.get("nonfinite_skipped", 0))
        self.rollbacks = list(meta.get("rollbacks", []))

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
        # A run kept in a bucket sends its records there before each checkpoint is sealed, so the
        # bucket's metrics always reach the newest valid checkpoint (crosstrain/storage.py).
        self.ckpt = Checkpointer(checkpoint_dir(self.run_dir), cfg.checkpoint, primary=self.is_main,
                                 before_seal=self._sync if remote_of(self.run_dir) else None)
        state, start, data_state, restored, restore_s = self._restore()
        if start > t.steps:
            raise UserError(f"train.steps: the run in {self.where} is already at step {start}, past train.steps={t.steps}")
        records = read_metrics(self.run_dir / "metrics.jsonl") if self.is_main else []
        if restored is not None:
            self.goodput.resumed(restore_s, records, start)
        self.state_bytes = per_device_state_bytes(state)
        self.peak, self.peak_note = total_peak_flops(self.devices, m.compute_dtype)
        self.flops_per_step = flops_per_token(m) * self.tokens_per_step
        if start == t.steps:
            self.ckpt.close()
            log.info("the run in %s is already complete at step %d", self.where, start)
            previous = self.run_dir / "summary.json"
            if previous.is_file():
                return json.loads(previous.read_text())
            # Killed between the last checkpoint and the summary: rebuild it from the records.
            self.state, self.step = state, start
            self.last_record = records[-1] if records else {}
            self.timer.logged = [r["step_time_s"] for r in records if r.get("step_time_s")]
            return self._finish()

        log.info(
            "parameters + optimizer state: %.2f MiB per device (%.2f MiB unsharded, fsdp=%d, tensor=%d)",
            self.state_bytes / 2**20, total_state_bytes(state) / 2**20, setup.mesh.shape["fsdp"], setup.mesh.shape["tensor"],
        )
        self.eval_fn = jax.jit(
            lambda params, batch, mask: window_sums(params, batch, mask, m),
            in_shardings=(setup.state_shardings.params, setup.batch_sharding, setup.batch_sharding),
            out_shardings=setup.replicated,
        )
        self.heldout = self._heldout_windows()
        self.teacher = load_teacher(cfg, self.devices) if cfg.distill.teacher else None
        t0 = time.perf_counter()
        self.compiled = compile_train_step(cfg, setup, state, self.teacher)
        self.goodput.compiled(time.perf_counter() - t0)
        log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
        log.info("%s; MFU's model FLOPs: %s", self.peak_note, CONVENTION_NOTE)

        self.records = Records(self.run_dir, main=self.is_main, total=t.steps, start=start, resumed=restored is not None)
        self.batches = self.pipeline.batches(self.rows, state=data_state)
        if data_state is None and start:
            raise RuntimeError("a resumed run must have a data iterator state")
        self.state, self.step = state, start
        self.goodput.started_up()
        self.preemption.install()
        preempted = False
        try:
            preempted = self._loop()
        finally:
            self.preemption.uninstall()
            self.records.pause()
            self.profile.stop(self.state)
            self.ckpt.close()
            self.goodput.account(self.ckpt.stall_s)
        if preempted:
            self.records.close()
            self._sync()
            return {"preempted": True, "step": self.step}
        return self._finish()

    def _loop(self) -> bool:
        """Train to train.steps. Returns True if stopped by a preemption (state saved)."""
        t = self.t
        self.goodput.loop_begins()
        self.timer.restart()
        saved_at = time.perf_counter()
        pending = None
        # No checkpoint is written while a profile trace runs: on XLA's CPU backend (jaxlib 0.10.2)
        # a trace overlapping an asynchronous save crashed the process (SIGSEGV) about once in 40
        # runs. A save that falls due inside the window waits for its end.
        deferred = None
        minutes = self.cfg.checkpoint.every_minutes
        while self.step < t.steps:
            # Decisions every process must take at the same step, agreed in one all-gather: a
            # SIGTERM seen by any process, and checkpoint.every_minutes by any process's clock.
            preempted, overdue = any_process(
                self.preemption.signalled(), bool(minutes) and time.perf_counter() - saved_at > 60 * minutes
            )
            if preempted:
                if pending is not None:
                    self._resolve(*pending)
                self.profile.stop(self.state)
                self.ckpt.save(self.step, self.state, self._meta(self.step), wait=True)
                log.info("preempted (SIGTERM): saved step %d; run again to resume", self.step)
                return True
            w0 = time.perf_counter()
            batch_index = int(self.batches.get_state()["next_index"])
            host_batch = next(self.batches)
            batch = global_batch_array(self.setup, host_batch)
            # The step dispatched last still running now that the batch is ready: the device never
            # waited for it (asynchronous dispatch overlapped the fetch with that step).
            self.timer.waited(time.perf_counter() - w0, hidden=pending is not None and not computed(pending[1]))
            if self.profile.starts_at(self.step + 1):
                self.ckpt.wait()  # no save in flight once the trace starts
            self.profile.before_step(self.step + 1, self.state)
            if self.teacher is None:
                self.state, metrics = self.compiled(self.state, batch, jnp.int32(batch_index))
            else:
                self.state, metrics = self.compiled(self.state, batch, jnp.int32(batch_index), self.teacher.params)
            self.step += 1
            self.profile.after_step(self.step, self.state)
            self.timer.dispatched()
            step = self.step
            if pending is not None and self._resolve(*pending):
                pending = deferred = None
                continue  # rolled back: self.step and the data iterator were reset
            pending = (step, metrics)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                # Evaluation blocks: finish this step's record first so its time excludes eval.
                if self._resolve(*pending):
                    pending = deferred = None
                    continue
                pending = None
                self._evaluate(step)
            due = (t.checkpoint_every and step % t.checkpoint_every == 0) or overdue
            if (due or deferred) and self.profile.active and step < t.steps:
                if deferred is None:
                    deferred = step
                    log.info("checkpoint of step %d deferred to the end of the profile trace", step)
            elif due or deferred or step == t.steps:
                self.profile.stop(self.state)  # a window reaching past the last step ends here
                self.ckpt.save(step, self.state, self._meta(step), wait=step == t.steps)
                saved_at = time.perf_counter()
                deferred = None
            self.ckpt.seal_pending()
            self.records.stepped()
        if pending is not None:
            self._resolve(*pending)
        return False

    def _resolve(self, step: int, metrics: Any) -> bool:
        """Read a step's metrics (one step behind the device), watch for faults, log. Returns
        True if it triggered a rollback."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        self.timer.done(step, now)
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

    def _record(self, step: int, values: dict[str, float], now: float) -> None:
        step_time, data_wait, data_fetch = self.timer.close_window(now)
        tps = self.tokens_per_step / step_time
        record = {
            "step": step,
            "loss": values["loss"],
            "lr": values["lr"],
            "grad_norm": values["grad_norm"],
            "step_time_s": step_time,
            "tokens_per_s": tps,
            "mfu": (self.flops_per_step / step_time / self.peak) if self.peak else None,
            "data_wait_s": data_wait,
            "data_fetch_s": data_fetch,
            "tokens_seen": step * self.tokens_per_step,
            "skipped": int(values["skipped"]),
            **({"distill_loss": values["distill_loss"]} if "distill_loss" in values else {}),
            "nonfinite_skipped": self.nonfinite,
        }
        self.last_record = record
        self.records.write(record)
        self.goodput.account(self.ckpt.stall_s)

    def _heldout_windows(self) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The held-out windows the run evaluates (crosstrain/evaluate.py): every held-out token, or
        the first train.eval_batches global batches of them; None when nothing is held out."""
        tokens = self.pipeline.heldout_tokens()
        if tokens.size < 2:
            log.info("evaluation: no tokens are held out (data.holdout=%s); no held-out loss", self.cfg.data.holdout)
            return None
        bounds = self.pipeline.heldout_bounds()
        wins, mask, groups = windows(tokens, self.m.seq_len, bounds)
        every = int(mask.sum())
        if self.t.eval_batches:
            keep = self.t.eval_batches * self.t.batch
            wins, mask, groups = wins[:keep], mask[:keep], groups[:keep]
        held = int(mask.sum())
        log.info("evaluation: %s held-out tokens in %d windows of %d segments%s", f"{held:,}", len(wins),
                 len(np.unique(groups)),
                 "" if held == every else f" (the first {self.t.eval_batches} batches of {every:,} tokens: "
                 "crosstrain eval takes them all)")
        longest = int(np.diff(bounds).max()) if len(bounds) > 1 else 0
        if 0 < longest < self.m.seq_len + 1:
            log.info("evaluation: held-out segments hold at most %d tokens, so held-out windows see less context "
                     "than model.seq_len=%d (a larger held-out set, data.holdout, has longer segments)",
                     longest, self.m.seq_len)
        return wins, mask, groups

    def _evaluate(self, step: int) -> None:
        if self.heldout is None:
            return
        t0 = time.perf_counter()
        lo, hi = self.rows
        sums, counts = [], []
        wins, masks, groups = self.heldout
        for batch, mask in batched_windows(wins, masks, self.t.batch):
            s_, c_ = self.eval_fn(self.state.params, global_batch_array(self.setup, batch[lo:hi]),
                                  global_batch_array(self.setup, mask[lo:hi]))
            sums.append(np.asarray(s_, np.float64))
            counts.append(np.asarray(c_, np.float64))
        result = summarize(np.concatenate(sums), np.concatenate(counts), groups=groups)
        self.goodput.evaluated(time.perf_counter() - t0)
        if self.last_record.get("step") == step:
            self.last_record["eval_loss"] = result.loss
            self.last_record["eval_loss_se"] = result.loss_se
            self.last_record["eval_perplexity"] = result.perplexity if result.loss < 50 else None
            self.records.amend(self.last_record, ("eval_loss", "eval_loss_se", "eval_perplexity"))
            log.info("step %d held-out loss %.4f ± %.4f", step, result.loss, result.loss_se)
        self.timer.skip_pause()

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
        log.warning(
            "step %d: loss spike %.4f > %.4f; rolled back to step %d, skipping batches %d..%d",
            step, loss, limit, target, from_batch + 1, resume_batch,
        )
        self._restore_fault_state(meta)
        self.rollbacks.append({"spike_step": step, "loss": loss, "threshold": limit, "restored_step": target,
                               "skipped_batches": [from_batch, resume_batch]})
        redo = self.timer.discard_after(target)
        self.records.rewind(target)
        self.state, self.step = state, target
        self.batches = self.pipeline.batches(self.rows, state={"next_index": resume_batch})
        self.goodput.rolled_back(time.perf_counter() - t0, redo)
        self.timer.restart()

    # ---- the end -------------------------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        t = self.t
        params_host = host_tree(self.state.params)
        digest = params_sha256(params_host)
        median_step = self.timer.median()
        self.goodput.account(self.ckpt.stall_s)
        total, current = self.goodput.reports()
        summary = {
            "final_loss": self.last_record.get("loss"),
            "eval_loss": self.last_record.get("eval_loss"),
            "eval_loss_se": self.last_record.get("eval_loss_se"),
            "eval_tokens": int(self.heldout[1].sum()) if getattr(self, "heldout", None) is not None else None,
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
            "attempts": self.goodput.ledger.attempts,
            "this_attempt": current,
            "devices": len(self.devices),
            "device_kind": self.devices[0].device_kind,
            "resolved": self.setup.resolved.to_dict(),
            "per_device_state_bytes": self.state_bytes,
        }
        if self.records is not None:
            self.records.close({"step": t.steps, "goodput": summary["goodput"]})
        if self.is_main:
            write_json(self.run_dir / "summary.json", summary)
            plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png",
                        title=f"{self.run_dir.name}: {t.steps:,} steps of {t.batch} x {self.m.seq_len} tokens, "
                              f"{count_params(self.m) / 1e6:.2f}M parameters")
            log.info(
                "done: %d steps, final loss %s, held-out loss %s; goodput %.1f%% over %d attempt(s); wrote %s",
                t.steps, f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a",
                f"{summary['eval_loss']:.4f} ± {summary['eval_loss_se']:.4f}" if summary["eval_loss"] is not None else "n/a",
                100 * (summary["goodput"] or 0), self.goodput.ledger.attempts, self.where,
            )
        self._sync()
        return summary
