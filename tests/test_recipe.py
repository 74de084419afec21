"""Recipes as data: AFM-on-device's stages (train, prune, distil, continue, lengthen) in order,
resumable at the stage where they stopped."""

import json
import os
import subprocess
import sys

import pytest


def _recipe(run_dir, recipe="afm-on-device-tiny"):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "crosstrain", "recipe", "--recipe", recipe, "--run-dir", str(run_dir),
                           "--json"], env=env, capture_output=True, text=True, timeout=900)


def test_tiny_afm_recipe_runs_every_stage_and_resumes(tmp_path):
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
    assert result["baseline"]["params"] == stages[-1]["params"] and result["baseline"]["eval_loss"] is not None
    assert "distill" in (run / "core" / "config.yaml").read_text() and str(run / "teacher") in (run / "core" / "config.yaml").read_text()
    # Interrupted in the last stage: a rerun redoes only that stage.
    done = {s: (run / s / "summary.json").stat().st_mtime_ns for s in ("teacher", "core", "continued")}
    (run / "context" / "summary.json").unlink()
    proc = _recipe(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 'teacher' already done" in proc.stderr and "stage 5/5 'context' (train)" in proc.stderr
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
