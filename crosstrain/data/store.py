"""The token store: one source tokenized once into a memory-mapped array, cached on disk.

Documents are concatenated, each followed by the end-of-document token. The held-out split is
counted in tokens, per source: at least `holdout` of the source's tokens, and at least
HOLDOUT_FLOOR tokens (a stable mean) where that stays within HOLDOUT_CAP of the source. It is made
of segments, not of whole documents: every document is cut into segments (segment_size: about 256
segments in all, 128 to 8192 tokens each), each segment gets a position from a hash of its
document's name and its index, and segments are taken in that order until the held-out share is
reached (the last one taken gives only its tail). A held-out set of a few whole documents measures
those documents (their topic, their difficulty); segments from hundreds of places measure the
corpus, and the split still does not depend on file order and is the same on every machine. A
training piece cut short by a hole ends with the end-of-document token, so no training window
reads across a hole as if the text ran on; held-out segments are evaluated each on its own
(heldout_bounds.npy says where each starts), so none is read as the context of another. Held-out
tokens are written after all training tokens, so the training stream is `tokens[:train_end]` and
the held-out stream is `tokens[train_end:]`. The cache key covers the
source's content fingerprint, the tokenizer and the settings; a store is written into a temporary
directory and renamed into place, so a killed build leaves no half-written store behind.

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

STORE_VERSION = 5
# The held-out split (module docstring): a floor in tokens for a stable mean, taken only where it
# stays within a cap on the source's share.
HOLDOUT_FLOOR = 50_000
HOLDOUT_CAP = 0.10
# Held-out segments: as long as the held-out target allows while keeping about SEGMENTS_WANTED of
# them (a mean over hundreds of places in the corpus, not a few documents), within these bounds.
SEGMENT_MIN = 128
SEGMENT_MAX = 8192
SEGMENTS_WANTED = 256
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
    heldout_bounds: np.ndarray  # where each held-out segment starts in `heldout`, and its end
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


def segment_size(target: int) -> int:
    """Tokens per held-out segment for a held-out set of `target` tokens: the largest power of two
    that still gives SEGMENTS_WANTED segments, between SEGMENT_MIN and SEGMENT_MAX."""
    size = SEGMENT_MIN
    while size * 2 <= SEGMENT_MAX and size * 2 * SEGMENTS_WANTED <= target:
        size *= 2
    return size


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well-spread 64-bit hash of each value."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def segment_orders(doc_orders: list[int], lengths: list[int], segment: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document's segments as (document, start, order): `segment` tokens each (the last of a
    document shorter), placed by a hash of the document's name-order and the segment's index."""
    lens = np.asarray(lengths, dtype=np.int64)
    counts = np.maximum(1, -(-lens // segment))
    doc = np.repeat(np.arange(lens.size), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    index = np.arange(doc.size, dtype=np.int64) - np.repeat(first, counts)
    base = np.asarray(doc_orders, dtype=np.uint64)[doc] if doc.size else np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        order = _mix64(base ^ (index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return doc, index * segment, order


def choose_heldout(lengths: list[int], orders: list[int], target: int, segment: int = 0) -> list[tuple[int, int, int]]:
    """Held-out pieces (document, start, end) in token offsets within each document, `target`
    tokens in all: segments taken in hash order, the last one taken giving its tail."""
    if target <= 0 or not lengths:
        return []
    segment = segment or segment_size(target)
    doc, start, order = segment_orders(orders, lengths, segment)
    end = np.minimum(start + segment, np.asarray(lengths, dtype=np.int64)[doc])
    pieces, need = [], target
    for j in np.argsort(order, kind="stable"):
        size = int(end[j] - start[j])
        if size <= 0:
            continue
        take = min(size, need)
        pieces.append((int(doc[j]), int(end[j]) - take, int(end[j])))
        need -= take
        if need <= 0:
            break
    return pieces


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
    bounds = np.load(path / "heldout_bounds.npy", allow_pickle=False)
    return TokenStore(path, tokens, meta["train_end"], bounds, meta["documents"], meta["heldout_documents"], meta["report"])


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
        pieces = choose_heldout(lengths, orders, heldout_target(total, holdout))
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        everything = np.memmap(tmp / "all.bin", dtype=dtype, mode="r", shape=(total,)) if total else np.zeros(0, dtype)
        holes: dict[int, list[tuple[int, int]]] = {}
        for d, lo, hi in pieces:
            holes.setdefault(d, []).append((lo, hi))
        end_mark = np.array([eot], dtype=dtype)

        def ended(part: np.ndarray) -> np.ndarray:
            # A training piece that stops inside its document gets an end-of-document token of its own.
            return part if part.size and part[-1] == eot else np.concatenate([part, end_mark])

        n_train = n_held = 0
        # Second pass: training tokens in file order, each document minus its held-out segments,
        # then the held-out segments in the split's order.
        with open(tmp / "tokens.bin", "wb") as out:
            for i in range(len(lengths)):
                doc = everything[starts[i]:starts[i + 1]]
                if i not in holes:
                    out.write(np.asarray(doc).tobytes())
                    n_train += doc.size
                    continue
                at = 0
                for lo, hi in sorted(holes[i]) + [(len(doc), len(doc))]:
                    kept = np.asarray(doc[at:lo])
                    # The lone end-of-document token after a hole at a document's end adds nothing.
                    if kept.size and not (at > 0 and kept.size == 1 and lo == len(doc)):
                        kept = ended(kept)
                        out.write(kept.tobytes())
                        n_train += kept.size
                    at = hi
            bounds = [0]
            for d, lo, hi in pieces:
                part = np.asarray(everything[starts[d] + lo:starts[d] + hi])
                out.write(part.tobytes())
                n_held += part.size
                bounds.append(n_held)
        np.save(tmp / "heldout_bounds.npy", np.asarray(bounds, np.int64), allow_pickle=False)
        del everything
        (tmp / "all.bin").unlink()
        n_docs = len(lengths)
        report.tokens = int(n_train + n_held)
        report.heldout_documents = len(holes)
        report.heldout_segments = len(pieces)
        report.heldout_tokens = int(n_held)
        report.heldout_share = n_held / max(1, n_train + n_held)
        meta = {
            "version": STORE_VERSION,
            "dtype": np.dtype(dtype).name,
            "tokens": int(n_train + n_held),
            "train_end": int(n_train),
            "documents": n_docs,
            "heldout_documents": report.heldout_documents,
            "heldout_segments": len(pieces),
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
