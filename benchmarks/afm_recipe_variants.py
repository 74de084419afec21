"""AFM-on-device's demo recipe in four variants: top-1 or KL distillation, from the pruned teacher
or from scratch; each student's held-out loss against the from-scratch baseline at equal steps.

    python benchmarks/afm_recipe_variants.py [--out runs/afm-variants]

The teacher (and the pruned stage) are trained once and copied into every variant's directory, so
the recipe runner skips them there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from crosstrain import log as logsetup
from crosstrain.recipe import read_recipe, run_recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/afm-variants")
    args = ap.parse_args()
    logsetup.setup()
    out = Path(args.out)
    base = read_recipe("afm-on-device-demo")
    shared = out / "pruned-top1"
    rows = []
    for name, mode, pruned_init in (("pruned-top1", "top1", True), ("pruned-kl", "kl", True),
                                    ("scratch-top1", "top1", False), ("scratch-kl", "kl", False)):
        recipe = json.loads(json.dumps(base))
        core = next(s for s in recipe["stages"] if s["name"] == "core")
        core["set"] = list(core.get("set") or []) + [f"distill.mode={mode}"] + (["distill.temperature=2"] if mode == "kl" else [])
        if not pruned_init:
            # The student's shape from scratch (no pruned initialisation), distilled all the same.
            core.pop("from")
            core["preset"] = "tiny"
            core["set"] = ["model.compute_dtype=float32", "optim.warmup_steps=2", "train.checkpoint_every=10"] + core["set"][2:]
        recipe["name"] = f"afm-on-device-demo-{name}"
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        if d != shared and (shared / "teacher" / "summary.json").is_file():
            for stage in ("teacher", "pruned", "baseline"):
                if not (d / stage).exists() and (shared / stage).exists():
                    shutil.copytree(shared / stage, d / stage)
        path = d / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        result = run_recipe(str(path), d)
        last = result["stages"][-1]
        core_stage = next(s for s in result["stages"] if s["name"] == "core")
        rows.append({"variant": name, "distill": mode, "pruned_init": pruned_init,
                     "core_eval_loss": core_stage["eval_loss"], "core_eval_loss_se": core_stage["eval_loss_se"],
                     "final_eval_loss": last["eval_loss"], "final_eval_loss_se": last["eval_loss_se"],
                     "baseline_eval_loss": result["baseline"]["eval_loss"],
                     "baseline_eval_loss_se": result["baseline"]["eval_loss_se"],
                     "student_steps": sum(s["steps"] for s in result["stages"] if s["name"] in ("core", "continued", "context")),
                     "baseline_steps": result["baseline"]["steps"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / "variants.json").write_text(json.dumps(rows, indent=1))
    from crosstrain.hardware import cpu_model

    print(f"held-out loss ± standard error; {cpu_model()}")
    print(f"{'variant':>14} {'after core':>17} {'after last stage':>17} {'baseline':>17}  last - baseline")
    for r in rows:
        diff = r["final_eval_loss"] - r["baseline_eval_loss"]
        noise = 2 * (r["final_eval_loss_se"] ** 2 + r["baseline_eval_loss_se"] ** 2) ** 0.5
        print(f"{r['variant']:>14} {r['core_eval_loss']:9.4f} ± {r['core_eval_loss_se']:.4f} "
              f"{r['final_eval_loss']:9.4f} ± {r['final_eval_loss_se']:.4f} "
              f"{r['baseline_eval_loss']:9.4f} ± {r['baseline_eval_loss_se']:.4f}  {diff:+.4f} "
              f"({'beyond' if abs(diff) > noise else 'within'} 2 standard errors, {noise:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
