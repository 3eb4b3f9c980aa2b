"""Bad input through prepare: counted skips named in the manifest, or one clear error."""

from __future__ import annotations

import json

import pytest

from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data


def _cfg(tmp_path, path, kind="jsonl", **source):
    return DataConfig.from_dict({"out_dir": str(tmp_path / "data"), "vocab_size": 300, "num_workers": 1,
                                 "heldout_fraction": 0.3,
                                 "sources": [{"name": "s", "kind": kind, "path": str(path), **source}]})


def test_skips_are_named_in_the_manifest(tmp_path, tiny_corpus):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [json.dumps({"text": (tiny_corpus / "prose" / f"doc_{i:03d}.txt").read_text()}) for i in range(12)]
    (folder / "good.jsonl").write_text("\n".join(good) + "\n{oops\n" + json.dumps({"body": "x"}) + "\n")
    (folder / "empty.jsonl").write_text("")
    manifest = prepare_data(_cfg(tmp_path, folder))
    assert manifest["pipeline"]["s"]["input_problems"] == {"empty_file": 1, "malformed_json_line": 1,
                                                           "missing_text_field": 1}
    named = {(p["path"].rsplit("/", 1)[-1], p["problem"]): p for p in manifest["input_problems"]["s"]}
    assert named[("good.jsonl", "malformed_json_line")]["first"].startswith("line 13: not valid JSON")
    assert named[("good.jsonl", "missing_text_field")]["count"] == 1
    assert ("empty.jsonl", "empty_file") in named
    assert manifest["pipeline"]["s"]["read"] == 12


@pytest.mark.parametrize("make, kind, message", [
    (lambda p: p.write_text(""), "jsonl", r"yielded no documents \(input problems: 1 empty file\)"),
    (lambda p: p.write_text(json.dumps({"title": "x"}) + "\n"), "jsonl", "no usable documents"),
    (lambda p: p.write_bytes(b"garbage"), "parquet", r"yielded no documents \(input problems: 1 unreadable parquet\)"),
])
def test_nothing_usable_is_one_clear_error(tmp_path, make, kind, message):
    path = tmp_path / f"only.{kind}"
    make(path)
    with pytest.raises(DataError, match=message):
        prepare_data(_cfg(tmp_path, path, kind=kind))
