"""The token store: a corpus tokenized once into a memory-mapped array, cached on disk.

Documents are concatenated, each followed by the end-of-document token. Documents chosen for the
held-out split (by a hash of their name, so the split does not depend on order) are written after
all training documents, so the training stream is `tokens[:train_end]` and the held-out stream is
`tokens[train_end:]`. The cache key covers the sources' identity, the tokenizer and the settings;
a store is written into a temporary directory and renamed into place, so a killed build leaves no
half-written store behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from crosstrain.data.corpus import Document

STORE_VERSION = 1


@dataclass(frozen=True)
class TokenStore:
    path: Path
    tokens: np.ndarray  # memory-mapped, uint16 or uint32
    train_end: int
    documents: int
    heldout_documents: int

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


def open_store(path: Path) -> TokenStore:
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))
    return TokenStore(path, tokens, meta["train_end"], meta["documents"], meta["heldout_documents"])


def build_store(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    key: str,
    root: Path,
    eot: int,
    holdout: float,
    batch_docs: int = 64,
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

            def flush(batch: Sequence[Document]) -> None:
                nonlocal n_docs, n_held, n_train_tokens
                encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
                for doc, enc in zip(batch, encodings):
                    ids = np.fromiter(enc.ids, dtype=dtype, count=len(enc.ids))
                    arr = np.concatenate([ids, np.array([eot], dtype=dtype)])
                    n_docs += 1
                    if is_heldout(doc.name, holdout):
                        n_held += 1
                        heldout_parts.append(arr)
                    else:
                        out.write(arr.tobytes())
                        n_train_tokens += arr.size
                    if progress:
                        progress(len(doc.text))

            pending: list[Document] = []
            for doc in docs:
                pending.append(doc)
                if len(pending) >= batch_docs:
                    flush(pending)
                    pending = []
            if pending:
                flush(pending)
            for arr in heldout_parts:
                out.write(arr.tobytes())
            total = n_train_tokens + sum(a.size for a in heldout_parts)
        meta = {
            "version": STORE_VERSION,
            "dtype": np.dtype(dtype).name,
            "tokens": int(total),
            "train_end": int(n_train_tokens),
            "documents": n_docs,
            "heldout_documents": n_held,
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
