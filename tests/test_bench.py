"""crosstrain bench: fields present and self-consistent (speed targets live in benchmarks/)."""

import json

import pytest

from crosstrain.cli import main

pytestmark = pytest.mark.slow  # a timed benchmark of the real step


def test_bench_json_is_complete_and_consistent(capsys, tmp_path):
    assert main(["bench", "--preset", "tiny", "--steps", "8", "--json", "--profile", str(tmp_path / "prof")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert any(f.name.endswith(".xplane.pb") for f in (tmp_path / "prof").rglob("*"))
    assert r["cpu_model"] and r["resolved"]["platform"] == "cpu" and "auto" not in r["resolved"].values()
    for key in ("tokens_per_s", "step_time_s", "compile_s", "achieved_tflops", "mfu", "matmul_ceiling_tflops",
                "predicted_step_time_s", "config", "host_overhead_s", "data_wait_s"):
        assert key in r, key
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(8 * 64, rel=1e-9)
    assert r["config"]["model"]["layers"] == 2 and r["config"]["train"]["batch"] == 8
    assert r["compile_s"] > 0 and r["step_time_s"] > 0
    ceiling = max(r["matmul_ceiling_tflops"].values())
    assert 0 < r["achieved_tflops"] <= ceiling
    assert r["achieved_tflops"] * 1e12 == pytest.approx(r["flops_per_token"] * r["tokens_per_s"], rel=1e-9)
    assert 0 < r["mfu"] <= 1 and r["predicted_step_time_s"] > 0
    # One peak in the report: on a CPU, MFU's peak is the matmul ceiling measured in this run.
    key = "bf16" if r["resolved"]["compute_dtype"] == "bfloat16" else "fp32"
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["matmul_ceiling_tflops"][key], rel=1e-9)
    assert r["attention_flops"] == "causal"
    assert 0 <= r["host_overhead_fraction"] < 1 and 0 <= r["data_wait_fraction"] < 1
    assert 0 <= r["data_wait_s"] <= r["data_fetch_s"]
    assert isinstance(r["huge_pages"], bool)


def test_bench_rejects_bad_steps(capsys):
    assert main(["bench", "--preset", "tiny", "--steps", "0"]) == 2
    assert "--steps: must be >= 1" in capsys.readouterr().err
