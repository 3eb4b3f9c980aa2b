"""Configs for data preparation: which sources to read and how to split and tokenize them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lmforge.core.config import Config

SourceKind = Literal["demo_literature", "demo_code", "files", "jsonl", "parquet", "hf"]
_NEEDS_PATH = ("files", "jsonl", "parquet", "hf")
# Source names become directory names under shards/, so keep them path-safe.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
N_SPECIAL_TOKENS = 1  # "<|endoftext|>"


@dataclass
class SourceConfig(Config):
    name: str                      # domain name, e.g. "literature", "code"
    kind: SourceKind
    path: str | None = None        # folder/file for files/jsonl/parquet; dataset name or local path for hf
    text_field: str = "text"       # for jsonl/parquet/hf
    glob: str | None = None        # files: default "**/*.txt" and "**/*.md"
    split: str = "train"           # hf split
    max_documents: int | None = None
    max_bytes: int | None = None   # stop reading a source after this many bytes (keeps the demo fast)
    weight: float = 1.0            # mixture weight in the loader

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"source name {self.name!r} must be letters, digits, '_', '.', '-' "
                             "(it becomes a directory name)")
        if self.kind in _NEEDS_PATH and not self.path:
            raise ValueError(f"source {self.name!r} of kind {self.kind!r} needs a path")
        for key in ("max_documents", "max_bytes"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"source {self.name!r}: {key} must be positive, got {value}")
        if self.weight < 0:
            raise ValueError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")


@dataclass
class DataConfig(Config):
    sources: list[SourceConfig]
    out_dir: str = "data/demo"     # where prepared data goes (relative to cwd)
    vocab_size: int = 4096
    heldout_fraction: float = 0.05
    num_workers: int = 2           # parallel shard-writing processes
    shard_tokens: int = 4_000_000  # max tokens per shard file
    min_doc_chars: int = 1
    seed: int = 0                  # recorded; preparation itself is deterministic (split by hash)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        names = [s.name for s in self.sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(duplicated)}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        # Byte-level BPE starts from all 256 byte tokens plus the special tokens.
        minimum = 256 + N_SPECIAL_TOKENS
        if not minimum <= self.vocab_size < 2**32:
            raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + "
                             f"{N_SPECIAL_TOKENS} special) and below 2**32, got {self.vocab_size}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.min_doc_chars < 1:
            raise ValueError(f"min_doc_chars must be >= 1, got {self.min_doc_chars}")

    def fingerprint_dict(self) -> dict:
        """The part of the config that decides the prepared bytes.

        Worker count, output location and mixture weights change how or where data is
        prepared or how it is sampled later, not what is written, so they are left out:
        changing them must not force (or block) a re-prepare.
        """
        data = self.to_dict()
        for key in ("out_dir", "num_workers"):
            data.pop(key)
        for source in data["sources"]:
            source.pop("weight")
        return data
