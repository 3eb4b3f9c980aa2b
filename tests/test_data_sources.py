"""Reading users' data: text folders, JSONL, Parquet, local Hugging Face datasets, limits, errors."""

from __future__ import annotations

import json
import logging

import pytest

from lmforge.core.errors import DataError
from lmforge.data.config import SourceConfig
from lmforge.data.sources import iter_documents


def _read(**kwargs):
    return list(iter_documents(SourceConfig(name="s", **kwargs)))


def test_text_folder_sorted_with_default_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.md").write_text("ay")
    (tmp_path / "skip.py").write_text("nope")
    docs = _read(kind="files", path=str(tmp_path))
    assert [(d.doc_id, d.text, d.source) for d in docs] == [("b.txt", "bee", "s"), ("sub/a.md", "ay", "s")]
    assert [d.doc_id for d in _read(kind="files", path=str(tmp_path), glob="*.py")] == ["skip.py"]


def test_limits_cut_a_deterministic_prefix(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text("x" * 100)
    assert len(_read(kind="files", path=str(tmp_path), max_documents=3)) == 3
    # The document crossing max_bytes is kept: 250 bytes -> 3 documents of 100.
    docs = _read(kind="files", path=str(tmp_path), max_bytes=250)
    assert [d.doc_id for d in docs] == ["0.txt", "1.txt", "2.txt"]


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    for kind in ("files", "jsonl", "parquet", "hf"):
        with pytest.raises(DataError, match="nowhere.* does not exist"):
            _read(kind=kind, path=missing)


def test_jsonl_bad_lines_skipped_and_counted(tmp_path, records):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"body": "one"}), "{broken", json.dumps({"other": 1}), "", json.dumps({"body": "two"})]
    path.write_text("\n".join(lines) + "\n")
    docs = _read(kind="jsonl", path=str(path), text_field="body")
    assert [(d.text, d.doc_id) for d in docs] == [("one", "data.jsonl:1"), ("two", "data.jsonl:5")]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("data.jsonl: skipped 2 bad line(s) (first: line 2: not valid JSON)" in w for w in warnings)


def test_jsonl_without_usable_documents_fails(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(DataError, match="empty.jsonl: no usable documents"):
        _read(kind="jsonl", path=str(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", None, "gamma"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    docs = _read(kind="parquet", path=str(tmp_path), text_field="content")
    assert [(d.text, d.doc_id) for d in docs] == [("alpha", "p.parquet:0"), ("gamma", "p.parquet:2")]
    with pytest.raises(DataError, match="no column 'text'"):
        _read(kind="parquet", path=str(tmp_path))


def test_local_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["first doc", "second doc"], "id": [1, 2]}).save_to_disk(tmp_path / "ds")
    docs = _read(kind="hf", path=str(tmp_path / "ds"))
    assert [d.text for d in docs] == ["first doc", "second doc"]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(tmp_path / "dd")
    assert [d.text for d in _read(kind="hf", path=str(tmp_path / "dd"), split="validation")] == ["v"]
    with pytest.raises(DataError, match="no split 'train'"):
        _read(kind="hf", path=str(tmp_path / "dd"))


def test_bad_inputs_are_counted_not_fatal(tmp_path, records):
    from lmforge.data.sources import InputProblems

    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    problems = InputProblems()
    docs = list(iter_documents(SourceConfig(name="s", kind="files", path=str(tmp_path)), problems))
    assert [d.doc_id for d in docs] == ["good.txt", "latin1.txt"]
    assert docs[1].text == "caf\ufffd cr\ufffdme"
    assert dict(problems.counts) == {"empty_file": 1, "invalid_utf8_replaced": 1}
    listed = {p["problem"]: p for p in problems.listed()}
    assert listed["empty_file"]["path"].endswith("empty.txt")
    assert listed["invalid_utf8_replaced"]["first"].startswith("byte 3")

    lines = tmp_path / "j"
    lines.mkdir()
    (lines / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": 5}\n{"txt": "x"}\nnot json\n{"text": "caf\xe9"}\n')
    (lines / "b.jsonl").write_text("\n\n")
    problems = InputProblems()
    docs = list(iter_documents(SourceConfig(name="s", kind="jsonl", path=str(lines)), problems))
    assert [d.text for d in docs] == ["ok"]
    assert dict(problems.counts) == {"missing_text_field": 2, "malformed_json_line": 1, "invalid_utf8_line": 1,
                                     "empty_file": 1}


def test_unreadable_parquet_is_skipped_and_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.sources import InputProblems

    pq.write_table(pa.table({"text": ["alpha"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not really parquet")
    problems = InputProblems()
    docs = list(iter_documents(SourceConfig(name="s", kind="parquet", path=str(tmp_path)), problems))
    assert [d.text for d in docs] == ["alpha"]
    assert dict(problems.counts) == {"unreadable_parquet": 1}
    assert problems.listed()[0]["path"].endswith("b.parquet")


def test_installed_packages_reads_code_without_caches_tests_or_huge_files(tmp_path):
    from lmforge.data import package_source
    from lmforge.data.sources import InputProblems, source_signature

    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "core.py").write_text("def f():\n    return 2\n")
    (tmp_path / "pkg" / "__pycache__" / "core.py").write_text("cached")
    (tmp_path / "pkg" / "tests" / "test_core.py").write_text("def test(): pass\n")
    (tmp_path / "pkg" / "table.py").write_text("#" * (package_source.MAX_FILE_BYTES + 1))
    (tmp_path / "README.txt").write_text("not code")
    source = SourceConfig(name="packages", kind="installed_packages", path=str(tmp_path))
    problems = InputProblems()
    docs = list(iter_documents(source, problems))
    assert [d.doc_id for d in docs] == ["pkg/__init__.py", "pkg/core.py"]
    assert problems.counts["file_too_large"] == 1
    assert source.resolved_content() == "code"
    before = source_signature(source)
    (tmp_path / "pkg" / "new.py").write_text("y = 3\n")
    assert source_signature(source) != before


def test_installed_packages_defaults_to_this_interpreter_and_names_a_bad_path(tmp_path):
    import sysconfig
    from pathlib import Path

    from lmforge.data.package_source import packages_root

    assert packages_root(SourceConfig(name="p", kind="installed_packages")) == Path(sysconfig.get_paths()["purelib"])
    with pytest.raises(DataError, match="'s': path .*missing.* is not a folder"):
        _read(kind="installed_packages", path=str(tmp_path / "missing"))
