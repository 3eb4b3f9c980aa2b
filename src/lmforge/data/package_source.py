"""The ``installed_packages`` source kind: the Python source of an environment's installed packages.

Every machine that installs lmforge holds a code corpus far larger than the demo's standard
library: the ``.py`` files of its installed packages (a few hundred MB with torch). It is the
natural large retrieval database for a model trained on the demo's code (RETRO asks what a small
model gains from a database it was not trained on). ``path`` is a site-packages folder (or any
folder of code); left out, it is the running interpreter's ``purelib``. One document per file,
in sorted order, ``doc_id`` its path relative to the folder; files over ``MAX_FILE_BYTES``
(generated tables, vendored bundles) are skipped and counted, like unreadable files.

Installed packages vendor copies of standard-library modules, so a database built from them is
decontaminated against held-out documents by the data pipeline's own steps (exact and near
dedup, 13-gram decontamination) when it is prepared as a source. The held-out documents of
another prepared data directory are an eval set of kind ``prepared_heldout`` (``path``: that
directory): its held-out shards decoded back to text, one document each, so that
``decontamination.eval_sets: [{name: demo_heldout, kind: prepared_heldout, path: data/demo,
role: heldout}]`` keeps every 13-gram of data/demo's held-out text out of the new data
(configs/retro_packages.yaml).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator

from lmforge.core.errors import DataError
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.config import SourceConfig
from lmforge.data.demo_corpus import python_files
from lmforge.data.documents import Document
from lmforge.data.sources import InputProblems, _decode, _hashed, _read_bytes, register_source_kind

MAX_FILE_BYTES = 500_000
# Bytecode caches and the tests folders many packages ship (not library code).
EXCLUDED_DIRS = {"__pycache__", "test", "tests"}


def packages_root(source: SourceConfig) -> Path:
    root = Path(source.path) if source.path else Path(sysconfig.get_paths()["purelib"])
    if not root.is_dir():
        raise DataError(f"source {source.name!r}: path {str(root)!r} is not a folder of installed packages")
    return root


def package_files(root: Path) -> list[Path]:
    """Every ``.py`` file below ``root``, sorted by relative path, without caches and test folders."""
    return python_files(root, EXCLUDED_DIRS)


def _signature(source: SourceConfig) -> str:
    root = packages_root(source)
    listing = []
    for path in package_files(root):
        stat = path.stat()
        listing.append(f"{path.relative_to(root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return _hashed(listing)


@register_source_kind("installed_packages", signature=_signature, needs_path=False)
def _iter_installed_packages(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    root = packages_root(source)
    files = package_files(root)
    if not files:
        raise DataError(f"source {source.name!r}: no .py files below {root}")
    for path in files:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            problems.add(path, "file_too_large", f"{size} bytes > {MAX_FILE_BYTES}")
            continue
        raw = _read_bytes(path, problems)
        if raw is None:
            continue
        yield Document(text=_decode(raw, path, problems), source=source.name,
                       doc_id=path.relative_to(root).as_posix())


def _prepared_heldout_signature(source: SourceConfig) -> str:
    data_dir = Path(source.path or "")
    manifest = load_manifest(data_dir)
    return _hashed([json.dumps(manifest["tokenizer"], sort_keys=True)] + [
        f"{name}:{shard['sha256']}" for name, info in sorted(manifest["sources"].items())
        for shard in info.get("heldout", {}).get("shards", [])])


@register_source_kind("prepared_heldout", signature=_prepared_heldout_signature)
def _iter_prepared_heldout(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    """The held-out documents of the prepared data directory ``path``, decoded from its shards.

    Byte-level BPE decodes exactly, so each document is the text that was held out (without
    its end-of-text token); ``doc_id`` is ``SOURCE:N``, the N-th held-out document of SOURCE.
    """
    data_dir = Path(source.path or "")
    manifest = load_manifest(data_dir)
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    for name in sorted(manifest["sources"]):
        if not manifest["sources"][name].get("heldout", {}).get("shards"):
            continue
        stream = ShardSet(data_dir, "heldout", name, manifest)
        bounds = [*stream.doc_offsets.tolist(), len(stream)]
        for j, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            text = tokenizer.decode(stream.get(start, stop - start))
            if text.strip():
                yield Document(text=text, source=source.name, doc_id=f"{name}:{j}")
