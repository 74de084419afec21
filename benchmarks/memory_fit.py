"""The planner's memory model of crosstrain's step, fitted to XLA's memory analysis per platform.

Compiles crosstrain's real train step for 8 chips of `--chip` (h100-sxm: the CUDA plugin's
deviceless compile, the `cuda` extra; tpu-v5p: libtpu, the `tpu` extra; no GPU or TPU needed)
over a sweep of model widths, depths, vocabularies, microbatches, remat policies and layouts,
then fits the five constants of the platform's `planner.model.ProgramMemory` by least squares,
with everything else the planner counts exactly (parameters and optimizer state, the tensors each
remat policy names, FSDP's gathered weights) taken as known. Prints the constants, the fit's
errors, and the shipped planner's error on every program.

    python benchmarks/memory_fit.py [--chip h100-sxm|tpu-v5p] [--fit-only]

Compiled programs are kept in benchmarks/results/memory_sweep_CHIP.jsonl (one JSON line each)
and not compiled again; 20-40 s a program on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from crosstrain.config import load_config  # noqa: E402
from crosstrain.hardware import GIB, get_chip  # noqa: E402

WIDTH_2048 = ["model.hidden=2048", "model.heads=16", "model.ffn=5632"]
SHAPES = [  # (microbatch, train.batch or None for the preset's, overrides, layout)
    (1, None, [], {"fsdp": 8}), (2, None, [], {"fsdp": 8}), (1, 8, [], {"fsdp": 8}), (4, None, [], {"fsdp": 8}),
    (1, None, ["model.layers=13"], {"fsdp": 8}), (2, None, ["model.layers=13"], {"fsdp": 8}),
    (1, None, ["model.vocab=24576"], {"fsdp": 8}), (2, None, ["model.vocab=24576"], {"fsdp": 8}),
    (1, None, WIDTH_2048, {"fsdp": 8}), (2, None, WIDTH_2048, {"fsdp": 8}),
    (2, None, [], {"fsdp": 4, "tp": 2}), (2, None, [], {"dp": 2, "fsdp": 4}), (2, None, [], {"dp": 8}),
]
# libtpu's compiles of these programs take 1-2 minutes each here (the CUDA plugin's 20 s): the TPU
# sweep keeps the shapes that separate the five constants (microbatch size and count, vocabulary,
# sharded or replicated gradients).
TPU_SHAPES = [SHAPES[i] for i in (0, 1, 2, 7, 12)]
POLICIES = ("none", "selective", "attention", "full")
CONSTANTS = ("none_bytes_per_element", "working_bytes_per_element", "logit_bytes", "gradient_buffers",
             "accumulation_buffers")


def sweep(chip: str):
    for policy in POLICIES:
        for micro, batch, sets, layout in (TPU_SHAPES if get_chip(chip).family == "tpu" else SHAPES):
            yield {"policy": policy, "micro": micro,
                   "sets": sets + ([f"train.batch={batch}"] if batch else []),
                   "layout": {"tp": 1, "pp": 1, "dp": 1, "fsdp": 1, "cp": 1, "microbatch": micro, **layout}}


def key(point: dict) -> str:
    return json.dumps([point["policy"], point["sets"], point["layout"]], sort_keys=True)


def compile_missing(path: Path, chip: str) -> list[dict]:
    from crosstrain.planner.aot import compile_step

    done = {key(r): r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    points = list(sweep(chip))
    for i, point in enumerate(points):
        if key(point) in done:
            continue
        cfg = load_config("afm-on-device-3b", point["sets"])
        aot = compile_step(cfg, get_chip(chip), point["layout"], 8, point["policy"], estimate_layers=False)
        row = {**point, "xla_gib": aot["memory_per_chip_gib"], "arguments_gib": aot["parameter_and_optimizer_gib"],
               "program": aot["program"]}
        done[key(point)] = row
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{len(points)}] {point['policy']:>9} {' '.join(point['sets']) or '-':<45} "
              f"{point['layout']}: XLA {row['xla_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return [done[key(p)] for p in points]


def features(row: dict, chip: str) -> tuple[dict, float, float]:
    """(the fitted constants' bases, what the planner counts exactly, XLA's bytes) of one program."""
    from crosstrain.planner.model import (Layout, activation_bytes_per_token_layer,
                                          activation_elements_per_token_layer, layer_params, total_params)

    m = load_config("afm-on-device-3b", row["sets"]).model
    lay_d = row["layout"]
    lay = Layout(tp=lay_d["tp"], dp=lay_d["dp"], fsdp=lay_d["fsdp"], microbatch=row["micro"], remat=row["policy"],
                 sequence_parallel=False)
    batch = load_config("afm-on-device-3b", row["sets"]).train.batch
    n_micro = batch // (lay.dp * lay.fsdp) // row["micro"]
    tokens = row["micro"] * m.seq_len
    elements = activation_elements_per_token_layer(m, lay)
    grads = total_params(m) * 4 / (lay.tp * lay.fsdp)
    none = row["policy"] == "none"
    basis = {"none_bytes_per_element": tokens * m.layers * elements if none else 0.0,
             "working_bytes_per_element": 0.0 if none else tokens * elements,
             "logit_bytes": tokens * m.vocab / lay.tp,
             "gradient_buffers": grads,
             "accumulation_buffers": grads if n_micro > 1 else 0.0}
    named = 0.0 if none else activation_bytes_per_token_layer(m, lay, flash=True, implementation="crosstrain",
                                                               kernel="cudnn" if get_chip(chip).family == "gpu"
                                                               else "splash")[row["policy"]] * tokens * m.layers
    gathered = 2 * layer_params(m) / lay.tp * 2 if lay.fsdp > 1 else 0.0
    return basis, row["arguments_gib"] * GIB + named + gathered, row["xla_gib"] * GIB


def planner_gib(row: dict, chip: str) -> float:
    from crosstrain.planner.model import Layout, estimate

    cfg = load_config("afm-on-device-3b", row["sets"])
    lay_d = row["layout"]
    lay = Layout(tp=lay_d["tp"], dp=lay_d["dp"], fsdp=lay_d["fsdp"], microbatch=row["micro"], remat=row["policy"],
                 sequence_parallel=False)
    est = estimate(cfg.model, get_chip(chip), lay, global_batch=cfg.train.batch, flash=True,
                   implementation="crosstrain")
    return sum(v for k, v in est.memory.items() if k != "reserved") / GIB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chip", choices=["h100-sxm", "tpu-v5p"], default="h100-sxm")
    ap.add_argument("--fit-only", action="store_true", help="fit the programs already compiled, compiling none")
    ap.add_argument("--fix", action="append", default=[], metavar="CONSTANT=VALUE",
                    help="hold a constant at a physical value and fit the others")
    args = ap.parse_args()
    path = Path(f"benchmarks/results/memory_sweep_{args.chip}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ([json.loads(line) for line in path.read_text().splitlines()] if args.fit_only
            else compile_missing(path, args.chip))
    data = [features(r, args.chip) for r in rows]
    fixed = {k: float(v) for k, v in (f.split("=") for f in args.fix)}
    free = [c for c in CONSTANTS if c not in fixed]
    a = np.array([[basis[c] for c in free] for basis, _, _ in data])
    y = np.array([xla - known - sum(basis[c] * v for c, v in fixed.items()) for basis, known, xla in data])
    solved, *_ = np.linalg.lstsq(a, y, rcond=None)
    coef = np.array([fixed[c] if c in fixed else solved[free.index(c)] for c in CONSTANTS])
    full = np.array([[basis[c] for c in CONSTANTS] for basis, _, _ in data])
    fitted = [(full[i] @ coef + known) / xla - 1 for i, (_, known, xla) in enumerate(data)]
    shipped = [planner_gib(r, args.chip) / r["xla_gib"] - 1 for r in rows]
    print(f"{len(rows)} programs on 8 {args.chip} (XLA's memory analysis)")
    for name, value in zip(CONSTANTS, coef):
        print(f"  {name:>26} = {value:.3f}" + ("  (held)" if name in fixed else ""))
    for label, errs in (("the fit", fitted), ("the shipped planner", shipped)):
        errs = np.abs(errs)
        print(f"  {label}: median |error| {100 * np.median(errs):.1f}%, worst {100 * errs.max():.1f}%")
    worst = sorted(zip(shipped, rows), key=lambda x: -abs(x[0]))[:5]
    for err, r in worst:
        print(f"    {100 * err:+.1f}%  {r['policy']:>9} {' '.join(r['sets']) or '-':<40} {r['layout']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
