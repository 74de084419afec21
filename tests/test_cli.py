import json
import os
import subprocess
import sys

import pytest

from crosstrain.cli import main


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--preset", "no-such", "--run-dir", "{tmp}"], "unknown preset"),
        (["train", "--preset", "tiny", "--set", "model.layerz=1", "--run-dir", "{tmp}"], "model.layerz: unknown key"),
        (["train", "--preset", "tiny", "--set", "model.layers=two", "--run-dir", "{tmp}"], "model.layers: expected an integer"),
        (["train", "--preset", "tiny", "--set", "model.heads=3", "--run-dir", "{tmp}"], "model.heads: 3 is not divisible"),
        (["train", "--preset", "tiny", "--data", "/no/such/corpus", "--run-dir", "{tmp}"], "data.path: /no/such/corpus does not exist"),
        (["train", "--preset", "tiny"], "--run-dir"),
        (["train", "--preset", "tiny", "--run-dir", "{tmp}", "--bogus"], "unrecognized arguments"),
        (["generate", "--run-dir", "{tmp}/nothing", "--prompt", "x"], "does not exist"),
        (["frobnicate"], "invalid choice"),
        (["plan", "--preset", "tiny", "--chip", "tpu-v5p", "--chips", "0"], "--chips: must be >= 1"),
        (["plan", "--preset", "tiny", "--chip", "tpu-v5p", "--chips", "8", "--tokens", "-5T"], "--tokens: must be positive"),
        (["plan", "--preset", "tiny", "--chip", "tpu-v5p", "--chips", "8", "--objective", "cost", "--max-days", "-1"],
         "--max-days: must be positive"),
        (["generate", "--run-dir", "{tmp}", "--prompt", "x", "--greedy", "--temperature", "0.7"], "--greedy"),
        (["eval", "--run-dir", "{tmp}", "--max-tokens", "-3"], "--max-tokens"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, words, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crosstrain: error:")
    assert words in err
    assert "Traceback" not in err and err.count("crosstrain") == 1  # the program named once


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("crosstrain 0.")
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: time)" in out and "published_cases.csv" in out and "shared/" not in out


def test_a_refused_recipe_leaves_no_log_behind(tmp_path):
    run = tmp_path / "recipe"
    assert main(["recipe", "--recipe", "no-such-recipe", "--run-dir", str(run)]) == 2
    assert not (run / "train.log").exists()


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "crosstrain", "train", "--preset", "tiny", "--set", "optim.lr=-1", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["crosstrain: error: optim.lr: must be positive, got -1.0"]
    assert not any(tmp_path.iterdir())  # nothing written for a rejected config


PROBE = """
import os, sys
from crosstrain.platform import reexec_with_huge_pages
reexec_with_huge_pages(sys.argv)
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_programs_restart_with_huge_pages_keeping_other_tunables(tmp_path, opt_out):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    # A user's own hugetlb choice is left as it is.
    mine = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    out = subprocess.run([sys.executable, str(probe)], env=mine, capture_output=True, text=True, timeout=60).stdout
    assert out.split()[1] == "glibc.malloc.hugetlb=0"
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    env.pop("CROSSTRAIN_HUGE_PAGES", None)
    if opt_out:
        env["CROSSTRAIN_HUGE_PAGES"] = "0"
    proc = subprocess.Popen([sys.executable, str(probe)], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, tunables = out.split()
    assert int(pid) == proc.pid  # exec'd in place: launchers and signals still see the same process
    want = "glibc.malloc.tcache_count=7" + ("" if opt_out else ":glibc.malloc.hugetlb=1")
    assert tunables == want


@pytest.mark.slow
def test_a_run_whose_data_moved_away_still_generates_evaluates_and_exports(tmp_path):
    """Commands check only the files they use: a run copied off a cluster has no training data."""

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "crosstrain", *args], env=env, capture_output=True, text=True,
                              timeout=600)

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000)))
    run = tmp_path / "run"
    assert cli("train", "--preset", "tiny", "--set", "train.steps=4", "--data", str(corpus), "--run-dir", str(run)).returncode == 0
    text = tmp_path / "held.txt"
    text.write_text(corpus.read_text()[:4000])
    corpus.rename(tmp_path / "moved.txt")
    gen = cli("generate", "--run-dir", str(run), "--prompt", "def ", "--max-new-tokens", "4", "--greedy")
    assert gen.returncode == 0, gen.stderr[-2000:]
    ev = cli("eval", "--run-dir", str(run), "--text-file", str(text), "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["tokens"] > 0
    ex = cli("export", "--run-dir", str(run), "--out", str(tmp_path / "hf"))
    assert ex.returncode == 0, ex.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").is_file()
    # Training on (which reads the data) still says the path is gone, in one line.
    again = cli("train", "--preset", str(run / "config.yaml"), "--set", "train.steps=6", "--run-dir", str(run))
    assert again.returncode == 2 and "does not exist" in again.stderr and again.stderr.strip().count("\n") == 0
