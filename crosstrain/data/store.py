"""The token store: one source tokenized once into a memory-mapped array, cached on disk.

Documents are concatenated, each followed by the end-of-document token. The held-out split is
counted in tokens, per source: at least `holdout` of the source's tokens, and at least
HOLDOUT_FLOOR tokens (a stable mean) where that stays within HOLDOUT_CAP of the source. Documents
are taken in the order of a hash of their name (so the split does not depend on file order, and
is the same on every machine) until the held-out share is reached; the last one taken is cut, its
tail held out and its head kept for training, so the share is met exactly and a source of one
large document is split too. Held-out tokens are written after all training tokens, so the
training stream is `tokens[:train_end]` and the held-out stream is `tokens[train_end:]`. The cache
key covers the source's content fingerprint, the tokenizer and the settings; a store is written
into a temporary directory and renamed into place, so a killed build leaves no half-written store
behind.

Tokenization runs in batches through `encode_batch_fast` (Rust, all cores). Long documents are cut
into pieces of about `CHUNK_CHARS` just before a space or newline that follows a non-space
character, which is always a pre-tokenizer boundary, so the tokens are exactly those of the whole
document; a stretch longer than `LONG_LINE` with no such boundary is cut anywhere and counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from tokenizers import Tokenizer

from crosstrain.data.corpus import Document
from crosstrain.data.sources import SourceReport

STORE_VERSION = 3
# The held-out split (module docstring): a floor in tokens for a stable mean, taken only where it
# stays within a cap on the source's share.
HOLDOUT_FLOOR = 50_000
HOLDOUT_CAP = 0.10
CHUNK_CHARS = 8192
LONG_LINE = 1 << 20
# Just before a space or newline that follows a non-space character: no pre-token (GPT-2-style
# byte-level regex, digits split) runs from a non-space character into following whitespace, so a
# token always starts here. Python's \S is narrower than the tokenizer's non-space class.
_BOUNDARY = re.compile(r"(?<=\S)(?=[ \n])")


@dataclass(frozen=True)
class TokenStore:
    path: Path
    tokens: np.ndarray  # memory-mapped, uint16 or uint32
    train_end: int
    documents: int
    heldout_documents: int
    report: dict

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.train_end]

    @property
    def heldout(self) -> np.ndarray:
        return self.tokens[self.train_end :]


def name_order(name: str) -> int:
    """Where a document stands in the held-out order: a hash of its name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def heldout_target(total: int, fraction: float) -> int:
    """Tokens to hold out of a source of `total` tokens."""
    if fraction <= 0 or total <= 0:
        return 0
    return int(min(total - 1, max(math.ceil(fraction * total), min(HOLDOUT_FLOOR, HOLDOUT_CAP * total))))


def choose_heldout(lengths: list[int], orders: list[int], target: int) -> tuple[list[int], Optional[tuple[int, int]]]:
    """(documents held out whole, (document, tail tokens) cut or None) to hold out `target` tokens,
    documents taken in `orders`' order."""
    whole: list[int] = []
    need = target
    for i in sorted(range(len(lengths)), key=lambda j: orders[j]):
        if need <= 0:
            break
        if lengths[i] <= need:
            whole.append(i)
            need -= lengths[i]
        else:
            return whole, (i, need)
    return whole, None


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def split_text(text: str, report: Optional[SourceReport] = None) -> list[str]:
    """Pieces of `text` that tokenize, one after the other, to the tokens of the whole text
    (except where a line longer than LONG_LINE has to be cut, which is counted)."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    pieces, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        m = _BOUNDARY.search(text, start + CHUNK_CHARS, start + LONG_LINE)
        if m is not None:
            cut = m.start()
        elif len(text) - start <= LONG_LINE:
            break  # the rest is one piece of acceptable size
        else:
            limit = start + LONG_LINE
            space = text.rfind(" ", start + CHUNK_CHARS, limit)
            cut = space if space > start else limit
            if report is not None:
                report.long_lines_split += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def open_store(path: Path) -> TokenStore:
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))
    return TokenStore(path, tokens, meta["train_end"], meta["documents"], meta["heldout_documents"], meta["report"])


def build_store(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    key: str,
    root: Path,
    eot: int,
    holdout: float,
    report: SourceReport,
    batch_chars: int = 256 * CHUNK_CHARS,
    progress: Callable[[int], None] | None = None,
) -> TokenStore:
    """Tokenize `docs` into `root/key` unless a store for `key` is already there."""
    final = root / key
    if (final / "meta.json").is_file():
        return open_store(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        dtype = token_dtype(tokenizer.get_vocab_size())
        lengths: list[int] = []
        orders: list[int] = []
        # First pass: every document's tokens in file order; the split is chosen once all are counted.
        with open(tmp / "all.bin", "wb") as out:

            def flush(batch: list[Document]) -> None:
                pieces, owners = [], []
                for i, doc in enumerate(batch):
                    parts = split_text(doc.text, report)
                    pieces.extend(parts)
                    owners.extend([i] * len(parts))
                encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
                per_doc: list[list[np.ndarray]] = [[] for _ in batch]
                for owner, enc in zip(owners, encodings):
                    per_doc[owner].append(np.asarray(enc.ids, dtype=dtype))
                for doc, parts in zip(batch, per_doc):
                    arr = np.concatenate([*parts, np.array([eot], dtype=dtype)])
                    out.write(arr.tobytes())
                    lengths.append(int(arr.size))
                    orders.append(name_order(doc.name))
                    if progress:
                        progress(len(doc.text))

            # Batches of ~256 pieces of CHUNK_CHARS keep both of Rust's worker threads busy
            # without one straggler piece holding the batch (measured: benchmarks/data_throughput.py).
            pending: list[Document] = []
            chars = 0
            for doc in docs:
                pending.append(doc)
                chars += len(doc.text)
                if chars >= batch_chars:
                    flush(pending)
                    pending, chars = [], 0
            if pending:
                flush(pending)
        total = sum(lengths)
        whole, cut = choose_heldout(lengths, orders, heldout_target(total, holdout))
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        everything = np.memmap(tmp / "all.bin", dtype=dtype, mode="r", shape=(total,)) if total else np.zeros(0, dtype)
        held = set(whole)
        n_train = 0
        # Second pass: training tokens in file order (a cut document's head ends with its own
        # end-of-document token), then the held-out tokens in the split's order.
        with open(tmp / "tokens.bin", "wb") as out:
            for i in range(len(lengths)):
                if i in held:
                    continue
                doc = everything[starts[i]:starts[i + 1]]
                if cut is not None and cut[0] == i:
                    doc = np.concatenate([doc[: len(doc) - cut[1]], np.array([eot], dtype=dtype)])
                out.write(np.asarray(doc).tobytes())
                n_train += len(doc)
            tail = [everything[starts[i]:starts[i + 1]] for i in whole]
            if cut is not None:
                tail.append(everything[starts[cut[0] + 1] - cut[1]:starts[cut[0] + 1]])
            for part in tail:
                out.write(np.asarray(part).tobytes())
            n_held = sum(len(part) for part in tail)
        del everything
        (tmp / "all.bin").unlink()
        n_docs = len(lengths)
        report.tokens = int(n_train + n_held)
        report.heldout_documents = len(whole) + (cut is not None)
        report.heldout_tokens = int(n_held)
        report.heldout_share = n_held / max(1, n_train + n_held)
        meta = {
            "version": STORE_VERSION,
            "dtype": np.dtype(dtype).name,
            "tokens": int(n_train + n_held),
            "train_end": int(n_train),
            "documents": n_docs,
            "heldout_documents": report.heldout_documents,
            "report": report.to_dict(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process built the same store first; theirs is identical.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(final)
