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
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import reexec_with_huge_pages, skip_absent_tpu  # noqa: E402

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv)
skip_absent_tpu()

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
    by_part: dict[str, float] = collections.Counter()
    by_kind: dict[str, float] = collections.Counter()
    by_instr: dict[str, float] = collections.Counter()
    total = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in names:
            continue
        dur = e.get("dur", 0) / 1e3 / args.steps  # ms per step
        total += dur
        by_part[part_of(names[e["name"]])] += dur
        by_kind[kind_of(e["name"])] += dur
        by_instr[e["name"]] += dur
    wall = sorted(walls)[len(walls) // 2] * 1e3
    tokens_per_step = cfg.train.batch * model.seq_len
    result = {
        "cpu_model": cpu_model(), "preset": args.preset, "resolved": resolved.to_dict(),
        "wall_ms": wall, "tokens_per_s": tokens_per_step / wall * 1e3, "kernel_ms": total,
        "by_part_ms": dict(by_part.most_common()), "by_kind_ms": dict(by_kind.most_common()),
        "top_ms": {k: [v, names[k]] for k, v in by_instr.most_common(args.top)},
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
    print(f"\nlongest {args.top} instructions:")
    for k, v in by_instr.most_common(args.top):
        print(f"  {k:>28} {v:8.2f} ms  {names[k][-90:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
