"""crosstrain against the PyTorch peer users would pick, side by side in one run, on the `nano` shape.

The peer is transformers' Qwen3ForCausalLM of the identical shape (RMSNorm, QK-norm, GQA, SwiGLU,
RoPE, tied embeddings) trained with torch.optim.AdamW, eager and torch.compile, fp32 and bf16
autocast. Both sides do the same work per step: the same 8 x 256 tokens, forward, backward,
global-norm clipping to 1.0 and an AdamW update of fp32 master weights.

    python benchmarks/peers.py [--steps 10] [--rounds 2] [--json] [--skip-compile]

Every configuration is built first; then `--rounds` rounds each time `--steps` steps of every
configuration in turn, and a configuration's rate is its best round's median step (this shared
VM's speed drifts by 10-20% over minutes, and alternating keeps the drift off the ratios). The
script restarts itself with glibc's huge-page tunable, as the `crosstrain` program does
(crosstrain/platform.py): both sides run in this one process, under the same allocator settings.

Prints tokens/s for each configuration and the ratios the performance targets are stated in:
crosstrain fp32 / peer eager fp32 (target >= 1.5), crosstrain best / peer best (target >= 1), and
crosstrain's achieved model FLOP/s against this machine's fp32 matmul ceiling (target >= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import huge_pages_active, reexec_with_huge_pages, skip_absent_tpu  # noqa: E402

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv)
skip_absent_tpu()


def crosstrain_runner(dtype: str, tokens):
    """A function of n that runs n training steps and returns their median seconds: the step as
    `crosstrain train` compiles it on this machine (ab_step.runner)."""
    from ab_step import runner

    run, resolved = runner("nano", [f"model.compute_dtype={dtype}"], tokens)
    print(f"crosstrain {dtype}: {resolved.describe()}", file=sys.stderr)
    return run


def torch_runner(dtype: str, compiled: bool, tokens):
    """A function of n that runs n training steps and returns their median seconds."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from crosstrain.config import load_config

    torch.manual_seed(0)
    m = load_config("nano").model
    config = Qwen3Config(
        vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_base}, attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    ids = torch.as_tensor(tokens, dtype=torch.long)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def loss_fn():
        logits = model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def one_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(dtype == "bfloat16")):
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
            one_step()
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
    args = ap.parse_args()

    import numpy as np

    from crosstrain.config import load_config
    from crosstrain.flops import flops_per_token
    from crosstrain.hardware import cpu_matmul_ceiling

    nano = load_config("nano")
    tokens = np.random.default_rng(0).integers(0, nano.model.vocab, size=(nano.train.batch, nano.model.seq_len + 1))
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    ceiling = cpu_matmul_ceiling(refresh=True)
    runners = {
        "crosstrain_fp32": crosstrain_runner("float32", tokens),
        "crosstrain_bf16": crosstrain_runner("bfloat16", tokens),
        "peer_eager_fp32": torch_runner("float32", False, tokens),
        "peer_eager_bf16": torch_runner("bfloat16", False, tokens),
    }
    if not args.skip_compile:
        runners["peer_compile_fp32"] = torch_runner("float32", True, tokens)
        runners["peer_compile_bf16"] = torch_runner("bfloat16", True, tokens)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            t = runners[name](args.steps)
            best[name] = min(best.get(name, t), t)
    # The ceiling again after the rounds, keeping the higher: the ratio to it must not flatter.
    after = cpu_matmul_ceiling(refresh=True)
    ceiling = {k: max(ceiling[k], after[k]) for k in ceiling}
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    rates = {name: n_tokens / best[name] for name in runners}
    fpt = flops_per_token(nano.model)
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
        print(f"matmul ceiling: fp32 {ceiling['fp32'] * 1e3:.0f} GFLOP/s, bf16->fp32 {ceiling['bf16'] * 1e3:.0f} GFLOP/s"
              f"   (huge pages: {'on' if result['huge_pages'] else 'off'}; best of {args.rounds} rounds of {args.steps} steps)")
        for k, v in result["ratios"].items():
            target = result["targets"].get(k)
            print(f"{k:>42}: {v:5.2f}" + (f"   (target >= {target})" if target else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
