"""The token store: one source tokenized once into a memory-mapped array, cached on disk.

Documents are concatenated, each followed by the end-of-document token. Documents chosen for the
held-out split (by a hash of their name, so the split does not depend on order) are written after
all training documents, so the training stream is `tokens[:train_end]` and the held-out stream is
`tokens[train_end:]`. The cache key covers the source's content fingerprint, the tokenizer and the
settings; a store is written into a temporary directory and renamed into place, so a killed build
leaves no half-written store behind.

Tokenization runs in batches through `encode_batch_fast` (Rust, all cores). Long documents are cut
into pieces of about `CHUNK_CHARS` just before a space or newline that follows a non-space
character, which is always a pre-tokenizer boundary, so the tokens are exactly those of the whole
document; a stretch longer than `LONG_LINE` with no such boundary is cut anywhere and counted.
"""

from __future__ import annotations

import hashlib
import json
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

STORE_VERSION = 2
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


def is_heldout(name: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return (h % 1_000_000) < fraction * 1_000_000


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
        heldout_parts: list[np.ndarray] = []
        n_docs = n_held = n_train_tokens = 0
        with open(tmp / "tokens.bin", "wb") as out:

            def flush(batch: list[Document]) -> None:
                nonlocal n_docs, n_held, n_train_tokens
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
                    n_docs += 1
                    if is_heldout(doc.name, holdout):
                        n_held += 1
                        heldout_parts.append(arr)
                    else:
                        out.write(arr.tobytes())
                        n_train_tokens += arr.size
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
            for arr in heldout_parts:
                out.write(arr.tobytes())
            total = n_train_tokens + sum(a.size for a in heldout_parts)
        report.tokens = int(total)
        report.heldout_documents = n_held
        meta = {
            "version": STORE_VERSION,
            "dtype": np.dtype(dtype).name,
            "tokens": int(total),
            "train_end": int(n_train_tokens),
            "documents": n_docs,
            "heldout_documents": n_held,
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
