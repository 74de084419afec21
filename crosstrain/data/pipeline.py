"""From a data config to batches: tokenizer, token store, packing, shuffling, sharding.

A batch is a pure function of the step index: sequence `j` of global batch `s` is element
`s * batch + j` of a Grain `MapDataset` that packs the training stream into sequences of
`seq_len + 1` tokens (inputs and shifted targets share all but one token), shuffles them with the
run's seed and reshuffles every epoch. Resuming at step `s` therefore needs nothing but `s`, and
each process reads only the rows of the global batch that its devices hold, so the global batch is
the same whatever the process count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import grain
import numpy as np
from tokenizers import Tokenizer

from crosstrain.config import Config
from crosstrain.data import corpus
from crosstrain.data.store import STORE_VERSION, TokenStore, build_store
from crosstrain.data.tokenizer import eot_id, load_tokenizer, train_bpe
from crosstrain.errors import UserError

log = logging.getLogger("crosstrain")

TOKENIZER_SAMPLE_BYTES = 32 * 1024 * 1024


class PackedSequences:
    """Random-access view of a token stream as overlapping windows of `seq_len + 1` tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


@dataclass
class Pipeline:
    tokenizer: Tokenizer
    eot: int
    store: TokenStore
    seq_len: int
    global_batch: int
    seed: int

    def __post_init__(self) -> None:
        self.train_sequences = PackedSequences(self.store.train, self.seq_len)
        if len(self.train_sequences) == 0:
            raise UserError(
                f"data: the corpus has {self.store.train_end} training tokens, fewer than one sequence of "
                f"model.seq_len + 1 = {self.seq_len + 1}"
            )
        self._shuffled = grain.MapDataset.source(self.train_sequences).shuffle(seed=self.seed).repeat(None)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def _rows(self, rows: Optional[tuple[int, int]]) -> range:
        lo, hi = (0, self.global_batch) if rows is None else rows
        return range(lo, hi)

    def train_batch(self, step: int, rows: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Rows [lo, hi) (default: all) of global batch `step` (0-based), int32 [rows, seq_len + 1]."""
        first = step * self.global_batch
        return np.stack([self._shuffled[first + j] for j in self._rows(rows)])

    def eval_batches(self, count: int, rows: Optional[tuple[int, int]] = None) -> Iterator[np.ndarray]:
        """Up to `count` batches of held-out sequences in order (training data if none held out)."""
        stream = self.store.heldout if self.store.heldout_documents else self.store.train
        seqs = PackedSequences(stream, self.seq_len)
        n = min(count, len(seqs) // self.global_batch)
        for b in range(n):
            yield np.stack([seqs[b * self.global_batch + j] for j in self._rows(rows)])

    def state(self, step: int) -> dict:
        """Everything needed to resume the stream: batches are indexed by step."""
        return {"next_step": int(step), "seed": self.seed, "store": self.store.path.name}


def _sources(cfg: Config) -> tuple[list[Path], str]:
    if cfg.data.path:
        files = corpus.text_files(Path(cfg.data.path))
        return files, "text:" + corpus.fingerprint_files(files)
    files = corpus.stdlib_files()
    return files, "stdlib:" + corpus.fingerprint_files(files)


def _progress(total_bytes: int, label: str):
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, disable=not sys.stderr.isatty(), leave=False)
    return bar


def build_pipeline(cfg: Config, *, run_dir: Optional[Path] = None, write_files: bool = True) -> Pipeline:
    files, ident = _sources(cfg)
    cache = corpus.cache_dir()
    max_bytes = cfg.data.max_bytes

    # Tokenizer: the run's own (resume), a user's file, or a BPE trained on the corpus (cached).
    run_tok = run_dir / "tokenizer.json" if run_dir else None
    if run_tok is not None and run_tok.is_file():
        tokenizer = load_tokenizer(run_tok)
    elif cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        sample = min(max_bytes or TOKENIZER_SAMPLE_BYTES, TOKENIZER_SAMPLE_BYTES)
        key = hashlib.sha256(json.dumps([ident, cfg.model.vocab, sample, "bpe-v1"]).encode()).hexdigest()[:24]
        path = cache / "tokenizers" / f"{key}.json"
        if path.is_file():
            tokenizer = load_tokenizer(path)
        else:
            log.info("training a %d-token byte-level BPE on %s", cfg.model.vocab, "the built-in corpus" if not cfg.data.path else cfg.data.path)
            texts = (d.text for d in corpus.iter_documents(files, sample))
            tokenizer = train_bpe(texts, cfg.model.vocab)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tokenizer.save(str(tmp))
            tmp.replace(path)
    if tokenizer.get_vocab_size() > cfg.model.vocab:
        raise UserError(
            f"model.vocab: {cfg.model.vocab} is smaller than the tokenizer's vocabulary ({tokenizer.get_vocab_size()})"
        )
    eot = eot_id(tokenizer)
    if run_dir is not None and write_files and not (run_dir / "tokenizer.json").is_file():
        tmp = run_dir / "tokenizer.json.tmp"
        tokenizer.save(str(tmp))
        tmp.replace(run_dir / "tokenizer.json")

    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    store_key = hashlib.sha256(
        json.dumps([ident, tok_hash, max_bytes, cfg.data.holdout, STORE_VERSION]).encode()
    ).hexdigest()[:24]
    total = sum(p.stat().st_size for p in files)
    if max_bytes:
        total = min(total, max_bytes)
    bar = None
    if not (cache / "stores" / store_key / "meta.json").is_file():
        log.info("tokenizing %.1f MB into the token store (cached for later runs)", total / 1e6)
        bar = _progress(total, "tokenize")
    store = build_store(
        corpus.iter_documents(files, max_bytes),
        tokenizer,
        key=store_key,
        root=cache / "stores",
        eot=eot,
        holdout=cfg.data.holdout,
        progress=None if bar is None else bar.update,
    )
    if bar is not None:
        bar.close()
    return Pipeline(
        tokenizer=tokenizer,
        eot=eot,
        store=store,
        seq_len=cfg.model.seq_len,
        global_batch=cfg.train.batch,
        seed=cfg.train.seed,
    )
