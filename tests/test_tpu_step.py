"""The TPU-grade step: Splash attention (run here in Pallas interpret mode), every `auto` resolved
once from the mesh's devices, remat policies, multi-slice meshes, and the TPU compile check."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosstrain.cli import main
from crosstrain.config import load_config
from crosstrain.errors import ConfigError
from crosstrain.model import init_params, loss_fn
from crosstrain.model.attention import reference_attention, splash_attention
from crosstrain.parallel.mesh import apply_mesh_rule
from crosstrain.parallel.rules import activate
from crosstrain.resolve import resolve_model
from crosstrain.runtime import make_setup

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")


def _qkv(b=2, s=256, h=4, kvh=2, d=128, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (b, s, n, d), dtype) for k, n in zip(keys, (h, kvh, kvh)))


@pytest.mark.slow
def test_splash_matches_the_reference_forward_and_gradients():
    q, k, v = _qkv()
    pos = jnp.arange(q.shape[1], dtype=jnp.int32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, q_pos=pos, kv_pos=pos)))

    splash = lambda q, k, v, **kw: splash_attention(q, k, v, interpret=True, **kw)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v, q_pos=pos, kv_pos=pos), reference_attention(q, k, v, q_pos=pos, kv_pos=pos),
                               atol=2e-6)
    ours = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_under_shard_map_on_a_data_by_tensor_mesh():
    """Mosaic kernels cannot be partitioned by the compiler: Splash runs per shard (batch over
    data x fsdp, heads over tensor) and gives the unsharded answer."""
    cfg = load_config("tiny", ["model.heads=4", "model.kv_heads=2", "model.head_dim=128", "model.seq_len=128",
                               "model.compute_dtype=float32", "model.attention=splash", "mesh.data=2", "mesh.fsdp=2",
                               "mesh.tensor=2", "mesh.rule=none"])
    setup = make_setup(cfg, jax.devices()[:8])
    assert setup.cfg.model.attention == "splash" and setup.cfg.model.kernel_mode == "interpret"
    q, k, v = _qkv(b=4, s=128)
    pos = jnp.arange(128, dtype=jnp.int32)
    with activate(setup.mesh):
        got = jax.jit(lambda q, k, v: splash_attention(q, k, v, q_pos=pos, kv_pos=pos, interpret=True))(q, k, v)
    np.testing.assert_allclose(got, reference_attention(q, k, v, q_pos=pos, kv_pos=pos), atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["selective", "dots", "attention", "full"])
def test_every_remat_policy_gives_the_same_gradients(policy):
    base = ["model.compute_dtype=float32", "model.activation_dtype=float32", "model.attention=reference"]
    cfg = load_config("tiny", base + ["model.remat=none"]).model
    other = load_config("tiny", base + [f"model.remat={policy}"]).model
    params = init_params(cfg, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, size=(2, cfg.seq_len + 1)), jnp.int32)
    want = jax.grad(loss_fn)(params, tokens, cfg)
    got = jax.grad(loss_fn)(params, tokens, other)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_auto_choices_resolve_from_the_devices_not_the_model_code():
    cfg = load_config("tiny")
    model, resolved = resolve_model(cfg.model, jax.devices()[:1], mesh_sizes={"data": 1}, micro_per_rank=8)
    assert "auto" not in resolved.to_dict().values()
    assert (resolved.platform, model.attention, model.activation_dtype, model.dot_transposes, model.kernel_mode,
            model.remat) == ("cpu", "fused", "float32", "copy", "interpret", "none")
    # An explicit choice is honoured.
    model, _ = resolve_model(load_config("tiny", ["model.attention=reference", "model.remat=full"]).model,
                             jax.devices()[:1])
    assert (model.attention, model.remat) == ("reference", "full")
    # Model code names no backend: every platform decision lives in crosstrain/resolve.py.
    for path in (Path(__file__).parents[1] / "crosstrain" / "model").glob("*.py"):
        text = path.read_text()
        for word in ("default_backend", "jax.devices(", ".platform"):
            assert word not in text, f"{path.name} mentions {word}"


def test_splash_refuses_a_shape_it_cannot_take():
    with pytest.raises(ConfigError, match="model.attention"):
        resolve_model(load_config("tiny", ["model.attention=splash", "model.head_dim=64"]).model, jax.devices()[:1])
    with pytest.raises(ConfigError, match="model.kernel_mode"):
        resolve_model(load_config("tiny", ["model.attention=splash", "model.head_dim=128", "model.seq_len=128",
                                           "model.kernel_mode=compiled"]).model, jax.devices()[:1])


def test_remat_auto_recomputes_only_when_memory_runs_out():
    from crosstrain.hardware import get_chip
    from crosstrain.resolve import _remat

    class FakeV5p:  # a device that only names its kind, as a TPU topology's devices do
        platform = "tpu"
        device_kind = "TPU v5"

    m = load_config("afm-on-device-3b").model
    assert get_chip("tpu-v5p").hbm_gib == 95
    small, _ = _remat(m, [FakeV5p()] * 8, "splash", {"data": 1, "fsdp": 8}, micro_per_rank=1)
    big, _ = _remat(m, [FakeV5p()] * 8, "splash", {"data": 1, "fsdp": 8}, micro_per_rank=16)
    assert small == "none" and big in ("attention", "full")


@pytest.mark.slow
def test_splash_training_gives_the_reference_losses(tmp_path):
    from crosstrain.train.loop import train

    losses = {}
    for kernel in ("splash", "reference"):
        cfg = load_config("tiny", [f"model.attention={kernel}", "model.head_dim=128", "model.seq_len=128",
                                   "model.compute_dtype=float32", "train.steps=3", "mesh.data=1"])
        summary = train(cfg, tmp_path / kernel, devices=jax.devices()[:1])
        assert summary["resolved"]["attention"] == kernel and "auto" not in summary["resolved"].values()
        losses[kernel] = [json.loads(line)["loss"] for line in (tmp_path / kernel / "metrics.jsonl").read_text().splitlines()]
        # config.yaml keeps what was asked for, so the run stays portable between machines.
        assert "activation_dtype: auto" in (tmp_path / kernel / "config.yaml").read_text()
    np.testing.assert_allclose(losses["splash"], losses["reference"], rtol=1e-4)


@needs_libtpu
def test_multislice_mesh_puts_data_parallelism_across_slices():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", num_slices=2).devices
    cfg, rule = apply_mesh_rule(load_config("tiny"), devices)
    assert rule.name == "tpu-v5p" and (cfg.mesh.slice, cfg.mesh.fsdp) == (2, -1)
    setup = make_setup(cfg, devices)
    assert dict(setup.mesh.shape) == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}
    # Each slice holds one index of the slice axis.
    for i in range(2):
        assert {d.slice_index for d in setup.mesh.devices[i].flat} == {i}


@pytest.mark.slow
@needs_libtpu
def test_aot_compiles_afm_on_device_for_8_v5p_with_splash_and_fits(capsys):
    assert main(["plan", "--preset", "afm-on-device-3b", "--chip", "tpu-v5p", "--chips", "8", "--aot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    aot = out["aot"]
    assert aot["topology"] == "v5p:2x2x2" and aot["attention"] == "splash" and aot["fits"] is True
    assert abs(aot["planner_rel_error"]) <= 0.15
    assert aot["xla_estimated_step_s"] > 0 and aot["compile_s"] > 0
    assert aot["resolved"]["activation_dtype"] == "bfloat16" and aot["resolved"]["kernel_mode"] == "compiled"


@pytest.mark.slow
@needs_libtpu
def test_aot_compiles_a_multislice_v4_topology(capsys):
    assert main(["plan", "--preset", "nano", "--chip", "tpu-v4", "--chips", "8", "--slices", "2", "--set", "train.batch=32",
                 "--parallelism", "tp=1,pp=1,dp=2,fsdp=4,cp=1", "--remat", "full", "--aot", "--json"]) == 0
    aot = json.loads(capsys.readouterr().out)["aot"]
    # libtpu lays v4 out per TensorCore: 2 devices a chip, the extra factor on fsdp.
    assert aot["topology"] == "v4:2x2x1 x 2 slices" and aot["devices_per_chip"] == 2
    assert aot["mesh"] == {"slice": 2, "data": 1, "fsdp": 8, "tensor": 1} and aot["fits"] is True
    assert abs(aot["planner_rel_error"]) <= 0.25


@pytest.mark.slow
@needs_libtpu
def test_tensor_parallel_tpu_step_partitions_without_replicating(capsys):
    assert main(["plan", "--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--set", "train.batch=16",
                 "--parallelism", "tp=2,pp=1,dp=1,fsdp=4,cp=1", "--remat", "selective", "--aot", "--json"]) == 0
    aot = json.loads(capsys.readouterr().out)["aot"]
    assert aot["platform"] == "tpu" and aot["mesh"] == {"slice": 1, "data": 1, "fsdp": 4, "tensor": 2}
    assert aot["involuntary_rematerializations"] == 0, aot["rematerialized"]


@needs_libtpu
def test_aot_refuses_bad_topologies_and_kernels_with_one_line(capsys):
    assert main(["plan", "--preset", "nano", "--chip", "tpu-v5p", "--chips", "12", "--aot"]) == 2
    assert "--chips" in capsys.readouterr().err
    assert main(["plan", "--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--set", "model.attention=splash",
                 "--set", "model.head_dim=64", "--aot"]) == 2
    err = capsys.readouterr().err
    assert "model.attention" in err and len(err.strip().splitlines()) == 1


def test_cpu_compute_dtype_follows_the_machines_gemm_rates():
    from crosstrain.hardware import cpu_matmul_ceiling
    from crosstrain.resolve import cpu_compute_dtype

    # The three CPUs measured so far (TFLOP/s; docs/performance.md): bf16 wins where its GEMMs do.
    assert cpu_compute_dtype({"fp32": 0.40, "bf16": 0.80})[0] == "bfloat16"  # AMD EPYC Zen 5
    assert cpu_compute_dtype({"fp32": 0.271, "bf16": 0.158})[0] == "float32"  # Intel Xeon model 207
    assert cpu_compute_dtype({"fp32": 0.356, "bf16": 1.716})[0] == "bfloat16"  # Intel Xeon model 167 (AMX)
    # compute_dtype=auto resolves on this machine from its own cached measurement; explicit wins.
    model, resolved = resolve_model(load_config("demo").model, jax.devices()[:1])
    assert resolved.compute_dtype == cpu_compute_dtype(cpu_matmul_ceiling())[0] == model.compute_dtype
    model, _ = resolve_model(load_config("demo", ["model.compute_dtype=float32"]).model, jax.devices()[:1])
    assert model.compute_dtype == "float32"
