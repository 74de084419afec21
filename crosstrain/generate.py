"""Text generation from a run's latest checkpoint, with a KV cache and a jitted decode step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp

from crosstrain.config import Config
from crosstrain.data.tokenizer import eot_id, load_tokenizer
from crosstrain.errors import UserError
from crosstrain.model import decoder, init_cache, output_logits
from crosstrain.runtime import load_run

log = logging.getLogger("crosstrain")


@dataclass(frozen=True)
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0

    def validate(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"--temperature: must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    tokens_per_s: float
    prefill_s: float
    stopped_at_eot: bool


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on fp32 logits [batch, vocab]."""
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_index = jnp.sum(cumulative - probs < s.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def generate_tokens(
    params: Any,
    cfg: Config,
    prompt: list[int],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stop_token: Optional[int] = None,
) -> tuple[list[int], float, float, bool]:
    """New tokens after `prompt`; returns (tokens, decode tokens/s, prefill seconds, stopped)."""
    m = cfg.model
    total = len(prompt) + max_new_tokens
    length = int(-(-total // 64) * 64)  # round the cache up so nearby lengths share a compile
    cache = init_cache(m, 1, length, dtype=jnp.float32 if m.compute_dtype == "float32" else None)

    @jax.jit
    def prefill(params, cache, tokens):
        hidden, cache = decoder(params, tokens, m, start_pos=0, cache=cache)
        return output_logits(params, hidden[:, -1:], m)[:, 0], cache

    @jax.jit
    def decode(params, cache, token, pos):
        hidden, cache = decoder(params, token[:, None], m, start_pos=pos, cache=cache)
        logits = output_logits(params, hidden, m)[:, 0]
        return logits, cache

    def choose(logits, key):
        if sampling.greedy:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1)

    choose = jax.jit(choose)
    key = jax.random.key(sampling.seed)
    prompt_ids = jnp.asarray([prompt], jnp.int32)
    # Compile the prefill (and the first choice) before timing it: prefill_s is the model's time.
    prefill.lower(params, cache, prompt_ids).compile()
    choose(jnp.zeros((1, m.vocab), jnp.float32), key).block_until_ready()
    t0 = time.perf_counter()
    logits, cache = prefill(params, cache, prompt_ids)
    key, sub = jax.random.split(key)
    token = choose(logits, sub)
    token.block_until_ready()
    prefill_s = time.perf_counter() - t0
    out = [int(token[0])]
    stopped = stop_token is not None and out[-1] == stop_token
    # Compile the decode step before timing it.
    decode.lower(params, cache, token, jnp.int32(0)).compile()
    t0 = time.perf_counter()
    pos = len(prompt)
    while len(out) < max_new_tokens and not stopped:
        logits, cache = decode(params, cache, token, jnp.int32(pos))
        key, sub = jax.random.split(key)
        token = choose(logits, sub)
        out.append(int(token[0]))
        pos += 1
        stopped = stop_token is not None and out[-1] == stop_token
    elapsed = time.perf_counter() - t0
    tps = (len(out) - 1) / elapsed if elapsed > 0 and len(out) > 1 else 0.0
    return out, tps, prefill_s, stopped


def generate(run_dir: Path, prompt: str, *, max_new_tokens: int, sampling: Sampling) -> Generation:
    sampling.validate()
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    cfg, params, _ = load_run(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    eot = eot_id(tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
    if len(ids) + max_new_tokens > cfg.model.seq_len:
        log.warning("generate: %d prompt + %d new tokens run past the %d positions the model was trained on; "
                    "what comes after position %d is extrapolation", len(ids), max_new_tokens, cfg.model.seq_len,
                    cfg.model.seq_len)
    tokens, tps, prefill_s, stopped = generate_tokens(
        params, cfg, ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_token=eot
    )
    shown = tokens[:-1] if stopped else tokens
    return Generation(tokenizer.decode(shown), tokens, len(ids), tps, prefill_s, stopped)
