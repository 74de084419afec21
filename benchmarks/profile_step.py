"""Where one training step's time goes on this CPU, by model part and kernel kind.

    python benchmarks/profile_step.py [--preset nano] [--set model.compute_dtype=float32] [--steps 5] [--top 25]

Compiles the preset's step exactly as `crosstrain train` would on this machine (every `auto`
resolved), runs `--steps` steps under `jax.profiler.trace` with a Perfetto trace, and attributes
each XLA CPU kernel's ("thunk's") duration to the `op_name` metadata of its instruction in the
compiled HLO. The model's `jax.named_scope`s (qkv, attention, mlp, output_loss, ...) name the part;
`jvp(...)` is the forward and `transpose(...)` the backward. Kernels that run at the same time on
the two cores are counted in full, so the shares add up to the kernel time, not the wall time.

Prints the step's wall time, total kernel time, then kernel time by part (forward / backward), by
kernel kind (dot, fusion, copy, convert, ...), and the `--top` longest instructions.

Kernel time overstates a part's cost: XLA runs independent kernels at the same time, each then
slower. So it also prints busy time: the wall time during which at least one kernel of a group
ran (the union of their intervals), for the GEMMs outside attention, attention, the optimizer and
the rest; and every GEMM shape's count, kernel time and achieved TFLOP/s, read from the dots of
the compiled HLO (inside YNNPACK's fusions or standing alone).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import reexec_with_huge_pages, skip_absent_accelerators  # noqa: E402

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv)
skip_absent_accelerators()

PARTS = ("embed", "qkv", "qk_norm_rope", "attention", "attn_out_proj", "mlp", "final_norm", "output_loss")


def op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> op_name metadata ("" where it has none: the copies and transposes
    layout assignment inserts), for every instruction of the optimized HLO."""
    out: dict[str, str] = {}
    pat = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+[\w\-]+\(")
    for line in hlo_text.splitlines():
        m = pat.match(line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = op.group(1) if op else ""
    return out


def part_of(op_name: str) -> str:
    if not op_name:
        return "unattributed (layout copies)"
    direction = "bwd" if "transpose(" in op_name else "fwd"
    # Scopes appear as path components or inside jvp(...) / transpose(...): the innermost wins.
    found = [(m.start(), p) for p in PARTS for m in re.finditer(rf"(?:^|[/(]){p}(?=[/)]|$)", op_name)]
    if not found:
        return f"other ({direction})"
    return f"{max(found)[1]} ({direction})"


def dot_flops(hlo_text: str) -> dict[str, tuple[int, str]]:
    """kernel name -> (FLOPs, "MxKxN dtype") for every dot of the compiled program: the fusion
    that holds it (YNNPACK's, say) or, outside fusions, the dot instruction itself."""
    comps: dict[str, list[str]] = {}
    body: list[str] = []
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            body = comps.setdefault(head.group(1), [])
        else:
            body.append(line)
    caller = {}
    for line in hlo_text.splitlines():
        fusion = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .* fusion\(.*calls=%([\w.\-]+)", line)
        if fusion:
            caller[fusion.group(2)] = fusion.group(1)
    out = {}
    for comp, lines in comps.items():
        shapes: dict[str, tuple[str, list[int]]] = {}
        for line in lines:
            defn = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", line)
            if defn:
                shapes[defn.group(1)] = (defn.group(2), [int(x) for x in defn.group(3).split(",") if x])
            dot = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+)", line)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            if not (dot and contracting and dot.group(3) in shapes):
                continue
            dtype, lhs = shapes[dot.group(3)]
            result = [int(x) for x in dot.group(2).split(",") if x]
            k = math.prod(lhs[int(i)] for i in contracting.group(1).split(","))
            m, n = ([1, 1] + result)[-2:]
            batch = math.prod(result[:-2])
            label = f"{'' if batch == 1 else f'{batch} x '}{m}x{k}x{n} {dtype}"
            out[caller.get(comp, dot.group(1))] = (2 * batch * m * n * k, label)
    return out


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def kind_of(name: str) -> str:
    base = re.sub(r"[.\d]+$", "", name)
    return base.split(".")[0] or name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from ab_step import build

    from crosstrain.hardware import cpu_model

    cfg, resolved, state, step = build(args.preset, args.set)
    model = cfg.model
    tokens = np.random.default_rng(0).integers(0, model.vocab, size=(cfg.train.batch, model.seq_len + 1))
    batch = jnp.asarray(tokens, jnp.int32)
    compiled = step.lower(state, batch, 0).compile()
    names = op_names(compiled.as_text())
    for _ in range(3):
        state, m = compiled(state, batch, 0)
    jax.block_until_ready(m)
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.steps):
                t = time.perf_counter()
                state, m = compiled(state, batch, 0)
                jax.block_until_ready(m)
                walls.append(time.perf_counter() - t)
        trace_file = next(Path(tmp).rglob("*.trace.json.gz"))
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]
    flops = dot_flops(compiled.as_text())
    by_part: dict[str, float] = collections.Counter()
    by_kind: dict[str, float] = collections.Counter()
    by_instr: dict[str, float] = collections.Counter()
    groups: dict[str, list] = collections.defaultdict(list)
    gemms: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0])  # count, ms, FLOPs per step
    total = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in names:
            continue
        name, op = e["name"], names[e["name"]]
        dur = e.get("dur", 0) / 1e3 / args.steps  # ms per step
        total += dur
        by_part[part_of(op)] += dur
        by_kind[kind_of(name)] += dur
        by_instr[name] += dur
        span = (e["ts"], e["ts"] + e.get("dur", 0))
        if "/cond/" in op:
            group = "optimizer (the update's branch)"
        elif re.search(r"(?:^|[/(])attention(?=[/)]|$)", op):
            group = "attention"
        elif name in flops:
            group = "GEMMs outside attention"
            g = gemms[flops[name][1]]
            g[0] += 1
            g[1] += dur
            g[2] += flops[name][0] / args.steps
        else:
            group = "everything else"
        groups[group].append(span)
    busy = {g: busy_ms(v) / args.steps for g, v in groups.items()}
    busy["any kernel"] = busy_ms([s for v in groups.values() for s in v]) / args.steps
    wall = sorted(walls)[len(walls) // 2] * 1e3
    tokens_per_step = cfg.train.batch * model.seq_len
    result = {
        "cpu_model": cpu_model(), "preset": args.preset, "resolved": resolved.to_dict(),
        "wall_ms": wall, "tokens_per_s": tokens_per_step / wall * 1e3, "kernel_ms": total,
        "by_part_ms": dict(by_part.most_common()), "by_kind_ms": dict(by_kind.most_common()),
        "top_ms": {k: [v, names[k]] for k, v in by_instr.most_common(args.top)},
        "busy_ms": busy,
        "gemms": {k: {"count": c // args.steps, "kernel_ms": t, "tflops": f / t / 1e9 if t else 0.0}
                  for k, (c, t, f) in sorted(gemms.items(), key=lambda kv: -kv[1][1])},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['cpu_model']}; {args.preset}; {resolved.describe()}")
    print(f"step {wall:.1f} ms wall ({result['tokens_per_s']:,.0f} tokens/s), {total:.1f} ms of kernels")
    for title, table in (("by part", by_part), ("by kernel kind", by_kind)):
        print(f"\n{title}:")
        for k, v in table.most_common():
            print(f"  {k:>28} {v:8.2f} ms {100 * v / total:5.1f}%")
    print("\nbusy time per traced step (tracing slows a step a little): at least one kernel of the group running:")
    for k, v in sorted(busy.items(), key=lambda kv: -kv[1]):
        print(f"  {k:>32} {v:8.2f} ms")
    print("\nGEMMs outside attention, by shape (M x K x N, operand dtype):")
    for k, g in result["gemms"].items():
        print(f"  {k:>32} x{g['count']:<3} {g['kernel_ms']:8.2f} ms kernel {g['tflops']:6.2f} TFLOP/s")
    print(f"\nlongest {args.top} instructions:")
    for k, v in by_instr.most_common(args.top):
        print(f"  {k:>28} {v:8.2f} ms  {names[k][-90:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
