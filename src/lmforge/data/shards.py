"""Token shards on disk: writing one shard, reading them back, checking them.

Layout under a prepared data directory::

    shards/<split>/<source>/shard_00000.bin      raw token ids (uint16 or uint32), memmap-able
    shards/<split>/<source>/shard_00000.idx.npy  int64 start offset of each document in the shard
    shards/<split>/<source>/shard_00000.done     written last: sha256 of the .bin and what it holds
    doc_hashes/<split>.txt                       sorted content hashes, for isolation checks
    manifest.json                                written last of all

Shards are planned from byte counts before tokenizing (a byte-level BPE token is at
least one byte, so bytes + 1 eos bound the tokens), which makes every shard an
independent task: shards can be written in parallel and a rerun skips finished ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_json, atomic_write_npy, read_json, sha256_file
from lmforge.data.image_records import text_for_tokenizer
from lmforge.data.tokenizer import Tokenizer

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def shard_stem(split: str, source: str, index: int) -> str:
    return f"shards/{split}/{source}/shard_{index:05d}"


def docs_digest(hashes: list[str]) -> str:
    """Identifies exactly which documents (in order) a shard holds."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


@dataclass
class ShardTask:
    """One shard to write: its documents (normalized text and content hash) and where it goes."""

    split: str
    source: str
    index: int
    texts: list[str]
    hashes: list[str]

    @property
    def stem(self) -> str:
        return shard_stem(self.split, self.source, self.index)

    @property
    def token_bound(self) -> int:
        return sum(len(t.encode("utf-8")) + 1 for t in self.texts)


def plan_shards(split: str, source: str, texts: list[str], hashes: list[str], shard_tokens: int) -> list[ShardTask]:
    """Group documents, in order, into shards whose token count cannot exceed ``shard_tokens``.

    Documents are never cut; one longer than ``shard_tokens`` bytes gets a shard of its own.
    """
    tasks: list[ShardTask] = []
    start, bound = 0, 0
    for i, text in enumerate(texts):
        doc_bound = len(text.encode("utf-8")) + 1
        if i > start and bound + doc_bound > shard_tokens:
            tasks.append(ShardTask(split, source, len(tasks), texts[start:i], hashes[start:i]))
            start, bound = i, 0
        bound += doc_bound
    if start < len(texts):
        tasks.append(ShardTask(split, source, len(tasks), texts[start:], hashes[start:]))
    return tasks


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int) -> Tokenizer:
    return Tokenizer.load(path)


def write_shard(task: ShardTask, data_dir: str, tokenizer_sha256: str) -> dict:
    """Tokenize the task's documents (each followed by eos) and write .bin, .idx.npy, then .done.

    Runs in a worker process; returns the completion record (also stored in the .done file).
    """
    data_dir_path = Path(data_dir)
    tok_path = data_dir_path / "tokenizer.json"
    tokenizer = _cached_tokenizer(str(tok_path), tok_path.stat().st_mtime_ns)
    if tokenizer.sha256 != tokenizer_sha256:
        raise DataError(f"{tok_path} changed while shards were being written")
    dtype = token_dtype(tokenizer.vocab_size)
    ids = tokenizer.encode_batch([text_for_tokenizer(t) for t in task.texts])  # image records: their captions
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    for start, doc_ids in zip(offsets, ids):
        tokens[start:start + len(doc_ids)] = doc_ids
        tokens[start + len(doc_ids)] = tokenizer.eos_id
    stem = data_dir_path / task.stem
    payload = tokens.tobytes()
    atomic_write(stem.with_suffix(".bin"), lambda tmp: tmp.write_bytes(payload))
    atomic_write_npy(stem.with_suffix(".idx.npy"), offsets)
    record = {
        "sha256": hashlib.sha256(payload).hexdigest(), "tokens": len(tokens), "documents": len(ids),
        "bytes": sum(len(text_for_tokenizer(t).encode("utf-8")) for t in task.texts),
        "docs_digest": docs_digest(task.hashes),
        "tokenizer_sha256": tokenizer_sha256, "dtype": dtype.name,
    }
    atomic_write_json(stem.with_suffix(".done"), record)
    return record


def finished_record(task: ShardTask, data_dir: Path, tokenizer_sha256: str) -> dict | None:
    """The .done record if this exact shard was already written intact, else None."""
    stem = data_dir / task.stem
    marker = stem.with_suffix(".done")
    if not marker.is_file() or not stem.with_suffix(".idx.npy").is_file():
        return None
    try:
        record = read_json(marker)
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("docs_digest") != docs_digest(task.hashes) or record.get("tokenizer_sha256") != tokenizer_sha256:
        return None
    bin_path = stem.with_suffix(".bin")
    if not bin_path.is_file() or sha256_file(bin_path) != record.get("sha256"):
        return None
    return record


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the data first (lmforge data prepare CONFIG)")
    try:
        manifest = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt manifest ({exc}); re-run data preparation") from exc
    missing = [k for k in ("sources", "tokenizer", "dtype") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DataError(f"{path}: corrupt manifest (missing {', '.join(missing)}); re-run data preparation")
    return manifest


def verify_shards(data_dir: str | Path) -> int:
    """Check every shard (and the tokenizer) against the manifest's sha256; return the shard count."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    tok_path = data_dir / "tokenizer.json"
    if not tok_path.is_file() or Tokenizer.load(tok_path).sha256 != manifest["tokenizer"]["sha256"]:
        raise DataError(f"{tok_path}: missing or does not match the manifest's tokenizer sha256")
    count = 0
    for source, splits in manifest["sources"].items():
        for split, info in splits.items():
            for shard in info["shards"]:
                path = data_dir / shard["path"]
                if not path.is_file():
                    raise DataError(f"shard {path} ({source}/{split}) is missing")
                if sha256_file(path) != shard["sha256"]:
                    raise DataError(f"shard {path} ({source}/{split}) is corrupt: sha256 does not match the manifest")
                count += 1
    return count


def read_doc_hashes(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} not found: the data directory is incomplete; re-run data preparation")
    return path.read_text().split()


def check_isolation(data_dir: str | Path) -> dict:
    """Compare held-out and training document hashes; any overlap means contaminated evaluation."""
    folder = Path(data_dir) / "doc_hashes"
    heldout = read_doc_hashes(folder / "heldout.txt")
    train = set(read_doc_hashes(folder / "train.txt"))
    overlapping = sorted(h for h in set(heldout) if h in train)
    return {"heldout_docs": len(heldout), "overlap": len(overlapping), "overlapping_hashes": overlapping[:10]}


class ShardSet:
    """All shards of one (split, source), read as one token sequence through np.memmap."""

    def __init__(self, data_dir: str | Path, split: str, source: str, manifest: dict | None = None):
        data_dir = Path(data_dir)
        manifest = manifest or load_manifest(data_dir)
        if source not in manifest["sources"]:
            raise DataError(f"{data_dir}: no source {source!r} (sources: {', '.join(manifest['sources'])})")
        info = manifest["sources"][source].get(split, {"shards": []})
        dtype = np.dtype(manifest["dtype"])
        self.split, self.source = split, source
        self.shards = [np.memmap(data_dir / s["path"], dtype=dtype, mode="r") for s in info["shards"]]
        sizes = [len(s) for s in self.shards]
        # starts[k] is the global position of shard k's first token.
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        offsets = [np.load(data_dir / s["path"].replace(".bin", ".idx.npy")) + self.starts[k]
                   for k, s in enumerate(info["shards"])]
        self.doc_offsets = np.concatenate(offsets).astype(np.int64) if offsets else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as one array, joining across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"{self.source}/{self.split}: range [{start}, {start + length}) outside [0, {len(self)})")
        pieces, position, end = [], start, start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while position < end:
            local = position - self.starts[shard]
            take = min(end - position, len(self.shards[shard]) - local)
            pieces.append(self.shards[shard][local:local + take])
            position += take
            shard += 1
        return np.concatenate(pieces) if pieces else np.zeros(0, self.shards[0].dtype if self.shards else np.uint16)
