"""Recipes as data: AFM-on-device's stages (train, prune, distil, continue, lengthen) in order,
resumable at the stage where they stopped."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def _recipe(run_dir, recipe="afm-on-device-demo"):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "crosstrain", "recipe", "--recipe", recipe, "--run-dir", str(run_dir),
                           "--json"], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_afm_demo_recipe_runs_every_stage_and_resumes_mid_stage(tmp_path):
    run = tmp_path / "afm"
    proc = _recipe(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "recipe.json").read_text())
    assert json.loads(proc.stdout) == result
    stages = result["stages"]
    assert [s["name"] for s in stages] == ["teacher", "pruned", "core", "continued", "context"]
    assert [s["kind"] for s in stages] == ["train", "prune", "train", "train", "train"]
    assert [s["seq_len"] for s in stages] == [64, 64, 64, 128, 256]
    assert stages[-1]["rope_base"] == 6315089
    assert stages[1]["params"] < stages[0]["params"] and stages[2]["params"] == stages[1]["params"]
    assert all(s[k] is not None for s in stages for k in ("steps", "final_loss", "eval_loss", "run_dir"))
    assert result["baseline"]["params"] == stages[-1]["params"]
    # At equal steps, the pruned-and-distilled student beats the same shape trained from scratch.
    assert result["baseline"]["steps"] == sum(s["steps"] for s in stages[2:]) == 60
    assert stages[-1]["eval_loss"] < result["baseline"]["eval_loss"]
    assert stages[2]["distilled_from"].endswith("/teacher") and stages[2]["initialised_from"].endswith("/pruned")
    assert stages[3]["distilled_from"] is None and stages[3]["initialised_from"].endswith("/core")
    # Interrupted in the middle of the last stage (after its checkpoint 5 of 10): a rerun skips the
    # finished stages and resumes that one at its step.
    done = {s: (run / s / "summary.json").stat().st_mtime_ns for s in ("teacher", "core", "continued")}
    (run / "context" / "summary.json").unlink()
    shutil.rmtree(run / "context" / "checkpoints" / "10")
    proc = _recipe(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 'teacher' already done" in proc.stderr and "stage 5/5 'context' (train)" in proc.stderr
    assert "resumed from checkpoint 5" in proc.stderr
    assert {s: (run / s / "summary.json").stat().st_mtime_ns for s in done} == done
    assert (run / "context" / "summary.json").is_file()


@pytest.mark.parametrize("text, words", [
    ("stages: []", "non-empty list of stages"),
    ("stages: [{name: a, kind: bake, preset: tiny}]", "kind: must be one of"),
    ("stages: [{name: a, kind: train, from: b}]", "'b' is not an earlier stage"),
    ("stages: [{name: a, preset: tiny, colour: red}]", "unknown key(s) colour"),
])
def test_bad_recipes_exit_2_with_one_line(tmp_path, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    proc = _recipe(tmp_path / "run", str(path))
    assert proc.returncode == 2 and words in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_plan_a_recipe_stage_by_stage(capsys):
    from crosstrain.cli import main

    assert main(["plan", "--recipe", "afm-on-device", "--compare", "tpu-v5p:2048,trn2:1024", "--json"]) == 0
    v5p, trn2 = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in v5p["stages"]] == ["teacher", "pruned", "core", "continued", "context"]
    assert [s["seq_len"] for s in v5p["stages"]] == [4096, 4096, 4096, 8192, 32768]
    assert v5p["all_fit"] and v5p["total"]["days"] == pytest.approx(sum(s["days"] for s in v5p["stages"]))
    # Distilling costs the teacher's forward on top of the student's step.
    core = v5p["stages"][2]
    assert core["distilled_from"] == "teacher" and core["step_time_s"] > 0
    # Without a flash kernel on Trainium, the 32K-token stage fits no layout of 1024 trn2: said, not hidden.
    assert not trn2["all_fit"] and "does not fit" not in json.dumps(v5p)
    assert trn2["stages"][-1]["fits"] is False and "GiB" in trn2["stages"][-1]["error"]
