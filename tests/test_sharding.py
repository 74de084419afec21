"""Sharded training on 8 forced CPU devices matches the single-device run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from crosstrain.cli import main
from crosstrain.config import load_config
from crosstrain.parallel.mesh import apply_mesh_rule, select_rule
from crosstrain.parallel.rules import activate
from crosstrain.runtime import (
    batch_rows,
    global_batch_array,
    init_train_state,
    make_setup,
    per_device_state_bytes,
    process_rows,
    total_state_bytes,
)
from crosstrain.train.step import make_train_step

# Adam divides by |g| + eps: with eps = 1e-8, float-reordering noise in a gradient that is itself
# ~1e-8 (summation order differs between meshes) becomes an O(1) change in that element's update.
# eps = 1e-3 keeps the parameter comparison about the sharded computation; gradients are also
# compared directly below with the default eps.
BASE = ["model.compute_dtype=float32", "optim.warmup_steps=1", "optim.eps=1e-3"]


def run_steps(mesh, steps=3, extra=()):
    data, fsdp, tensor = mesh
    cfg = load_config("tiny", [*BASE, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", *extra])
    devices = jax.devices()[: data * fsdp * tensor]
    setup = make_setup(cfg, devices)
    rng = np.random.default_rng(0)
    with activate(setup.mesh):
        state = init_train_state(setup)
        step = jax.jit(make_train_step(cfg), in_shardings=(setup.state_shardings, setup.batch_sharding),
                       out_shardings=(setup.state_shardings, setup.replicated))
        losses = []
        for _ in range(steps):
            batch = rng.integers(0, cfg.model.vocab, size=(cfg.train.batch, cfg.model.seq_len + 1)).astype(np.int32)
            state, metrics = step(state, global_batch_array(setup, batch))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def single():
    return run_steps((1, 1, 1))


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 8, 1), (4, 1, 2)])
def test_sharded_steps_match_single_device(mesh, single):
    losses, params = run_steps(mesh)
    ref_losses, ref_params = single
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for path_a, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        b = ref_params
        for k in path_a:
            b = b[k.key]
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert rel < 1e-5, (jax.tree_util.keystr(path_a), rel)


@pytest.mark.slow
def test_sharded_gradients_match_single_device():
    from crosstrain.model import loss_fn

    grads = {}
    for mesh in [(1, 1, 1), (2, 2, 2), (1, 8, 1), (4, 1, 2)]:
        data, fsdp, tensor = mesh
        cfg = load_config("tiny", ["model.compute_dtype=float32", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])
        setup = make_setup(cfg, jax.devices()[: data * fsdp * tensor])
        batch = np.random.default_rng(1).integers(0, cfg.model.vocab, size=(8, 65)).astype(np.int32)
        with activate(setup.mesh):
            params = init_train_state(setup).params
            g = jax.jit(lambda p, b: jax.grad(loss_fn)(p, b, cfg.model))(params, global_batch_array(setup, batch))
        grads[mesh] = jax.device_get(g)
    ref = jax.tree.leaves(grads[(1, 1, 1)])
    for mesh, g in grads.items():
        for a, b in zip(jax.tree.leaves(g), ref):
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5, mesh


def _partitioner_rematerializations(mesh, extra=()):
    """What the SPMD partitioner had to replicate while compiling the tiny bf16 train step on
    `mesh` (data, fsdp, tensor), read from XLA's log as `plan --aot` reads it."""
    from crosstrain.parallel.compile_log import watch_compiler
    from crosstrain.runtime import abstract_train_state, compile_train_step

    data, fsdp, tensor = mesh
    cfg = load_config("tiny", ["model.compute_dtype=bfloat16", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                               f"mesh.tensor={tensor}", *extra])
    setup = make_setup(cfg, jax.devices()[: data * fsdp * tensor])
    with activate(setup.mesh), watch_compiler(echo=False) as log:
        compile_train_step(setup.cfg, setup, abstract_train_state(setup))
    return setup, log.rematerializations


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 4, 2), (4, 1, 2), (1, 8, 1)])
def test_sharded_steps_compile_without_involuntary_rematerialization(mesh):
    """The README's tensor-parallel example once made the partitioner replicate 8 tensors (the
    output loss's gather and scatter of embedding rows, the CPU form's row-major copies of
    weights sharded two ways)."""
    _, remats = _partitioner_rematerializations(mesh)
    assert remats == []


def test_the_partitioner_watch_sees_a_rematerialization():
    """The check above can fail: the CPU form's flattened row-major copies, forced onto weights
    sharded over fsdp and tensor, make the partitioner replicate them, and the watch sees it."""
    setup, remats = _partitioner_rematerializations((2, 2, 2), ["model.dot_transposes=copy"])
    assert setup.resolved.dot_transposes == "copy"
    assert remats and all("f32" in r or "bf16" in r for r in remats), remats


def test_gradient_accumulation_under_sharding(single):
    losses, params = run_steps((2, 2, 2), extra=["train.microbatches=2"])
    np.testing.assert_allclose(losses, single[0], rtol=1e-5)


@pytest.mark.slow
def test_per_device_bytes_shrink_with_fsdp():
    sizes = {}
    for k in (1, 2, 4, 8):
        cfg = load_config("tiny", [*BASE, "mesh.data=1", f"mesh.fsdp={k}", "mesh.tensor=1"])
        setup = make_setup(cfg, jax.devices()[:k])
        state = init_train_state(setup)
        sizes[k] = per_device_state_bytes(state)
        total = total_state_bytes(state)
    assert sizes[1] == total
    for k in (2, 4, 8):
        # Only the norm scales (a few hundred floats) stay replicated.
        assert total / k <= sizes[k] < 1.05 * total / k, (k, sizes[k], total)


@pytest.mark.parametrize("mesh", [(2, 2, 2), (8, 1, 1), (1, 4, 2), (4, 1, 2)])
def test_every_process_row_is_covered(mesh):
    """Each process feeds the rows its own devices hold, and the processes together feed the
    whole global batch, the same batch one process would: for 1, 2, 4 and 8 processes (devices
    grouped by id, as jax.distributed numbers each process's devices)."""
    data, fsdp, tensor = mesh
    cfg = load_config("tiny", [*BASE, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                               "train.batch=16"])
    setup = make_setup(cfg, jax.devices())
    shape = (cfg.train.batch, cfg.model.seq_len + 1)
    assert process_rows(setup) == (0, cfg.train.batch)  # this test runs as one process
    index = setup.batch_sharding.devices_indices_map(shape)
    devices = sorted(setup.mesh.devices.flat, key=lambda d: d.id)
    batch = np.arange(shape[0] * shape[1], dtype=np.int32).reshape(shape)
    for n in (1, 2, 4, 8):
        groups = [devices[i * len(devices) // n:(i + 1) * len(devices) // n] for i in range(n)]
        rows = [batch_rows(setup.batch_sharding, shape, g) for g in groups]
        for group, (lo, hi) in zip(groups, rows):
            held = {r for d in group for r in range(*index[d][0].indices(shape[0]))}
            assert held == set(range(lo, hi)), (n, group)  # exactly its devices' rows, contiguous
        # Processes either split the batch or, across the tensor axis, hold the same rows.
        spans = sorted(set(rows))
        assert spans[0][0] == 0 and spans[-1][1] == shape[0]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
        assert len({hi - lo for lo, hi in spans}) == 1  # every process reads as many rows
        # What each process would pass in, stitched together, is the global batch.
        assert np.array_equal(np.concatenate([batch[lo:hi] for lo, hi in spans]), batch)


@pytest.mark.parametrize(
    "sets, words",
    [
        (["mesh.data=3"], "data=3 x fsdp=1 x tensor=1 = 3, but there are 8 devices"),
        (["mesh.data=3", "mesh.fsdp=-1"], "data=3 x tensor=1 does not divide the 8 devices"),
        (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"], "= 4, but there are 8 devices"),
        (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"], "model.heads (4) is not divisible by mesh.tensor (8)"),
        (["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4"], "model.kv_heads (2) is not divisible by mesh.tensor (4)"),
        (["mesh.data=8", "train.batch=4"], "not divisible by the data-parallel size"),
        (["mesh.rule=tpu-v9"], "mesh.rule: unknown rule"),
    ],
)
def test_invalid_meshes_exit_2_before_compiling(sets, words, tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--set", *sets, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "checkpoints").exists()


def fake_device(platform, kind):
    return SimpleNamespace(platform=platform, device_kind=kind)


def test_mesh_rules_by_device_kind():
    picks = {
        ("tpu", "TPU v4"): "tpu-v4",
        ("tpu", "TPU v5"): "tpu-v5p",
        ("tpu", "TPU v5 lite"): "tpu-v5e",
        ("tpu", "TPU v6 lite"): "tpu-v6e",
        ("gpu", "NVIDIA H100 80GB HBM3"): "gpu",
        ("gpu", "NVIDIA A100-SXM4-80GB"): "gpu",
        ("neuron", "trn2"): "trn2",
        ("neuron", "NC_v2"): "trn1",
        ("cpu", "cpu"): "cpu",
    }
    for (platform, kind), name in picks.items():
        assert select_rule("auto", fake_device(platform, kind)).name == name, kind
    assert select_rule("auto", fake_device("gpu", "Some Future GPU")) is None
    assert select_rule("none", fake_device("cpu", "cpu")) is None


def test_mesh_rules_fill_only_what_is_unsaid():
    gpu16 = [fake_device("gpu", "NVIDIA H100 80GB HBM3")] * 16
    cfg, rule = apply_mesh_rule(load_config("tiny"), gpu16)
    assert rule.name == "gpu" and (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 8, 1)
    cfg, _ = apply_mesh_rule(load_config("tiny"), gpu16[:4])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 4, 1)
    trn2 = [fake_device("neuron", "trn2")] * 64
    cfg, _ = apply_mesh_rule(load_config("tiny"), trn2)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 4)
    v5e = [fake_device("tpu", "TPU v5 lite")] * 8
    cfg, rule = apply_mesh_rule(load_config("tiny"), v5e)
    # A rule lays out the mesh only; recomputation stays remat=auto's to decide from memory.
    assert rule.name == "tpu-v5e" and (cfg.mesh.data, cfg.mesh.fsdp) == (1, -1) and cfg.model.remat == "auto"
    cfg, _ = apply_mesh_rule(load_config("tiny", ["model.remat=selective", "mesh.tensor=2"]), v5e)
    assert cfg.model.remat == "selective" and cfg.mesh.tensor == 2 and cfg.mesh.fsdp == -1


def _cli_env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def _losses(run):
    import json

    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    args = ["train", "--preset", "tiny", "--set", "model.compute_dtype=float32", "train.steps=6"]
    one = subprocess.run([sys.executable, "-m", "crosstrain", *args, "--run-dir", str(tmp_path / "one")],
                         env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "crosstrain", "launch", "--processes", "2", "--devices-per-process", "2",
                          "--", *args, "mesh.fsdp=4", "--run-dir", str(tmp_path / "two")],
                         env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:]
    assert "[p0]" in two.stdout and "[p1]" in two.stdout
    assert "mesh slice=1 data=1 fsdp=4 tensor=1" in two.stdout and "in 2 process(es)" in two.stdout
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    assert not (tmp_path / "two" / "metrics.jsonl.tmp").exists()


def _find_child(process_id: int, run_dir: Path) -> int | None:
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            environ = (pid_dir / "environ").read_bytes().split(b"\0")
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if f"CROSSTRAIN_PROCESS_ID={process_id}".encode() in environ and str(run_dir).encode() in cmdline:
            return int(pid_dir.name)
    return None


@pytest.mark.slow
def test_launch_ends_every_process_when_one_dies(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crosstrain", "launch", "--processes", "2", "--devices-per-process", "1", "--",
         "train", "--preset", "tiny", "--set", "train.steps=100000", "train.log_every=100", "--run-dir", str(run)],
        env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)
        victim = _find_child(1, run)
        survivor = _find_child(0, run)
        assert victim and survivor
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "[launch] process 1 exited with status -9; ending the others" in out
    time.sleep(0.5)
    assert _find_child(0, run) is None  # the survivor was ended, not left hanging in a collective
