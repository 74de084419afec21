"""`crosstrain eval`: mean next-token loss, perplexity and bits per byte of a run's model.

Text is tokenized (no special tokens added) and cut into windows of `seq_len + 1` tokens that
overlap by one, so every token after the first is predicted exactly once, each with as much
context as the window gives. The last window is padded and its padding masked. Bits per byte
divide the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, which makes models
with different tokenizers comparable.
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
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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


def evaluate_tokens(params, cfg, tokens: np.ndarray, byte_lengths: np.ndarray, *, batch: int = 8) -> EvalResult:
    m = cfg.model
    if len(tokens) < 2:
        raise UserError("eval: the text has fewer than 2 tokens")
    wins, mask = windows(np.asarray(tokens), m.seq_len)
    fn = jax.jit(lambda p, t: token_losses(p, t, m))
    total_nll, total_bytes, count = 0.0, 0, 0
    for start in range(0, len(wins), batch):
        chunk, cmask = wins[start : start + batch], mask[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
            cmask = np.concatenate([cmask, np.zeros((pad, cmask.shape[1]), np.float32)])
        nll = np.asarray(fn(params, jnp.asarray(chunk)), dtype=np.float64)
        total_nll += float(np.sum(nll * cmask))
        count += int(cmask.sum())
        targets = chunk[:, 1:]
        total_bytes += int(np.sum(byte_lengths[np.minimum(targets, len(byte_lengths) - 1)] * cmask))
    loss = total_nll / count
    return EvalResult(loss, math.exp(min(loss, 700.0)), total_nll / math.log(2) / max(total_bytes, 1), count, total_bytes)


def evaluate_run(run_dir: Path, *, text_file: Optional[Path] = None, data: Optional[str] = None,
                 max_tokens: int = 1_000_000) -> EvalResult:
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
        pipeline = build_pipeline(data_cfg, write_files=False)
        held = [s.heldout for s in pipeline.stores if s.heldout_documents]
        tokens = np.concatenate(held) if held else np.concatenate([s.train for s in pipeline.stores])
    return evaluate_tokens(params, cfg, np.asarray(tokens[:max_tokens], np.int32), lengths)
