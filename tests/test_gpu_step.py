"""The GPU step, compiled here without a GPU: the shipped target descriptions, meshes over nodes,
cuDNN attention under every remat policy, and `plan --aot` for NVIDIA chips (the `cuda` extra)."""

import collections
import importlib.util
import json
import re

import numpy as np
import pytest

from crosstrain.cli import main
from crosstrain.config import load_config
from crosstrain.hardware import detect_chip
from crosstrain.parallel.mesh import MeshShape, build_mesh

needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                       reason="the CUDA plugin (the cuda extra) is not installed")


@needs_cuda_plugin
@pytest.mark.parametrize("chip,kind", [("h100-sxm", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200"),
                                       ("b200", "NVIDIA B200")])
def test_shipped_targets_describe_clusters_the_catalog_knows(chip, kind):
    from crosstrain.planner.aot import gpu_memory_bytes, topology_devices

    name, devices = topology_devices(chip, 16)
    assert name == f"2 node(s) x 8 {chip}" and len(devices) == 16
    assert {d.process_index for d in devices} == {0, 1}
    assert devices[0].device_kind == kind and detect_chip(devices[0]).name == chip
    # The device reports (and XLA plans against) a little more than the datasheet's decimal GB.
    assert 1.0 <= gpu_memory_bytes(chip) / (detect_chip(devices[0]).hbm_gib * 2**30) <= 1.08


@needs_cuda_plugin
def test_a_gpu_mesh_keeps_inner_axes_inside_a_node():
    from crosstrain.planner.aot import topology_devices

    _, devices = topology_devices("h100-sxm", 32)
    mesh = build_mesh(MeshShape(data=2, fsdp=16, tensor=1), devices)
    nodes = np.vectorize(lambda d: d.process_index)(mesh.devices)[0, :, :, 0]  # [data, fsdp]
    # Each data-parallel replica spans two whole nodes; fsdp's 16 = 2 nodes x 8 NVLink peers.
    assert [sorted(set(row)) for row in nodes] == [[0, 1], [2, 3]]
    mesh = build_mesh(MeshShape(data=4, fsdp=2, tensor=4), devices)
    nodes = np.vectorize(lambda d: d.process_index)(mesh.devices)[0]
    # tensor x fsdp = 8: each (data) replica is one node, so tensor traffic never leaves NVLink.
    assert all(len(set(nodes[i].flat)) == 1 for i in range(4))


@needs_cuda_plugin
def test_aot_refuses_what_it_cannot_compile_with_one_line(capsys):
    assert main(["plan", "--preset", "nano", "--chip", "h100-sxm", "--chips", "12", "--aot"]) == 2
    assert "--chips" in capsys.readouterr().err
    assert main(["plan", "--preset", "nano", "--chip", "a100-40gb", "--chips", "8", "--aot"]) == 2
    assert "--aot" in capsys.readouterr().err


@pytest.mark.slow
@needs_cuda_plugin
def test_aot_compiles_a_small_model_for_8_h100_with_cudnn_attention(capsys):
    assert main(["plan", "--preset", "nano", "--chip", "h100-sxm", "--chips", "8", "--aot", "--json"]) == 0
    aot = json.loads(capsys.readouterr().out)["aot"]
    assert aot["platform"] == "gpu" and aot["topology"] == "1 node(s) x 8 h100-sxm"
    assert aot["attention"] == "cudnn" and aot["resolved"]["activation_dtype"] == "bfloat16"
    assert aot["fits"] is True and aot["memory_per_chip_gib"] > 0 and aot["compile_s"] > 0
    assert aot["involuntary_rematerializations"] == 0
    assert aot["xla_estimated_step_s"] is None and "no cost analysis" in aot["xla_estimate_basis"]


@pytest.mark.slow
@needs_cuda_plugin
def test_tensor_parallel_gpu_step_partitions_without_replicating(capsys):
    assert main(["plan", "--preset", "nano", "--chip", "h100-sxm", "--chips", "8", "--set", "train.batch=16",
                 "--parallelism", "tp=2,pp=1,dp=1,fsdp=4,cp=1", "--remat", "selective", "--aot", "--json"]) == 0
    aot = json.loads(capsys.readouterr().out)["aot"]
    assert aot["mesh"] == {"slice": 1, "data": 1, "fsdp": 4, "tensor": 2}
    assert aot["involuntary_rematerializations"] == 0, aot["rematerialized"]


@pytest.mark.slow
@needs_cuda_plugin
@pytest.mark.parametrize("remat,forwards", [("selective", 2), ("attention", 2), ("full", 4)])
def test_cudnn_attention_is_recomputed_only_under_full_remat(remat, forwards):
    """cuDNN's residuals carry the names remat policies keep, as Splash's do: selective and
    attention keep them (one forward per layer), full recomputes the forward in the backward."""
    from crosstrain.planner.aot import _compile, _program, topology_devices

    _, devices = topology_devices("h100-sxm", 8)
    program = _program(load_config("nano"), layers=2, remat=remat, batch=8, microbatches=1,
                       mesh={"slice": 1, "data": 1, "fsdp": 8, "tensor": 1}, scan=False)
    compiled, setup = _compile(program, devices)
    assert setup.cfg.model.attention == "cudnn"
    calls = collections.Counter(re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', compiled.as_text()))
    assert calls["__cudnn$fmhaSoftmax"] == forwards and calls["__cudnn$fmhaSoftmaxBackward"] == 2


@pytest.mark.slow
@needs_cuda_plugin
def test_aot_afm_on_device_on_64_h100_fits_as_the_planner_says(capsys):
    assert main(["plan", "--preset", "afm-on-device-3b", "--chip", "h100-sxm", "--chips", "64", "--aot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    aot = out["aot"]
    assert aot["platform"] == "gpu" and aot["attention"] == "cudnn" and aot["fits"] is True
    assert aot["topology"] == "8 node(s) x 8 h100-sxm" and aot["involuntary_rematerializations"] == 0
    assert abs(aot["planner_rel_error"]) <= 0.15
