"""What the commands that compute share: a mesh and its shardings for a config (`Setup`), train
states made fresh, restored or built around given parameters, the compiled train step, the
global batch from each process's rows, and a finished run loaded back or a new one written.

train (train/loop.py), bench, generate, eval, prune, import/export, recipe and `plan --aot` all
build on this module; it knows nothing of any of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from crosstrain import hardware
from crosstrain.config import Config, DataConfig, DistillConfig, InitConfig, MeshConfig, load_run_config, save_config
from crosstrain.errors import UserError
from crosstrain.model import init_params, param_axes, param_shapes
from crosstrain.parallel.mesh import AXES, build_mesh, check_model_fits_mesh, resolve_shape
from crosstrain.parallel.rules import logical_to_spec, named_sharding
from crosstrain.storage import checkpoint_dir, local_run, remote_of
from crosstrain.resolve import Resolved, resolve_model
from crosstrain.train import optimizer
from crosstrain.train.checkpoint import Checkpointer, abstract_like
from crosstrain.train.step import TrainState, init_state, make_train_step

log = logging.getLogger("crosstrain")


# --------------------------------------------------------------------------------------------
# The mesh, its shardings, and train states on it.


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


def state_around(setup: Setup, params: Any) -> TrainState:
    """A fresh optimizer state (step 0) around `params`, laid out on `setup`'s mesh."""
    seed = setup.cfg.train.seed
    return jax.jit(lambda p: init_state(p, seed), out_shardings=setup.state_shardings)(params)


def latest_state_of(source: Path, source_cfg: Config, setup: Setup, field: str) -> tuple[int, TrainState]:
    """(step, state) of another run's latest valid checkpoint, restored onto `setup`'s mesh;
    `field` names the setting that pointed there, for the error when it has none."""
    ckpt = Checkpointer(checkpoint_dir(source), source_cfg.checkpoint, primary=False)
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
    return state_around(setup, src_state.params)


@dataclass
class Teacher:
    """A distillation teacher (train/distill.py) on the student's mesh."""

    cfg: Config  # the teacher run's config, its model resolved for these devices
    params: Any  # sharded on the student's mesh
    shardings: Any
    step: int


def load_teacher(student: Config, devices) -> Teacher:
    """The teacher run's latest parameters, on the student's mesh and sharding rules (`train`
    has already checked that the vocabularies match)."""
    directory = local_run(student.distill.teacher, "distill.teacher")
    tcfg = load_run_config(directory)
    try:
        tsetup = make_setup(tcfg.override(mesh={**student.to_dict()["mesh"], "rule": "none"}, train=student.train,
                                          data=DataConfig(), init=InitConfig(), distill=DistillConfig()), devices)
    except UserError as e:
        raise UserError(f"distill.teacher: {e}") from None
    step, state = latest_state_of(directory, tcfg, tsetup, "distill.teacher")
    log.info("distilling from %s (step %d, %s), %s target, teacher weight %.2f", directory, step,
             f"{tcfg.model.layers} layers x {tcfg.model.hidden}", student.distill.mode, student.distill.teacher_weight)
    return Teacher(tsetup.cfg, state.params, tsetup.state_shardings.params, step)


# --------------------------------------------------------------------------------------------
# The compiled step and its batches.


def compile_train_step(cfg: Config, setup: Setup, state: TrainState, teacher: Optional[Teacher] = None,
                       compiler_options: Optional[dict[str, Any]] = None):
    """The train step jitted with the mesh's shardings (state donated) and compiled ahead of time
    for `state` (concrete or abstract) and a global batch of token ids; call inside `activate`.
    With a `teacher` its parameters are the step's fourth argument. `compiler_options`: XLA
    options for this compile alone."""
    from crosstrain.parallel.compile_log import watch_compiler

    with watch_compiler() as compile_log:
        compiled = _compile_train_step(cfg, setup, state, teacher, compiler_options)
    if compile_log.rematerializations:
        # The partitioner replicated tensors it could not reshard (parallel/compile_log.py): the
        # step runs, but moves and holds them whole on every device.
        log.warning("the SPMD partitioner replicated %d tensor(s) it could not reshard (involuntary full "
                    "rematerialization): %s", len(compile_log.rematerializations),
                    "; ".join(compile_log.rematerializations[:3]))
    return compiled


def _compile_train_step(cfg: Config, setup: Setup, state: TrainState, teacher: Optional[Teacher],
                        compiler_options: Optional[dict[str, Any]]):
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
        return step_fn.lower(state, batch_struct, index).compile(compiler_options)
    step_fn = jax.jit(
        make_train_step(cfg, teacher.cfg.model),
        in_shardings=(setup.state_shardings, setup.batch_sharding, setup.replicated, teacher.shardings),
        out_shardings=(setup.state_shardings, setup.replicated),
        donate_argnums=(0,),
    )
    return step_fn.lower(state, batch_struct, index, teacher.params).compile(compiler_options)


def batch_rows(sharding: NamedSharding, shape: tuple[int, ...], devices: Sequence) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch of `shape` that `devices` hold together under
    `sharding` (one process's devices: their rows must be contiguous)."""
    index = sharding.devices_indices_map(shape)
    mine = set(devices)
    spans = sorted({(sl[0].start or 0, shape[0] if sl[0].stop is None else sl[0].stop)
                    for d, sl in index.items() if d in mine})
    lo, reach = spans[0][0], spans[0][0]
    for a, b in spans:
        if a > reach:
            raise RuntimeError(f"this process's batch rows are not contiguous: {spans}")
        reach = max(reach, b)
    return lo, reach


def process_rows(setup: Setup) -> tuple[int, int]:
    """The rows [lo, hi) of the global batch that this process's devices hold."""
    shape = (setup.cfg.train.batch, setup.cfg.model.seq_len + 1)
    return batch_rows(setup.batch_sharding, shape, setup.batch_sharding.addressable_devices)


def global_batch_array(setup: Setup, local: np.ndarray) -> jax.Array:
    """Assemble the global batch from each process's rows."""
    global_shape = (setup.cfg.train.batch, local.shape[1])
    return jax.make_array_from_process_local_data(setup.batch_sharding, local, global_shape)


def computed(tree: Any) -> bool:
    """Whether every array of a dispatched step's outputs has been computed (never blocks): a batch
    taken while it has not is hidden behind that step, not data wait."""
    return all(x.is_ready() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


# --------------------------------------------------------------------------------------------
# Measures of a setup and its state.


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
# Runs on disk: a finished one loaded back, a new one written at step 0.


def load_run(run_dir: Path, *, step: Optional[int] = None) -> tuple[Config, Any, int]:
    """The run's config (every model `auto` resolved for one local device) and the parameters of
    its latest (or given) committed checkpoint, on that device. Reads only the run directory."""
    cfg = load_run_config(run_dir)
    cfg = cfg.replace(mesh=MeshConfig(data=1, fsdp=1, tensor=1, rule="none"))
    ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint, primary=False)
    try:
        setup = make_setup(cfg, jax.devices()[:1])
        if step is None:
            found = ckpt.restore_latest(abstract_train_state(setup))
            if found is None:
                raise UserError(f"--run-dir: {run_dir} has no committed checkpoint yet")
            step, state, _ = found
        else:
            state, _ = ckpt.restore(step, abstract_train_state(setup))
    finally:
        ckpt.close()
    return setup.cfg, state.params, step


def refuse_existing_checkpoints(run_dir: Path, what: str) -> None:
    """A new run is written only where no run's checkpoints are (`what`: import, prune)."""
    ckpts = checkpoint_dir(run_dir)
    if ckpts.exists() and any(ckpts.iterdir()):
        where = remote_of(run_dir) or run_dir
        raise UserError(f"--run-dir: {where} already holds checkpoints; {what} into a new directory")


def write_new_run(run_dir: Path, cfg: Config, params: Any, meta: dict[str, Any], devices=None) -> None:
    """A run directory that training continues: `params` with a fresh optimizer state as a sealed
    step-0 checkpoint (`meta` joins its metadata), and config.yaml. The tokenizer is the caller's."""
    setup = make_setup(cfg, jax.devices() if devices is None else devices)
    state = state_around(setup, params)
    ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint)
    ckpt.save(0, state, {"step": 0, "data": {"iterator": {"next_index": 0}}, "config": cfg.fingerprint(), **meta},
              wait=True)
    ckpt.close()
    save_config(cfg, run_dir / "config.yaml")
