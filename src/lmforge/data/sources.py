"""Read documents from a configured source: demo corpus, text files, JSONL, Parquet, HF datasets.

Every reader yields documents in a fixed order (sorted files, file order within a file),
so ``max_documents`` / ``max_bytes`` cut the same prefix on every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmforge.core.errors import DataError
from lmforge.core.logging import get_logger
from lmforge.data.config import SourceConfig
from lmforge.data.demo_corpus import iter_literature, iter_stdlib_code
from lmforge.data.documents import Document

log = get_logger(__name__)
DEFAULT_TEXT_GLOBS = ("**/*.txt", "**/*.md")


def iter_documents(source: SourceConfig) -> Iterator[Document]:
    """All documents of ``source``, cut to its max_documents / max_bytes."""
    readers = {
        "demo_literature": lambda: iter_literature(source.name),
        "demo_code": lambda: iter_stdlib_code(source.name),
        "files": lambda: _iter_text_files(source),
        "jsonl": lambda: _iter_jsonl(source),
        "parquet": lambda: _iter_parquet(source),
        "hf": lambda: _iter_hf(source),
    }
    yield from _limit(readers[source.kind](), source.max_documents, source.max_bytes)


def _limit(docs: Iterable[Document], max_documents: int | None, max_bytes: int | None) -> Iterator[Document]:
    # The document that crosses max_bytes is kept, so a small limit still yields something.
    n_docs, n_bytes = 0, 0
    for doc in docs:
        if max_documents is not None and n_docs >= max_documents:
            return
        if max_bytes is not None and n_bytes >= max_bytes:
            return
        yield doc
        n_docs += 1
        n_bytes += len(doc.text.encode("utf-8"))


def _existing(source: SourceConfig) -> Path:
    path = Path(source.path or "")
    if not source.path or not path.exists():
        raise DataError(f"source {source.name!r}: path {source.path!r} does not exist")
    return path


def _files(source: SourceConfig, patterns: tuple[str, ...]) -> tuple[Path, list[Path]]:
    """(root, sorted files): a single file is its own list; a folder is searched by pattern."""
    path = _existing(source)
    if path.is_file():
        return path.parent, [path]
    found = {p for pattern in patterns for p in path.glob(pattern) if p.is_file()}
    if not found:
        raise DataError(f"source {source.name!r}: no files matching {', '.join(patterns)} in {path}")
    return path, sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _decode(raw: bytes, where: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        log.warning("%s: not valid UTF-8 (%s); undecodable bytes replaced", where, exc.reason)
        return raw.decode("utf-8", errors="replace")


def _iter_text_files(source: SourceConfig) -> Iterator[Document]:
    root, files = _files(source, (source.glob,) if source.glob else DEFAULT_TEXT_GLOBS)
    for path in files:
        text = _decode(path.read_bytes(), path)
        yield Document(text=text, source=source.name, doc_id=path.relative_to(root).as_posix())


def _iter_jsonl(source: SourceConfig) -> Iterator[Document]:
    root, files = _files(source, ("**/*.jsonl",))
    field = source.text_field
    for path in files:
        usable, bad, first_bad = 0, 0, ""
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    text = record[field] if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise KeyError(field)
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
                    bad += 1
                    if not first_bad:
                        reason = "not valid JSON" if isinstance(exc, ValueError) else f"no string field {field!r}"
                        first_bad = f"line {line_no}: {reason}"
                    continue
                usable += 1
                yield Document(text=text, source=source.name, doc_id=f"{path.relative_to(root).as_posix()}:{line_no}")
        if bad:
            log.warning("%s: skipped %d bad line(s) (first: %s)", path, bad, first_bad)
        if usable == 0:
            raise DataError(f"{path}: no usable documents (every line lacked a string field {field!r} "
                            "or was not valid JSON)")


def _iter_parquet(source: SourceConfig) -> Iterator[Document]:
    import pyarrow.parquet as pq

    root, files = _files(source, ("**/*.parquet",))
    for path in files:
        parquet = pq.ParquetFile(path)
        if source.text_field not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {source.text_field!r} "
                            f"(columns: {', '.join(parquet.schema_arrow.names)})")
        row = 0
        for batch in parquet.iter_batches(columns=[source.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield Document(text=text, source=source.name, doc_id=f"{path.relative_to(root).as_posix()}:{row}")
                row += 1


def _load_hf(source: SourceConfig) -> Any:
    import datasets

    path = Path(source.path or "")
    # A dataset saved with save_to_disk is a folder of Arrow files plus this metadata;
    # load_dataset cannot read that layout, load_from_disk can.
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"{path}: no split {source.split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[source.split]
        return loaded
    if source.path and source.path.startswith((".", "/", "~")) and not path.expanduser().exists():
        raise DataError(f"source {source.name!r}: path {source.path!r} does not exist")
    try:
        # Streaming reads only as much as max_documents / max_bytes need.
        return datasets.load_dataset(source.path, split=source.split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(f"source {source.name!r}: could not load dataset {source.path!r} "
                        f"split {source.split!r}: {exc}") from exc


def _iter_hf(source: SourceConfig) -> Iterator[Document]:
    dataset = _load_hf(source)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and source.text_field not in columns:
        raise DataError(f"dataset {source.path!r}: no column {source.text_field!r} (columns: {', '.join(columns)})")
    for index, record in enumerate(dataset):
        text = record.get(source.text_field)
        if isinstance(text, str):
            yield Document(text=text, source=source.name, doc_id=f"{source.split}:{index}")
