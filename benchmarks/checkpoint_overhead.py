"""What an asynchronous checkpoint every 50 steps costs, measured side by side in one run.

Trains `nano` twice through the CLI (the same data and steps), once without intermediate
checkpoints and once with `train.checkpoint_every=50`, and compares the training loop's wall time
(goodput.json: wall minus start-up and evaluation). Target: < 5% overhead. The two runs alternate
`--pairs` times and each side keeps its fastest loop: this VM's speed drifts by 10% over minutes,
as much as the effect measured.

    python benchmarks/checkpoint_overhead.py [--steps 150] [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def loop_seconds(run: Path) -> float:
    total = json.loads((run / "goodput.json").read_text())["total"]
    return total["wall_s"] - total["startup_s"] - total["eval_s"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="crosstrain-ckpt-bench-"))
    env = dict(os.environ)
    results: dict[str, dict] = {}
    try:
        measure(args, root, env, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    overhead = results["every_50"]["loop_s"] / results["none"]["loop_s"] - 1
    stall = results["every_50"]["checkpoint_stall_s"] / results["every_50"]["loop_s"]
    print(json.dumps({"runs": results, "overhead": overhead, "stall_fraction": stall, "target": 0.05}, indent=2))
    return 0 if overhead < 0.05 else 1


def measure(args, root: Path, env: dict, results: dict) -> None:
    for pair in range(args.pairs):
        sides = (("none", 0), ("every_50", 50))
        for name, every in sides if pair % 2 == 0 else sides[::-1]:
            run = root / f"{name}-{pair}"
            cmd = [sys.executable, "-m", "crosstrain", "train", "--preset", "nano", "--set", f"train.steps={args.steps}",
                   f"train.checkpoint_every={every}", "train.log_every=50", "train.eval_batches=1", "--run-dir", str(run)]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            summary = json.loads((run / "summary.json").read_text())
            loop = loop_seconds(run)
            loops = results.get(name, {}).get("all_loop_s", []) + [loop]
            if name not in results or loop < results[name]["loop_s"]:
                results[name] = {"loop_s": loop, "checkpoint_stall_s": summary["badput_s"]["checkpoint_stall_s"]}
            results[name]["all_loop_s"] = loops


if __name__ == "__main__":
    raise SystemExit(main())
