"""Held-out evaluation: mean next-token loss with its standard error, perplexity and bits per byte.

Text is tokenized (no special tokens added) and cut into windows of `seq_len + 1` tokens that
overlap by one, so every token after the first is predicted exactly once, each with as much
context as the window gives. The last window is padded and its padding masked. A run's held-out
data is a list of segments (crosstrain/data/store.py); each is cut into windows on its own, so no
segment serves as another's context and no target straddles two. Bits per byte divide the summed
loss (in bits) by the UTF-8 bytes of the predicted tokens, which makes models with different
tokenizers comparable.

The loss is a mean over windows of different token counts, so its standard error is the ratio
estimator's over groups of windows: over segments where the data has them (windows of one segment
share a document, so they are not independent; segments, hash-chosen across the corpus, nearly
are), otherwise over windows. The in-run evaluation (train/loop.py) and `crosstrain eval` share this
code: by default both take every held-out token of the run's data, the same windows, so they report
the same number.
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
    loss_se: float  # standard error of `loss`, over segments (or windows)
    perplexity: float
    bits_per_byte: Optional[float]
    tokens: int
    bytes: int
    windows: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        return f"{self.loss:.4f} ± {self.loss_se:.4f} ({self.tokens:,} tokens in {self.windows:,} windows)"


def summarize(sums: np.ndarray, counts: np.ndarray, total_bytes: Optional[int] = None,
              groups: Optional[np.ndarray] = None) -> EvalResult:
    """The mean loss over windows' summed losses `sums` and token counts `counts`, and its standard
    error (ratio estimator: sqrt(sum c_i^2 (m_i - mean)^2 * n/(n-1)) / sum c_i) over `groups` of
    windows (a group id per window, e.g. its segment) or over windows."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    windows_n = int(np.sum(counts > 0))
    if groups is not None:
        groups = np.asarray(groups)[: len(sums)]
        ids, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=sums[: len(groups)], minlength=len(ids))
        counts = np.bincount(inverse, weights=counts[: len(groups)], minlength=len(ids))
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    tokens = float(counts.sum())
    if tokens == 0:
        raise UserError("eval: no tokens to evaluate")
    loss = float(sums.sum() / tokens)
    n = len(counts)
    se = float(np.sqrt(np.sum((sums - loss * counts) ** 2) * n / max(n - 1, 1)) / tokens) if n > 1 else float("nan")
    bpb = None if total_bytes is None else float(sums.sum() / math.log(2) / max(total_bytes, 1))
    return EvalResult(loss, se, math.exp(min(loss, 700.0)), bpb, int(tokens), int(total_bytes or 0), windows_n)


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


def windows(tokens: np.ndarray, seq_len: int, bounds: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, seq_len + 1] windows overlapping by one token, a mask [n, seq_len] of real targets, and
    each window's segment: `bounds` (segment starts and the end) cut the tokens into segments
    windowed each on its own; without them the tokens are one text and each window its own group."""
    if bounds is None or len(bounds) < 2:
        bounds = np.asarray([0, len(tokens)], np.int64)
        per_window = True
    else:
        per_window = False
    lows, highs = np.asarray(bounds[:-1], np.int64), np.asarray(bounds[1:], np.int64)
    counts = np.maximum(1, -(-(highs - lows - 1) // seq_len))
    counts[highs - lows < 2] = 0  # a segment of one token predicts nothing
    if counts.sum() == 0:
        counts[0] = 1
    n = int(counts.sum())
    out = np.zeros((n, seq_len + 1), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    group = np.zeros(n, np.int64)
    w = 0
    for g, (lo, hi, k) in enumerate(zip(lows, highs, counts)):
        for j in range(k):
            chunk = tokens[lo + j * seq_len : min(hi, lo + j * seq_len + seq_len + 1)]
            out[w, : len(chunk)] = chunk
            mask[w, : max(0, len(chunk) - 1)] = 1.0
            group[w] = w if per_window else g
            w += 1
    return out, mask, group


def batched_windows(wins: np.ndarray, mask: np.ndarray, batch: int):
    """(tokens, mask) in batches of `batch` windows, the last padded with masked empty windows."""
    for start in range(0, len(wins), batch):
        chunk, cmask = wins[start : start + batch], mask[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
            cmask = np.concatenate([cmask, np.zeros((pad, cmask.shape[1]), np.float32)])
        yield chunk, cmask


def evaluate_tokens(params, cfg, tokens: np.ndarray, byte_lengths: np.ndarray, *, batch: int = 8,
                    bounds: Optional[np.ndarray] = None) -> EvalResult:
    m = cfg.model
    if len(tokens) < 2:
        raise UserError("eval: the text has fewer than 2 tokens")
    wins, mask, groups = windows(np.asarray(tokens), m.seq_len, bounds)
    fn = jax.jit(lambda p, t, k: window_sums(p, t, k, m))
    sums, counts, total_bytes = [], [], 0
    for chunk, cmask in batched_windows(wins, mask, batch):
        s_, c_ = fn(params, jnp.asarray(chunk), jnp.asarray(cmask))
        sums.append(np.asarray(s_, np.float64))
        counts.append(np.asarray(c_, np.float64))
        targets = chunk[:, 1:]
        total_bytes += int(np.sum(byte_lengths[np.minimum(targets, len(byte_lengths) - 1)] * cmask))
    return summarize(np.concatenate(sums), np.concatenate(counts), total_bytes, groups)


def evaluate_run(run_dir: Path, *, text_file: Optional[Path] = None, data: Optional[str] = None,
                 max_tokens: int = 0) -> EvalResult:
    """The run's latest model on `text_file`, on `data`'s held-out part, or on the run's own
    held-out tokens (the in-run evaluation's); `max_tokens` > 0 keeps only the first so many."""
    from crosstrain.data.tokenizer import load_tokenizer
    from crosstrain.runtime import load_run

    cfg, params, _ = load_run(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    lengths = token_byte_lengths(tokenizer)
    bounds = None
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
        pipeline = build_pipeline(data_cfg, write_files=False)
        tokens, bounds = pipeline.heldout_tokens(), pipeline.heldout_bounds()
        if tokens.size == 0:
            raise UserError(f"{'--data' if data else '--run-dir'}: no tokens are held out (data.holdout="
                            f"{cfg.data.holdout}); evaluate on --text-file F instead")
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
        if bounds is not None:
            bounds = np.append(bounds[bounds < len(tokens)], len(tokens))
    return evaluate_tokens(params, cfg, np.asarray(tokens, np.int32), lengths, bounds=bounds)
