"""crosstrain against the PyTorch peer users would pick, side by side in one run, on the `nano` shape
(or any preset's, `--preset`/`--set`), on this machine's CPU or its NVIDIA GPU.

The peer is transformers' Qwen3ForCausalLM of the identical shape (RMSNorm, QK-norm, GQA, SwiGLU,
RoPE, tied embeddings) trained with torch.optim.AdamW, eager and torch.compile, fp32 and bf16
autocast. Both sides do the same work per step: the same 8 x 256 tokens, forward, backward,
global-norm clipping to 1.0 and an AdamW update of fp32 master weights.

    python benchmarks/peers.py [--steps 10] [--rounds 2] [--json] [--skip-compile]
                               [--preset nano] [--set KEY=VALUE ...] [--device auto|cpu|cuda]

Every configuration is built first; then `--rounds` rounds each time `--steps` steps of every
configuration in turn, and a configuration's rate is its best round's median step (this shared
VM's speed drifts by 10-20% over minutes, and alternating keeps the drift off the ratios). The
script restarts itself with glibc's huge-page tunable, as the `crosstrain` program does
(crosstrain/platform.py): both sides run in this one process, under the same allocator settings.

Prints tokens/s for each configuration and the ratios the performance targets are stated in:
crosstrain fp32 / peer eager fp32 (target >= 1.5), crosstrain best / peer best (target >= 1), and
crosstrain's achieved model FLOP/s against this machine's fp32 matmul ceiling (target >= 0.6).
On a GPU (`--device cuda`, or `auto` where both JAX and PyTorch see one) the ceilings are the
catalog's dense peaks and MFU is printed instead; run it with XLA_PYTHON_CLIENT_PREALLOCATE=false
so that JAX and PyTorch share the GPU's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import huge_pages_active, reexec_with_huge_pages, skip_absent_accelerators  # noqa: E402

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv)
skip_absent_accelerators()


def crosstrain_runner(dtype: str, tokens, preset: str = "nano", sets: tuple[str, ...] = ()):
    """A function of n that runs n training steps and returns their median seconds: the step as
    `crosstrain train` compiles it on this machine (ab_step.runner)."""
    from ab_step import runner

    run, resolved = runner(preset, [*sets, f"model.compute_dtype={dtype}"], tokens)
    print(f"crosstrain {dtype}: {resolved.describe()}", file=sys.stderr)
    return run


def torch_runner(dtype: str, compiled: bool, tokens, preset: str = "nano", sets: tuple[str, ...] = (),
                 device: str = "cpu"):
    """A function of n that runs n training steps and returns their median seconds."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from crosstrain.config import load_config

    torch.manual_seed(0)
    m = load_config(preset, list(sets)).model
    config = Qwen3Config(
        vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_base}, attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def loss_fn():
        logits = model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def one_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=(dtype == "bfloat16")):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            loss = one_step()
            if device == "cuda":
                loss.item()  # wait for the GPU, as the JAX side blocks on its result
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    run(3 if compiled else 2)  # compile and warm up
    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="skip torch.compile (it takes minutes on 2 cores)")
    ap.add_argument("--preset", default="nano", help="the shape both sides train (default nano)")
    ap.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="overrides of the preset (train.batch, model.layers, ...)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: the GPU where both JAX and PyTorch see one, else the CPU")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from crosstrain.config import load_config
    from crosstrain.flops import flops_per_token
    from crosstrain.hardware import cpu_matmul_ceiling, cpu_model, detect_chip

    jax_gpu = jax.devices()[0].platform == "gpu"
    device = args.device if args.device != "auto" else ("cuda" if jax_gpu and torch.cuda.is_available() else "cpu")
    if device == "cuda" and not (jax_gpu and torch.cuda.is_available()):
        raise SystemExit("--device cuda: JAX and PyTorch must both see an NVIDIA GPU")
    cfg = load_config(args.preset, args.sets)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab, size=(cfg.train.batch, cfg.model.seq_len + 1))
    torch.set_num_threads(os.cpu_count() or 2)
    if device == "cpu":
        ceiling = cpu_matmul_ceiling(refresh=True)
    else:  # the catalog's dense peaks of this GPU (MFU's denominator)
        chip = detect_chip(jax.devices()[0])
        ceiling = {"fp32": chip.peak_flops("float32") / 1e12, "bf16": chip.peak_flops("bfloat16") / 1e12}
    shape = {"preset": args.preset, "sets": tuple(args.sets)}
    runners = {
        "crosstrain_fp32": crosstrain_runner("float32", tokens, **shape),
        "crosstrain_bf16": crosstrain_runner("bfloat16", tokens, **shape),
        "peer_eager_fp32": torch_runner("float32", False, tokens, **shape, device=device),
        "peer_eager_bf16": torch_runner("bfloat16", False, tokens, **shape, device=device),
    }
    if not args.skip_compile:
        runners["peer_compile_fp32"] = torch_runner("float32", True, tokens, **shape, device=device)
        runners["peer_compile_bf16"] = torch_runner("bfloat16", True, tokens, **shape, device=device)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            t = runners[name](args.steps)
            best[name] = min(best.get(name, t), t)
    if device == "cpu":
        # The ceiling again after the rounds, keeping the higher: the ratio to it must not flatter.
        after = cpu_matmul_ceiling(refresh=True)
        ceiling = {k: max(ceiling[k], after[k]) for k in ceiling}
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    rates = {name: n_tokens / best[name] for name in runners}
    fpt = flops_per_token(cfg.model)
    ours_best = max(rates["crosstrain_fp32"], rates["crosstrain_bf16"])
    peer_best = max(v for k, v in rates.items() if k.startswith("peer"))
    result = {
        "tokens_per_s": rates,
        "ratios": {
            "crosstrain_fp32_over_peer_eager_fp32": rates["crosstrain_fp32"] / rates["peer_eager_fp32"],
            "crosstrain_best_over_peer_best": ours_best / peer_best,
            "crosstrain_fp32_flops_over_fp32_ceiling": rates["crosstrain_fp32"] * fpt / (ceiling["fp32"] * 1e12),
            "crosstrain_bf16_flops_over_bf16_ceiling": rates["crosstrain_bf16"] * fpt / (ceiling["bf16"] * 1e12),
        },
        "matmul_ceiling_tflops": ceiling,
        "ceiling_basis": "measured large-matmul rate of this CPU" if device == "cpu" else "catalog dense peak (MFU)",
        "device": cpu_model() if device == "cpu" else torch.cuda.get_device_name(0),
        "preset": args.preset,
        "sets": args.sets,
        "model_flops_per_token": fpt,
        "huge_pages": huge_pages_active(),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "targets": {"crosstrain_fp32_over_peer_eager_fp32": 1.5, "crosstrain_best_over_peer_best": 1.0,
                    "crosstrain_fp32_flops_over_fp32_ceiling": 0.6},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in rates.items():
            print(f"{k:>20}: {v:8,.0f} tokens/s   {v * fpt / 1e9:6.1f} GFLOP/s")
        print(f"{result['device']}, {result['ceiling_basis']}: fp32 {ceiling['fp32'] * 1e3:.0f} GFLOP/s, "
              f"bf16->fp32 {ceiling['bf16'] * 1e3:.0f} GFLOP/s"
              f"   (huge pages: {'on' if result['huge_pages'] else 'off'}; best of {args.rounds} rounds of {args.steps} steps)")
        for k, v in result["ratios"].items():
            target = result["targets"].get(k)
            print(f"{k:>42}: {v:5.2f}" + (f"   (target >= {target})" if target else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
