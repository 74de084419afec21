"""Reading documents from the formats users bring, counting every bad record instead of failing.

Formats (`format: auto` picks one from the path):
- `text`: a text file, or a directory searched recursively with `glob` (default `**/*.txt`);
  one file is one document.
- `jsonl`: a `.jsonl` file (or a directory of them); one line is one record, the document is its
  `field` (default `text`).
- `parquet`: a `.parquet` file (or a directory of them); the document is column `field`.
- `hf`: a directory written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`, whose `train`
  split is used), read with pyarrow, so `datasets` need not be installed.
- `stdlib`: the built-in corpus, the Python standard library of the running interpreter.

Bad records never stop a build: invalid UTF-8 is decoded with U+FFFD and counted; empty documents
are skipped and counted; malformed JSONL lines and records without the field are skipped and
counted with their first line numbers kept. A path that does not exist, an unknown format, or a
field absent from every record is a user error (exit 2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from crosstrain.data.corpus import Document, stdlib_files
from crosstrain.errors import UserError
from crosstrain.storage import AnyPath, as_path, check_url, describe_error, is_remote, stat

FIRST_BAD = 5  # line numbers kept per kind of bad record


@dataclass
class SourceReport:
    source: str
    format: str
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_skipped: int = 0
    invalid_utf8: int = 0
    malformed_lines: int = 0
    missing_field: int = 0
    long_lines_split: int = 0
    tokens: int = 0  # as stored: a piece cut off by a held-out segment ends with its own end-of-document token
    heldout_documents: int = 0  # documents that give the held-out set one or more segments
    heldout_segments: int = 0  # held-out segments (crosstrain/data/store.py), each evaluated on its own
    heldout_tokens: int = 0
    heldout_share: float = 0.0  # of the source's tokens
    first_malformed: list[str] = field(default_factory=list)
    first_missing_field: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def bad_records(self) -> int:
        return self.empty_skipped + self.invalid_utf8 + self.malformed_lines + self.missing_field + self.long_lines_split


@dataclass(frozen=True)
class Source:
    path: str  # "" for the built-in corpus
    format: str
    field: str = "text"
    glob: str = "**/*.txt"
    weight: float = 1.0

    @property
    def label(self) -> str:
        return "built-in corpus (Python stdlib)" if self.format == "stdlib" else self.path


def _hf_root(path: Path) -> Optional[Path]:
    """The directory holding state.json of a save_to_disk dataset (the train split of a dict)."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    dd = path / "dataset_dict.json"
    if dd.is_file():
        try:
            splits = json.loads(dd.read_text()).get("splits", [])
        except (OSError, ValueError):
            splits = []
        for split in (["train"] if "train" in splits else []) + list(splits):
            if (path / split / "state.json").is_file():
                return path / split
    return None


def resolve_format(path: str, fmt: str, name: str) -> str:
    if not path:
        return "stdlib"
    check_url(path, name)
    p = as_path(path)
    try:
        exists = p.exists()
    except Exception as e:  # a bucket's refusal (missing, denied, bad credentials): one line
        raise UserError(f"{name}: {describe_error(path, e)}") from None
    if not exists:
        raise UserError(f"{name}: {path} does not exist")
    if fmt != "auto":
        if fmt == "hf" and _hf_root(p) is None:
            raise UserError(f"{name}: {path} is not a directory written by datasets' save_to_disk")
        return fmt
    if p.is_dir():
        if _hf_root(p) is not None:
            return "hf"
        for ext, kind in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".txt", "text")):
            if next(p.rglob(f"*{ext}"), None) is not None:
                return kind
        raise UserError(f"{name}: cannot tell the format of directory {path} (no .jsonl, .parquet or .txt files); set its format")
    suffixes = "".join(p.suffixes[-1:]).lower()
    kind = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}.get(suffixes)
    if kind is None:
        raise UserError(f"{name}: unknown format for {path} (known: text, jsonl, parquet, hf); set its format")
    return kind


def source_files(src: Source) -> list[AnyPath]:
    if src.format == "stdlib":
        return stdlib_files()
    p = as_path(src.path)
    if src.format == "hf":
        root = _hf_root(p)
        state = json.loads((root / "state.json").read_text())
        return [root / f["filename"] for f in state.get("_data_files", [])]
    if p.is_file():
        return [p]
    pattern = {"text": src.glob, "jsonl": "**/*.jsonl", "parquet": "**/*.parquet"}[src.format]
    files = sorted((f for f in p.glob(pattern) if f.is_file()), key=str)
    if not files:
        raise UserError(f"data: no files matching {pattern} under {src.path}")
    return files


def fingerprint(files: list[AnyPath], sample: int = 1 << 16) -> str:
    """Identity of a source's content: each file's path, size, modification time, and a hash of its
    first and last 64 KiB (so an edit that keeps size and time still shows). Objects in a bucket
    are read the same way (two ranged reads each)."""
    h = hashlib.sha256()
    for f in files:
        size, mtime = stat(f)
        h.update(f"{f}\0{size}\0{mtime}\n".encode())
        with f.open("rb") as fh:
            h.update(fh.read(sample))
            if size > sample:
                fh.seek(max(sample, size - sample))
                h.update(fh.read(sample))
    return h.hexdigest()


def _decode(raw: bytes, report: SourceReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _note(lst: list[str], where: str) -> None:
    if len(lst) < FIRST_BAD:
        lst.append(where)


def _emit(name: str, text: Optional[str], report: SourceReport) -> Optional[Document]:
    if text is None or not text.strip():
        report.empty_skipped += 1
        return None
    report.documents += 1
    report.bytes += len(text)
    return Document(name, text)


def _iter_text(files: list[Path], report: SourceReport) -> Iterator[Document]:
    for f in files:
        doc = _emit(str(f), _decode(f.read_bytes(), report), report)
        if doc:
            yield doc


def _iter_jsonl(files: list[AnyPath], src: Source, report: SourceReport, fields_seen: set) -> Iterator[Document]:
    for f in files:
        with f.open("rb") as fh:  # streamed, from disk or a bucket
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                where = f"{f}:{lineno}"
                line = _decode(raw, report)
                try:
                    record = json.loads(line)
                except ValueError:
                    report.malformed_lines += 1
                    _note(report.first_malformed, where)
                    continue
                if not isinstance(record, dict):
                    report.malformed_lines += 1
                    _note(report.first_malformed, where)
                    continue
                fields_seen.update(record.keys())
                value = record.get(src.field)
                if not isinstance(value, str):
                    if value is None and src.field in record:
                        report.empty_skipped += 1
                        continue
                    report.missing_field += 1
                    _note(report.first_missing_field, where)
                    continue
                doc = _emit(where, value, report)
                if doc:
                    yield doc


def _iter_arrow_tables(files: list[Path], fmt: str) -> Iterator[tuple[Path, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        remote = is_remote(f)
        if fmt == "parquet":
            with (f.open("rb") if remote else open(f, "rb")) as fh:  # row groups read as needed
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024):
                    yield f, batch
        else:
            with (f.open("rb") if remote else pa.memory_map(str(f))) as source:
                reader = pa.ipc.open_stream(source)
                for batch in reader:
                    yield f, batch


def _iter_columnar(files: list[Path], src: Source, report: SourceReport) -> Iterator[Document]:
    row = 0
    last_file = None
    for f, batch in _iter_arrow_tables(files, src.format):
        if f != last_file:
            row, last_file = 0, f
        names = batch.schema.names
        if src.field not in names:
            raise UserError(f"data.field: column '{src.field}' is not in {f} (columns: {', '.join(names)})")
        for value in batch.column(names.index(src.field)).to_pylist():
            where = f"{f}#{row}"
            row += 1
            if isinstance(value, bytes):
                value = _decode(value, report)
            if value is not None and not isinstance(value, str):
                report.missing_field += 1
                _note(report.first_missing_field, where)
                continue
            doc = _emit(where, value, report)
            if doc:
                yield doc


def iter_documents(src: Source, report: SourceReport, *, max_bytes: int = 0) -> Iterator[Document]:
    """Documents of a source, stopping after `max_bytes` characters when it is non-zero."""
    files = source_files(src)
    report.files = len(files)
    fields_seen: set = set()
    if src.format in ("text", "stdlib"):
        docs = _iter_text(files, report)
    elif src.format == "jsonl":
        docs = _iter_jsonl(files, src, report, fields_seen)
    elif src.format in ("parquet", "hf"):
        docs = _iter_columnar(files, src, report)
    else:
        raise UserError(f"data: unknown format '{src.format}' (known: text, jsonl, parquet, hf)")
    total = 0
    for doc in docs:
        if max_bytes and total + len(doc.text) > max_bytes:
            if total == 0:
                yield Document(doc.name, doc.text[:max_bytes])
            return
        total += len(doc.text)
        yield doc
    if report.documents == 0 and report.missing_field > 0:
        seen = ", ".join(sorted(fields_seen)) or "none"
        raise UserError(f"data.field: no record in {src.path} has field '{src.field}' (fields seen: {seen})")
    if report.documents == 0:
        raise UserError(f"data: {src.label} holds no non-empty documents")
