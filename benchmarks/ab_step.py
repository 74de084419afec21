"""Side-by-side step speed of config variants, alternating in one process (A/B on this CPU).

    python benchmarks/ab_step.py --preset nano --variant "" --variant "model.activation_dtype=bfloat16" \
        [--variant "model.dot_transposes=fold model.compute_dtype=float32"] [--steps 10] [--rounds 3] [--json]

Each `--variant` is a space-separated list of KEY=VALUE overrides ("" = the preset as it is).
Every variant's step is compiled exactly as `crosstrain train` would compile it on this machine
(every `auto` resolved, then the overrides); then `--rounds` rounds time `--steps` steps of each
variant in turn (order reversed every other round), and a variant's rate is its best round's
median step. Alternating keeps this shared VM's drift (10-20% over minutes) off the ratios. The
script restarts itself with the huge-page tunable, as the `crosstrain` program does.

Prints tokens/s per variant and its ratio to the first; names the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import huge_pages_active, reexec_with_huge_pages, skip_absent_accelerators  # noqa: E402

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv)
skip_absent_accelerators()


def build(preset: str, sets: list[str]):
    """(config with every `auto` resolved as `crosstrain train` resolves it on this machine, what
    each became, a fresh train state, the jitted step donating its state). An unresolved model
    would run the reference attention, not the step users run."""
    import dataclasses

    import jax

    from crosstrain.config import load_config
    from crosstrain.model import init_params
    from crosstrain.resolve import resolve_model
    from crosstrain.train.step import init_state, make_train_step

    cfg = load_config(preset, sets)
    model, resolved = resolve_model(cfg.model, jax.devices()[:1])
    cfg = dataclasses.replace(cfg, model=model)
    state = init_state(init_params(cfg.model, jax.random.key(0)))
    return cfg, resolved, state, jax.jit(make_train_step(cfg), donate_argnums=(0,))


def runner(preset: str, sets: list[str], tokens):
    """(a function of n that runs n training steps and returns their median seconds, resolved)."""
    import jax
    import jax.numpy as jnp

    _, resolved, state, step = build(preset, sets)
    batch = jnp.asarray(tokens, jnp.int32)
    box = {"state": state}

    def run(n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            box["state"], m = step(box["state"], batch, 0)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    run(2)  # compile and warm up
    return run, resolved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--variant", action="append", required=True, help='space-separated KEY=VALUE overrides ("" = none)')
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from crosstrain.config import load_config
    from crosstrain.hardware import cpu_model

    base = load_config(args.preset)
    tokens = np.random.default_rng(0).integers(0, base.model.vocab, size=(base.train.batch, base.model.seq_len + 1))
    runners = {}
    for v in args.variant:
        name = v.strip() or "(preset)"
        runners[name] = runner(args.preset, v.split(), tokens)
        print(f"compiled {name}: {runners[name][1].describe()}", file=sys.stderr, flush=True)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            t = runners[name][0](args.steps)
            best[name] = min(best.get(name, t), t)
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    rates = {name: n_tokens / best[name] for name in runners}
    first = next(iter(rates.values()))
    result = {"cpu_model": cpu_model(), "preset": args.preset, "huge_pages": huge_pages_active(),
              "steps_per_round": args.steps, "rounds": args.rounds,
              "variants": {name: {"tokens_per_s": rate, "ratio_to_first": rate / first,
                                  "resolved": runners[name][1].to_dict()} for name, rate in rates.items()}}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['cpu_model']}; {args.preset}; best of {args.rounds} alternating rounds of {args.steps} steps")
    for name, rate in rates.items():
        print(f"  {rate:9,.0f} tokens/s  x{rate / first:5.2f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
