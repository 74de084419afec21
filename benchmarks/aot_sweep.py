"""Planner vs XLA on TPU and GPU: compile crosstrain's real step for TPU topologies with libtpu and
for NVIDIA GPU clusters with the CUDA plugin (no TPU or GPU needed) and put XLA's memory (and on
TPU its time estimate) beside the planner's, for a sweep of shapes and chip counts. Writes a JSON
table; docs/planner.md quotes the result.

    python benchmarks/aot_sweep.py [--out benchmarks/results/aot_sweep.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from crosstrain.config import load_config  # noqa: E402
from crosstrain.hardware import get_chip  # noqa: E402
from crosstrain.planner.aot import compile_step  # noqa: E402

# (label, preset, overrides, chip, chips, slices, parallelism, remat); parallelism None = the
# planner's searched layout.
SWEEP = [
    ("afm-on-device-3b, 8 v5p (searched plan)", "afm-on-device-3b", [], "tpu-v5p", 8, 1, None, None),
    ("afm-on-device-3b, 1024 v5p (searched plan)", "afm-on-device-3b", [], "tpu-v5p", 1024, 1, None, None),
    ("afm-on-device-3b, 64 v5p, fsdp, micro 4, selective", "afm-on-device-3b", [], "tpu-v5p", 64, 1,
     {"tp": 1, "pp": 1, "dp": 1, "fsdp": 64, "cp": 1, "microbatch": 4}, "selective"),
    ("afm-on-device-3b seq 2048, 64 v5p, fsdp, micro 8, full", "afm-on-device-3b", ["model.seq_len=2048"], "tpu-v5p", 64, 1,
     {"tp": 1, "pp": 1, "dp": 1, "fsdp": 64, "cp": 1, "microbatch": 8}, "full"),
    ("1.2B (16 x 2048), 64 v5p, fsdp, micro 8, none", "afm-on-device-3b",
     ["model.layers=16", "model.hidden=2048", "model.heads=16", "model.kv_heads=4", "model.ffn=5632"], "tpu-v5p", 64, 1,
     {"tp": 1, "pp": 1, "dp": 1, "fsdp": 64, "cp": 1, "microbatch": 8}, "none"),
    ("afm-on-device-3b, 64 v5e, fsdp, micro 2, full", "afm-on-device-3b", [], "tpu-v5e", 64, 1,
     {"tp": 1, "pp": 1, "dp": 1, "fsdp": 64, "cp": 1, "microbatch": 2}, "full"),
    ("afm-on-device-3b, 64 v6e, fsdp, micro 2, attention", "afm-on-device-3b", [], "tpu-v6e", 64, 1,
     {"tp": 1, "pp": 1, "dp": 1, "fsdp": 64, "cp": 1, "microbatch": 2}, "attention"),
    ("afm-server-core, 512 v4 in 2 slices, fsdp, micro 2, full", "afm-server-core", [], "tpu-v4", 512, 2,
     {"tp": 1, "pp": 1, "dp": 2, "fsdp": 256, "cp": 1, "microbatch": 2}, "full"),
    ("afm-server-core, 256 v5p, tp 4, micro 4, full", "afm-server-core", [], "tpu-v5p", 256, 1,
     {"tp": 4, "pp": 1, "dp": 1, "fsdp": 64, "cp": 1, "microbatch": 4}, "full"),
    ("afm-on-device-3b, 64 h100-sxm (searched plan)", "afm-on-device-3b", [], "h100-sxm", 64, 1, None, None),
    ("afm-on-device-3b, 8 h200 (searched plan)", "afm-on-device-3b", [], "h200", 8, 1, None, None),
    ("afm-on-device-3b, 1024 h100-sxm (searched plan)", "afm-on-device-3b", [], "h100-sxm", 1024, 1, None, None),
    ("afm-on-device-3b, 64 b200, tp 2, micro 4, attention", "afm-on-device-3b", [], "b200", 64, 1,
     {"tp": 2, "pp": 1, "dp": 1, "fsdp": 32, "cp": 1, "microbatch": 4}, "attention"),
    ("afm-server-core, 256 h100-sxm (searched plan)", "afm-server-core", [], "h100-sxm", 256, 1, None, None),
    ("afm-server-core, 256 b200 (searched plan)", "afm-server-core", [], "b200", 256, 1, None, None),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/aot_sweep.json")
    ap.add_argument("--only", help="run the rows whose label contains this text")
    ap.add_argument("--planner-only", action="store_true",
                    help="keep the XLA figures in --out and recompute only the planner's (after a planner change)")
    args = ap.parse_args()
    if args.planner_only:
        return refresh_planner(Path(args.out))
    from crosstrain.planner.plan import Options, plan

    rows = []
    for label, preset, sets, chip, chips, slices, par, remat in SWEEP:
        if args.only and args.only not in label:
            continue
        cfg = load_config(preset, sets)
        planned = plan(cfg, Options(chip=chip, chips=chips, parallelism=par, remat=remat, slices=slices))
        t0 = time.perf_counter()
        print(f"[{len(rows) + 1}] {label}: compiling ...", file=sys.stderr, flush=True)
        aot = compile_step(cfg, get_chip(chip), planned["parallelism"], chips, planned["remat"], slices=slices)
        rows.append({"label": label, "chip": chip, "chips": chips, "slices": slices,
                     "parallelism": planned["parallelism"], "remat": planned["remat"],
                     "plan_step_time_s": planned["step_time_s"], "plan_memory_per_chip_gib": planned["memory_per_chip_gib"],
                     **{k: aot.get(k) for k in ("platform", "topology", "attention", "fits", "memory_per_chip_gib",
                                                 "planner_memory_per_chip_gib", "planner_rel_error", "planner_step_time_s",
                                                 "planner_compute_s", "xla_estimated_step_s", "xla_estimate_basis",
                                                 "xla_elementwise_gb_per_layer", "planner_one_pass_gb_per_layer",
                                                 "xla_elementwise_passes", "xla_required_gib", "compile_s",
                                                 "involuntary_rematerializations", "compile_notes")},
                     "wall_s": time.perf_counter() - t0})
        r = rows[-1]
        print(f"    {r['topology']}: XLA {r['memory_per_chip_gib'] or r['xla_required_gib']} GiB vs planner "
              f"{r['planner_memory_per_chip_gib']:.2f}; XLA time {r['xla_estimated_step_s']} s vs planner compute "
              f"{r['planner_compute_s']:.3f} s, step {r['planner_step_time_s']:.3f} s; elementwise passes "
              f"{r['xla_elementwise_passes']}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() and args.only else {"rows": []}
    keep = [r for r in existing["rows"] if not any(r["label"] == n["label"] for n in rows)]
    out.write_text(json.dumps({"rows": keep + rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def refresh_planner(path: Path) -> int:
    from crosstrain.planner.plan import Options, plan

    data = json.loads(path.read_text())
    by_label = {r["label"]: r for r in data["rows"]}
    for label, preset, sets, chip, chips, slices, par, remat in SWEEP:
        row = by_label.get(label)
        if row is None:
            continue
        cfg = load_config(preset, sets)
        planned = plan(cfg, Options(chip=chip, chips=chips, parallelism=par, remat=remat, slices=slices))
        if planned["parallelism"] != row["parallelism"] or planned["remat"] != row["remat"]:
            print(f"{label}: the searched layout changed ({planned['parallelism']}, {planned['remat']}); "
                  "compile it again", file=sys.stderr)
            continue
        aot = compile_step(cfg, get_chip(chip), row["parallelism"], chips, row["remat"], slices=slices, planner_only=True)
        row.update({"plan_step_time_s": planned["step_time_s"], "plan_memory_per_chip_gib": planned["memory_per_chip_gib"],
                    **{k: aot[k] for k in ("planner_memory_per_chip_gib", "planner_step_time_s", "planner_compute_s",
                                           "planner_one_pass_gb_per_layer")}})
        if row.get("xla_elementwise_gb_per_layer"):
            # XLA's measured traffic is kept; the planner's one pass it is divided by may have moved.
            row["xla_elementwise_passes"] = row["xla_elementwise_gb_per_layer"] / row["planner_one_pass_gb_per_layer"]
        if row.get("memory_per_chip_gib"):
            row["planner_rel_error"] = (row["planner_memory_per_chip_gib"] - row["memory_per_chip_gib"]) / row["memory_per_chip_gib"]
    path.write_text(json.dumps(data, indent=1))
    print(f"refreshed the planner's figures in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
