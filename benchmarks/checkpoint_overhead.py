"""What an asynchronous checkpoint every 50 steps costs, measured side by side in one run.

Trains `nano` twice through the CLI (the same data and steps), once without intermediate
checkpoints and once with `train.checkpoint_every=50`, and compares the training loop's wall time
(goodput.json: wall minus start-up and evaluation). Target: < 5% overhead. The two runs alternate
`--pairs` times and each side keeps its fastest loop: this VM's speed drifts by 10% over minutes,
as much as the effect measured.

    python benchmarks/checkpoint_overhead.py [--steps 150] [--pairs 2] [--preset nano] [--s3]

With `--s3` both runs keep their run directory in a bucket on a local S3-compatible server
(moto's, benchmarks/local_s3.py), checkpoints included. Every run's data wait (the batch time the
device sat idle for, target < 1% of the step) and data fetch (all the host's batch time, most of it
behind the running step) are reported beside the overhead.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loop_seconds(run: Path) -> float:
    total = json.loads((run / "goodput.json").read_text())["total"]
    return total["wall_s"] - total["startup_s"] - total["eval_s"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--s3", action="store_true", help="run directories in a bucket on a local S3 server")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="crosstrain-ckpt-bench-"))
    env = dict(os.environ, CROSSTRAIN_CACHE=str(root / "cache"))
    results: dict[str, dict] = {}
    try:
        if args.s3:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from local_s3 import serve

            with serve() as s3_env:
                measure(args, root, {**env, **s3_env}, results, base="s3://crosstrain-bench")
        else:
            measure(args, root, env, results, base=str(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    overhead = results["every_50"]["loop_s"] / results["none"]["loop_s"] - 1
    stall = results["every_50"]["checkpoint_stall_s"] / results["every_50"]["loop_s"]
    # Both runs save at their last step; the saves every 50 steps are what the stall beyond that is.
    extra_stall = (results["every_50"]["checkpoint_stall_s"] - results["none"]["checkpoint_stall_s"]) / \
        results["every_50"]["loop_s"]
    from crosstrain.hardware import cpu_model

    print(json.dumps({"runs": results, "overhead": overhead, "stall_fraction": stall,
                      "stall_fraction_beyond_final_save": extra_stall, "target": 0.05,
                      "data_wait_fraction": results["every_50"]["data_wait_fraction"],
                      "data_fetch_fraction": results["every_50"]["data_fetch_fraction"], "data_wait_target": 0.01,
                      "preset": args.preset, "run_dir": "s3 (local server)" if args.s3 else "local disk",
                      "cpu": cpu_model()}, indent=2))
    return 0 if overhead < 0.05 else 1


def measure(args, root: Path, env: dict, results: dict, *, base: str) -> None:
    from crosstrain.storage import local_run

    for pair in range(args.pairs):
        sides = (("none", 0), ("every_50", 50))
        for name, every in sides if pair % 2 == 0 else sides[::-1]:
            url = f"{base}/{name}-{pair}"
            cmd = [sys.executable, "-m", "crosstrain", "train", "--preset", args.preset, "--set", f"train.steps={args.steps}",
                   f"train.checkpoint_every={every}", "train.log_every=10", "train.eval_batches=1", "--run-dir", url]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "CROSSTRAIN_"))})
            run = local_run(url, "--run-dir")  # the bucket's copy, for a run kept there
            summary = json.loads((run / "summary.json").read_text())
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            steps = sum(r["step_time_s"] for r in records[1:])
            # Data wait: batch time the device sat idle for; data fetch: all the host's batch time,
            # most of it behind the running step (metrics.jsonl).
            wait = sum(r["data_wait_s"] for r in records[1:]) / steps
            fetch = sum(r["data_fetch_s"] for r in records[1:]) / steps
            loop = loop_seconds(run)
            loops = results.get(name, {}).get("all_loop_s", []) + [loop]
            if name not in results or loop < results[name]["loop_s"]:
                results[name] = {"loop_s": loop, "checkpoint_stall_s": summary["badput_s"]["checkpoint_stall_s"],
                                 "data_wait_fraction": wait, "data_fetch_fraction": fetch}
            results[name]["all_loop_s"] = loops


if __name__ == "__main__":
    raise SystemExit(main())
