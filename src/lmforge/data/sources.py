"""Read documents from a configured source: demo corpus, text files, JSONL, Parquet, HF datasets,
synthetic key-value recall documents.

Every reader yields documents in a fixed order (sorted files, file order within a file),
so ``max_documents`` / ``max_bytes`` cut the same prefix on every run.

Bad input never surfaces as a deep traceback: a missing path, a missing column or a file
with no usable line is a :class:`DataError` naming the file; an empty file, undecodable
bytes, a malformed JSON line, a record without the text field or an unreadable file is
skipped (or, for bytes, replaced) and counted in :class:`InputProblems`, which prepare
writes into the manifest.

``SourceConfig.kind`` names a :class:`SourceKind` in :data:`SOURCE_KINDS`; a new kind is one
reader function decorated with :func:`register_source_kind`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lmforge.core.errors import DataError
from lmforge.core.logging import get_logger
from lmforge.core.registry import Registry
from lmforge.data import kv_recall
from lmforge.data.config import SourceConfig
from lmforge.data.demo_corpus import SHAKESPEARE_SHA256, iter_literature, iter_stdlib_code, stdlib_files
from lmforge.data.documents import Document

log = get_logger(__name__)
DEFAULT_TEXT_GLOBS = ("**/*.txt", "**/*.md")
MAX_LISTED_PROBLEMS = 50  # files named in the manifest per source; the counts cover all


@dataclass
class InputProblems:
    """Input that was skipped or repaired while reading, counted by kind and by file."""

    counts: Counter = field(default_factory=Counter)            # kind -> occurrences
    by_file: dict[tuple[str, str], dict] = field(default_factory=dict)

    def add(self, path: Path | str, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        entry = self.by_file.setdefault((str(path), kind), {"path": str(path), "problem": kind, "count": 0,
                                                            "first": detail})
        entry["count"] += 1

    def listed(self) -> list[dict]:
        return [self.by_file[k] for k in sorted(self.by_file)][:MAX_LISTED_PROBLEMS]

    def describe(self) -> str:
        return ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(self.counts.items())) or "none"


Reader = Callable[[SourceConfig, InputProblems], Iterable[Document]]


@dataclass(frozen=True)
class SourceKind:
    """How to read one kind of source, and how to tell that its input changed."""

    name: str
    read: Reader                                       # documents in a fixed order
    # What the input looks like on disk (files, sizes, mtimes), hashed; None when unknowable
    # (a remote dataset), and then the source is read again on every run.
    signature: Callable[[SourceConfig], str | None]
    needs_path: bool = True                            # SourceConfig.path must be set


SOURCE_KINDS: Registry[SourceKind] = Registry("source kind")


def register_source_kind(name: str, signature: Callable[[SourceConfig], str | None],
                         needs_path: bool = True) -> Callable[[Reader], Reader]:
    """Decorator: make a reader available as ``kind: name`` in a source config."""
    def decorator(read: Reader) -> Reader:
        SOURCE_KINDS.register(name)(SourceKind(name, read, signature, needs_path))
        return read

    return decorator


def iter_documents(source: SourceConfig, problems: InputProblems | None = None) -> Iterator[Document]:
    """All documents of ``source``, cut to its max_documents / max_bytes.

    Skipped or repaired input is counted in ``problems`` (and logged as a warning).
    """
    problems = problems if problems is not None else InputProblems()
    yield from _limit(_kind(source).read(source, problems), source.max_documents, source.max_bytes)


def source_signature(source: SourceConfig) -> str | None:
    """What the source's input looks like on disk (files, sizes, mtimes), or None if unknowable.

    Lets a rerun skip re-reading a source whose files did not change.
    """
    return _kind(source).signature(source)


def _kind(source: SourceConfig) -> SourceKind:
    return SOURCE_KINDS.get(source.kind, key=f"source {source.name!r}: kind")


def _hashed(listing: list[str]) -> str:
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def _files_signature(patterns: Callable[[SourceConfig], tuple[str, ...]]) -> Callable[[SourceConfig], str]:
    """The signature of a source read from the files that ``patterns`` pick."""
    def signature(source: SourceConfig) -> str:
        root, files = _files(source, patterns(source))
        return _hashed([f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])

    return signature


def _demo_code_signature(source: SourceConfig) -> str:
    files = stdlib_files()
    return _hashed([sys.version] + [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])


def _hf_signature(source: SourceConfig) -> str | None:
    path = Path(source.path or "")
    if not path.is_dir():
        return None
    return _hashed([f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                    for p in sorted(path.rglob("*")) if p.is_file()])


def _text_patterns(source: SourceConfig) -> tuple[str, ...]:
    return (source.glob,) if source.glob else DEFAULT_TEXT_GLOBS


@register_source_kind("demo_literature", signature=lambda source: SHAKESPEARE_SHA256, needs_path=False)
def _iter_demo_literature(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    return iter_literature(source.name)


@register_source_kind("demo_code", signature=_demo_code_signature, needs_path=False)
def _iter_demo_code(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    return iter_stdlib_code(source.name)


def _kv_recall_signature(source: SourceConfig) -> str:
    # The documents are a function of the settings alone (and of the generator's code).
    settings = source.kv_recall.to_dict() if source.kv_recall is not None else {}
    return _hashed(["kv_recall", json.dumps(settings, sort_keys=True), kv_recall.GENERATOR_VERSION])


@register_source_kind("kv_recall", signature=_kv_recall_signature, needs_path=False)
def _iter_kv_recall(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    """Synthetic key-value recall documents (lmforge/data/kv_recall.py), training keys only."""
    assert source.kv_recall is not None  # SourceConfig fills in the defaults
    return kv_recall.recall_documents(source.kv_recall, source.name)


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


def _decode(raw: bytes, where: Path, problems: InputProblems | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        log.warning("%s: not valid UTF-8 (%s at byte %d); undecodable bytes replaced", where, exc.reason, exc.start)
        if problems is not None:
            problems.add(where, "invalid_utf8_replaced", f"byte {exc.start}: {exc.reason}")
        return raw.decode("utf-8", errors="replace")


def _read_bytes(path: Path, problems: InputProblems) -> bytes | None:
    """The file's bytes, or None (counted) when it cannot be read or is empty."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        log.warning("%s: cannot be read (%s); skipped", path, exc.strerror or exc)
        problems.add(path, "unreadable_file", str(exc.strerror or exc))
        return None
    if not raw.strip():
        log.warning("%s: empty file; skipped", path)
        problems.add(path, "empty_file")
        return None
    return raw


@register_source_kind("files", signature=_files_signature(_text_patterns))
def _iter_text_files(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    root, files = _files(source, _text_patterns(source))
    for path in files:
        raw = _read_bytes(path, problems)
        if raw is None:
            continue
        text = _decode(raw, path, problems)
        yield Document(text=text, source=source.name, doc_id=path.relative_to(root).as_posix())


@register_source_kind("jsonl", signature=_files_signature(lambda source: ("**/*.jsonl",)))
def _iter_jsonl(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    root, files = _files(source, ("**/*.jsonl",))
    for path in files:
        try:
            with open(path, "rb") as handle:
                yield from _jsonl_file(handle, path, root, source, problems)
        except OSError as exc:
            log.warning("%s: cannot be read (%s); skipped", path, exc.strerror or exc)
            problems.add(path, "unreadable_file", str(exc.strerror or exc))


def _jsonl_file(handle: Any, path: Path, root: Path, source: SourceConfig,
                problems: InputProblems) -> Iterator[Document]:
    field = source.text_field
    usable, bad, first_bad = 0, 0, ""
    for line_no, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        kind, detail, why = "", "", ""
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as exc:
            kind, detail = "invalid_utf8_line", f"line {line_no}: not valid UTF-8 ({exc.reason})"
        except json.JSONDecodeError as exc:
            kind, detail, why = "malformed_json_line", f"line {line_no}: not valid JSON", f" ({exc.msg})"
        else:
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                kind, detail = "missing_text_field", f"line {line_no}: no string field {field!r}"
        if kind:
            bad += 1
            first_bad = first_bad or detail
            problems.add(path, kind, detail + why)
            continue
        usable += 1
        yield Document(text=text, source=source.name, doc_id=f"{path.relative_to(root).as_posix()}:{line_no}")
    if bad:
        log.warning("%s: skipped %d bad line(s) (first: %s)", path, bad, first_bad)
    if usable == 0 and bad == 0:
        log.warning("%s: empty file; skipped", path)
        problems.add(path, "empty_file")
    elif usable == 0:
        raise DataError(f"{path}: no usable documents (every line lacked a string field {field!r} "
                        f"or was not valid JSON; first: {first_bad})")


@register_source_kind("parquet", signature=_files_signature(lambda source: ("**/*.parquet",)))
def _iter_parquet(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, files = _files(source, ("**/*.parquet",))
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
        except (OSError, pa.ArrowException) as exc:
            log.warning("%s: not a readable Parquet file (%s); skipped", path, exc)
            problems.add(path, "unreadable_parquet", str(exc)[:200])
            continue
        if source.text_field not in names:
            raise DataError(f"{path}: no column {source.text_field!r} (columns: {', '.join(names)})")
        row, skipped = 0, 0
        try:
            for batch in parquet.iter_batches(columns=[source.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if isinstance(text, str):
                        yield Document(text=text, source=source.name,
                                       doc_id=f"{path.relative_to(root).as_posix()}:{row}")
                    else:
                        skipped += 1
                        problems.add(path, "missing_text_field", f"row {row}: {source.text_field!r} is not a string")
                    row += 1
        except (OSError, pa.ArrowException) as exc:
            log.warning("%s: unreadable after row %d (%s); rest of the file skipped", path, row, exc)
            problems.add(path, "unreadable_parquet", f"after row {row}: {str(exc)[:200]}")
        if skipped:
            log.warning("%s: skipped %d row(s) without a string %r", path, skipped, source.text_field)


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


@register_source_kind("hf", signature=_hf_signature)
def _iter_hf(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    dataset = _load_hf(source)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and source.text_field not in columns:
        raise DataError(f"dataset {source.path!r}: no column {source.text_field!r} (columns: {', '.join(columns)})")
    for index, record in enumerate(dataset):
        text = record.get(source.text_field)
        if isinstance(text, str):
            yield Document(text=text, source=source.name, doc_id=f"{source.split}:{index}")
        else:
            problems.add(f"{source.path}:{source.split}", "missing_text_field",
                         f"record {index}: {source.text_field!r} is not a string")


# The image source kinds (image_folder, image_parquet, image_hf, demo_digits) register themselves.
from lmforge.data import images as _image_kinds  # noqa: E402,F401
# The installed-packages code corpus (a large retrieval database) registers itself.
from lmforge.data import package_source as _package_kind  # noqa: E402,F401
