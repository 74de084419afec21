"""Held-out evaluation: mean next-token loss with its standard error, perplexity and bits per byte.

Text is tokenized (no special tokens added) and cut into windows of `seq_len + 1` tokens that
overlap by one, so every token after the first is predicted exactly once, each with as much
context as the window gives. The last window is padded and its padding masked. Bits per byte
divide the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, which makes models
with different tokenizers comparable.

The loss is a mean over windows of different token counts, so its standard error is the ratio
estimator's over windows (tokens inside a window are not independent; windows nearly are). The
in-run evaluation (train/loop.py) and `crosstrain eval` share this code: by default both take every
held-out token of the run's data, the same windows, so they report the same number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from crosstrain.errors import UserError
from crosstrain.model import token_losses


@dataclass
class EvalResult:
    loss: float
    loss_se: float  # standard error of `loss`, over windows
    perplexity: float
    bits_per_byte: Optional[float]
    tokens: int
    bytes: int
    windows: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        return f"{self.loss:.4f} ± {self.loss_se:.4f} ({self.tokens:,} tokens in {self.windows:,} windows)"


def summarize(sums: np.ndarray, counts: np.ndarray, total_bytes: Optional[int] = None) -> EvalResult:
    """The mean loss over windows' summed losses `sums` and token counts `counts`, and its standard
    error (ratio estimator: sqrt(sum c_i^2 (m_i - mean)^2 * n/(n-1)) / sum c_i)."""
    keep = counts > 0
    sums, counts = np.asarray(sums, np.float64)[keep], np.asarray(counts, np.float64)[keep]
    tokens = float(counts.sum())
    if tokens == 0:
        raise UserError("eval: no tokens to evaluate")
    loss = float(sums.sum() / tokens)
    n = len(counts)
    se = float(np.sqrt(np.sum((sums - loss * counts) ** 2) * n / max(n - 1, 1)) / tokens) if n > 1 else float("nan")
    bpb = None if total_bytes is None else float(sums.sum() / math.log(2) / max(total_bytes, 1))
    return EvalResult(loss, se, math.exp(min(loss, 700.0)), bpb, int(tokens), int(total_bytes or 0), n)


def window_sums(params, tokens, mask, m):
    """Summed next-token loss and token count per window: tokens [b, seq_len + 1], mask [b, seq_len]."""
    losses = token_losses(params, tokens, m)
    return jnp.sum(losses * mask, axis=-1), jnp.sum(mask, axis=-1)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for. Byte-level BPE maps one character of a token's string to
    one byte; other tokenizers are measured by decoding each token alone."""
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    from tokenizers import pre_tokenizers

    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()} if hasattr(tokenizer, "get_added_tokens_decoder") else set()
    for token, i in vocab.items():
        if token in special:
            lengths[i] = 0
        elif all(c in byte_chars for c in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, seq_len + 1] windows overlapping by one token, and a mask [n, seq_len] of real targets."""
    n = max(1, math.ceil((len(tokens) - 1) / seq_len))
    out = np.zeros((n, seq_len + 1), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    for w in range(n):
        chunk = tokens[w * seq_len : w * seq_len + seq_len + 1]
        out[w, : len(chunk)] = chunk
        mask[w, : max(0, len(chunk) - 1)] = 1.0
    return out, mask


def batched_windows(wins: np.ndarray, mask: np.ndarray, batch: int):
    """(tokens, mask) in batches of `batch` windows, the last padded with masked empty windows."""
    for start in range(0, len(wins), batch):
        chunk, cmask = wins[start : start + batch], mask[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
            cmask = np.concatenate([cmask, np.zeros((pad, cmask.shape[1]), np.float32)])
        yield chunk, cmask


def evaluate_tokens(params, cfg, tokens: np.ndarray, byte_lengths: np.ndarray, *, batch: int = 8) -> EvalResult:
    m = cfg.model
    if len(tokens) < 2:
        raise UserError("eval: the text has fewer than 2 tokens")
    wins, mask = windows(np.asarray(tokens), m.seq_len)
    fn = jax.jit(lambda p, t, k: window_sums(p, t, k, m))
    sums, counts, total_bytes = [], [], 0
    for chunk, cmask in batched_windows(wins, mask, batch):
        s_, c_ = fn(params, jnp.asarray(chunk), jnp.asarray(cmask))
        sums.append(np.asarray(s_, np.float64))
        counts.append(np.asarray(c_, np.float64))
        targets = chunk[:, 1:]
        total_bytes += int(np.sum(byte_lengths[np.minimum(targets, len(byte_lengths) - 1)] * cmask))
    return summarize(np.concatenate(sums), np.concatenate(counts), total_bytes)


def evaluate_run(run_dir: Path, *, text_file: Optional[Path] = None, data: Optional[str] = None,
                 max_tokens: int = 0) -> EvalResult:
    """The run's latest model on `text_file`, on `data`'s held-out part, or on the run's own
    held-out tokens (the in-run evaluation's); `max_tokens` > 0 keeps only the first so many."""
    from crosstrain.data.tokenizer import load_tokenizer
    from crosstrain.runtime import load_run

    cfg, params, _ = load_run(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    lengths = token_byte_lengths(tokenizer)
    if text_file is not None:
        if not text_file.is_file():
            raise UserError(f"--text-file: {text_file} not found")
        text = text_file.read_bytes().decode("utf-8", errors="replace")
        tokens = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    else:
        from crosstrain.config import check_paths
        from crosstrain.data.pipeline import build_pipeline

        data_cfg = cfg.override(data={"tokenizer": str(run_dir / "tokenizer.json"),
                                      **({"path": data, "sources": [], "mixture": []} if data else {})})
        check_paths(data_cfg, ("data",))  # the data it reads (the run's own, or --data)
        tokens = build_pipeline(data_cfg, write_files=False).heldout_tokens()
        if tokens.size == 0:
            raise UserError(f"{'--data' if data else '--run-dir'}: no tokens are held out (data.holdout="
                            f"{cfg.data.holdout}); evaluate on --text-file F instead")
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
    return evaluate_tokens(params, cfg, np.asarray(tokens, np.int32), lengths)
