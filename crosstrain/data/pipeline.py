"""From a data config to batches: sources, tokenizer, token stores, mixture, packing, sharding.

A batch is a pure function of the step index. Each source's training stream is packed into
sequences of `seq_len + 1` tokens (inputs and shifted targets share all but one token), and a
Grain `MapDataset` shuffles them with a per-source seed and reshuffles every epoch. The mixture
maps global sequence `i` to (source, that source's sequence number); sequence `j` of global batch
`s` is global sequence `s * batch + j`. Resuming at step `s` therefore needs nothing but `s`, and
each process reads only the rows of the global batch that its own devices hold, so the global
batch is the same whatever the process count.

The training iterator is a Grain `IterDataset` over that step-indexed dataset, which prefetches on
a background thread and exposes its position through `get_state()` / `set_state()`: the state a
checkpoint stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import grain
import numpy as np
from tokenizers import Tokenizer

from crosstrain.config import Config
from crosstrain.paths import cache_dir
from crosstrain.data.mixture import Mixture, Phase
from crosstrain.data.sources import Source, SourceReport, fingerprint, iter_documents, resolve_format, source_files
from crosstrain.storage import stat
from crosstrain.data.store import STORE_VERSION, TokenStore, build_store
from crosstrain.data.tokenizer import eot_id, load_tokenizer, train_bpe
from crosstrain.errors import UserError
from crosstrain.files import atomic_path, write_json

log = logging.getLogger("crosstrain")

TOKENIZER_SAMPLE_BYTES = 32 * 1024 * 1024
PREFETCH_BATCHES = 4


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
    sources: list[Source]
    stores: list[TokenStore]
    seq_len: int
    global_batch: int
    seed: int
    phases: list[Phase] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.train_sequences = [PackedSequences(s.train, self.seq_len) for s in self.stores]
        for src, seqs, store in zip(self.sources, self.train_sequences, self.stores):
            if len(seqs) == 0:
                raise UserError(
                    f"data: {src.label} has {store.train_end} training tokens, fewer than one sequence of "
                    f"model.seq_len + 1 = {self.seq_len + 1}"
                )
        self._shuffled = [
            grain.MapDataset.source(seqs).shuffle(seed=self.seed + 7919 * k).repeat(None)
            for k, seqs in enumerate(self.train_sequences)
        ]
        if not self.phases:
            self.phases = [Phase(0, tuple(s.weight for s in self.sources))]
        self.mixture = None if len(self.sources) == 1 else Mixture(self.phases, seed=self.seed)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def locate(self, index: int) -> tuple[int, int]:
        """(source, source sequence number) of global training sequence `index`."""
        return (0, index) if self.mixture is None else self.mixture.locate(index)

    def sequence(self, index: int) -> np.ndarray:
        k, n = self.locate(index)
        return self._shuffled[k][n]

    def _rows(self, rows: Optional[tuple[int, int]]) -> range:
        lo, hi = (0, self.global_batch) if rows is None else rows
        return range(lo, hi)

    def train_batch(self, step: int, rows: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Rows [lo, hi) (default: all) of global batch `step` (0-based), int32 [rows, seq_len + 1]."""
        first = step * self.global_batch
        return np.stack([self.sequence(first + j) for j in self._rows(rows)])

    def batches(self, rows: Optional[tuple[int, int]] = None, *, state: Optional[dict] = None):
        """A Grain iterator over this process's batches from step 0, or from `state`
        (what `get_state()` returned), prefetching on a background thread."""
        ds = grain.MapDataset.range(0, 1 << 62).map(lambda step: self.train_batch(int(step), rows))
        it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_BATCHES)))
        if state is not None:
            it.set_state(state)
        return it

    def heldout_tokens(self) -> np.ndarray:
        """Every source's held-out tokens, one after the other (empty if nothing is held out)."""
        held = [s.heldout for s in self.stores if s.heldout.size]
        return np.concatenate(held) if held else np.zeros(0, np.int32)

    def heldout_bounds(self) -> np.ndarray:
        """Where each held-out segment starts in heldout_tokens(), and the end (crosstrain/data/store.py)."""
        bounds, at = [np.zeros(1, np.int64)], 0
        for s in self.stores:
            if s.heldout.size:
                bounds.append(s.heldout_bounds[1:] + at)
                at += s.heldout.size
        return np.concatenate(bounds)

    def report(self) -> dict:
        reports = [s.report for s in self.stores]
        totals = {
            key: sum(r.get(key, 0) for r in reports)
            for key in ("documents", "tokens", "empty_skipped", "invalid_utf8", "malformed_lines", "missing_field",
                        "long_lines_split", "heldout_documents", "heldout_segments", "heldout_tokens")
        }
        totals["heldout_share"] = totals["heldout_tokens"] / max(1, totals["tokens"])
        return {"sources": reports, "totals": totals}


def resolve_sources(cfg: Config) -> list[Source]:
    d = cfg.data
    if d.sources:
        return [
            Source(s.path, resolve_format(s.path, s.format, f"data.sources[{i}].path"), s.field, s.glob, s.weight)
            for i, s in enumerate(d.sources)
        ]
    if d.path:
        return [Source(d.path, resolve_format(d.path, d.format, "data.path"), d.field, d.glob)]
    return [Source("", "stdlib")]


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not sys.stderr.isatty(), leave=False)


def _describe(report: dict) -> str:
    parts = [f"{report['documents']:,} documents, {report['tokens']:,} tokens"]
    if report.get("heldout_tokens"):
        parts.append(f"{report['heldout_tokens']:,} tokens held out ({100 * report['heldout_share']:.1f}%, "
                     f"{report.get('heldout_segments', 0)} segments of {report['heldout_documents']} documents)")
    if report["empty_skipped"]:
        parts.append(f"{report['empty_skipped']} empty skipped")
    if report["invalid_utf8"]:
        parts.append(f"{report['invalid_utf8']} with invalid UTF-8 decoded with replacement")
    if report["malformed_lines"]:
        parts.append(f"{report['malformed_lines']} malformed lines skipped (first: {', '.join(report['first_malformed'])})")
    if report["missing_field"]:
        parts.append(
            f"{report['missing_field']} records without the field skipped (first: {', '.join(report['first_missing_field'])})"
        )
    if report["long_lines_split"]:
        parts.append(f"{report['long_lines_split']} cuts inside over-long lines")
    return "; ".join(parts)


def _tokenizer(cfg: Config, sources: list[Source], idents: list[str], run_dir: Optional[Path]) -> Tokenizer:
    """The run's own tokenizer (on resume), the user's, or a BPE trained on a weighted sample."""
    run_tok = run_dir / "tokenizer.json" if run_dir else None
    if run_tok is not None and run_tok.is_file():
        return load_tokenizer(run_tok)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    sample = min(cfg.data.max_bytes or TOKENIZER_SAMPLE_BYTES, TOKENIZER_SAMPLE_BYTES)
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    shares = [max(1, int(sample * w / weights.sum())) for w in weights]
    key = hashlib.sha256(json.dumps([idents, shares, cfg.model.vocab, "bpe-v1"]).encode()).hexdigest()[:24]
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    log.info("training a %d-token byte-level BPE on %.1f MB of the data", cfg.model.vocab, sum(shares) / 1e6)

    def texts():
        for src, share in zip(sources, shares):
            for doc in iter_documents(src, SourceReport(src.label, src.format), max_bytes=share):
                yield doc.text

    tokenizer = train_bpe(texts(), cfg.model.vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    return tokenizer


def build_pipeline(cfg: Config, *, run_dir: Optional[Path] = None, write_files: bool = True) -> Pipeline:
    sources = resolve_sources(cfg)
    files = [source_files(s) for s in sources]
    idents = [f"{s.format}:{s.field}:{s.glob}:{fingerprint(f)}" for s, f in zip(sources, files)]
    tokenizer = _tokenizer(cfg, sources, idents, run_dir)
    if tokenizer.get_vocab_size() > cfg.model.vocab:
        raise UserError(
            f"model.vocab: {cfg.model.vocab} is smaller than the tokenizer's vocabulary ({tokenizer.get_vocab_size()})"
        )
    eot = eot_id(tokenizer)
    if run_dir is not None and write_files and not (run_dir / "tokenizer.json").is_file():
        with atomic_path(run_dir / "tokenizer.json") as tmp:
            tokenizer.save(str(tmp))

    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    stores = []
    for src, fs, ident in zip(sources, files, idents):
        key = hashlib.sha256(
            json.dumps([ident, tok_hash, cfg.data.max_bytes, cfg.data.holdout, STORE_VERSION]).encode()
        ).hexdigest()[:24]
        root = cache_dir() / "stores"
        bar = None
        if not (root / key / "meta.json").is_file():
            total = sum(stat(f)[0] for f in fs)
            total = min(total, cfg.data.max_bytes) if cfg.data.max_bytes else total
            log.info("tokenizing %s (%.1f MB) into the token store (cached for later runs)", src.label, total / 1e6)
            bar = _progress(total, "tokenize")
        report = SourceReport(src.label, src.format)
        store = build_store(
            iter_documents(src, report, max_bytes=cfg.data.max_bytes),
            tokenizer,
            key=key,
            root=root,
            eot=eot,
            holdout=cfg.data.holdout,
            report=report,
            progress=None if bar is None else bar.update,
        )
        if bar is not None:
            bar.close()
        log.info("data: %s: %s", src.label, _describe(store.report))
        stores.append(store)

    phases = [Phase(0, tuple(s.weight for s in sources))]
    phases += [Phase(p.step * cfg.train.batch, tuple(p.weights)) for p in cfg.data.mixture]
    pipeline = Pipeline(
        tokenizer=tokenizer,
        eot=eot,
        sources=sources,
        stores=stores,
        seq_len=cfg.model.seq_len,
        global_batch=cfg.train.batch,
        seed=cfg.train.seed,
        phases=phases,
    )
    if run_dir is not None and write_files:
        write_json(run_dir / "data_report.json", pipeline.report())
    return pipeline
