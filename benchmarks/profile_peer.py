"""Where the PyTorch peer's training step spends its time, the counterpart of profile_step.py.

    python benchmarks/profile_peer.py [--dtype bfloat16] [--eager] [--steps 5] [--top 15]

Builds the peer exactly as benchmarks/peers.py does (transformers' Qwen3ForCausalLM of the `nano`
shape, torch.optim.AdamW, torch.compile unless `--eager`, bf16 autocast unless `--dtype
float32`), warms it up, then runs `--steps` steps under torch.profiler and sums each operator's
self time per step. PyTorch runs one operator at a time, using every core inside it, so self
times add up to about the wall time. Groups: the GEMMs (aten::mm, addmm, bmm), attention
(scaled_dot_product_attention's CPU kernels, forward and backward), the optimizer (everything
under AdamW.step, clipping's norms included) and the rest (Inductor's generated kernels,
autograd, allocation).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import reexec_with_huge_pages, skip_absent_accelerators  # noqa: E402

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv)
skip_absent_accelerators()

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def group_of(op: str, in_optimizer: bool) -> str:
    if op in GEMMS:
        return "GEMMs"
    if "scaled_dot_product" in op:
        return "attention"
    if in_optimizer:
        return "optimizer and clipping"
    return "everything else"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    import numpy as np
    import torch
    from peers import torch_runner
    from torch.profiler import ProfilerActivity, profile

    from crosstrain.config import load_config
    from crosstrain.hardware import cpu_model

    cfg = load_config("nano")
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab, size=(cfg.train.batch, cfg.model.seq_len + 1))
    run = torch_runner(args.dtype, not args.eager, tokens)
    median = run(10)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run(args.steps)
        traced = (time.perf_counter() - start) / args.steps
    # Self time per operator; an operator inside the optimizer's step or the clipping belongs to it.
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if e.name.startswith("Optimizer.step") or e.name.startswith("Optimizer.zero_grad")
             or e.name == "aten::linalg_vector_norm" or e.name == "aten::_foreach_norm"]
    by_op: dict[str, float] = collections.Counter()
    by_group: dict[str, float] = collections.Counter()
    for e in events:
        ms = e.self_cpu_time_total / 1e3 / args.steps
        inside = any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans)
        by_op[e.name] += ms
        by_group[group_of(e.name, inside)] += ms
    n_tokens = cfg.train.batch * cfg.model.seq_len
    print(f"{cpu_model()}; peer nano, {'eager' if args.eager else 'torch.compile'} {args.dtype}, "
          f"torch {torch.__version__}")
    print(f"step {median * 1e3:.1f} ms wall ({n_tokens / median:,.0f} tokens/s); traced steps {traced * 1e3:.1f} ms")
    print("\nself time per step by group:")
    for k, v in by_group.most_common():
        print(f"  {k:>24} {v:8.2f} ms")
    print(f"\nlongest {args.top} operators (self time per step):")
    for k, v in by_op.most_common(args.top):
        print(f"  {k[:60]:>60} {v:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
