"""Prompt documents for ``lmforge synth``: the real documents of a prepared data directory's
train split, decoded back to text (never the held-out split: a synthetic document written from
a held-out prompt would carry evaluation text into training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.core.errors import ConfigError
from lmforge.data.documents import content_hash
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.synth.config import PromptConfig


@dataclass(frozen=True)
class PromptDocument:
    doc_id: str          # "<source>/train/<index in the source's train split>"
    text: str
    sha256: str          # content hash of the text (the identity dedup and isolation use)


def prompt_documents(cfg: PromptConfig) -> list[PromptDocument]:
    """The train-split documents of ``cfg.data_dir`` (of ``cfg.sources``), in shard order."""
    data_dir = Path(cfg.data_dir or "")
    if not (data_dir / "manifest.json").is_file():
        raise ConfigError(f"prompts.data_dir: {data_dir} is not a prepared data directory (no manifest.json); "
                          "prepare it with `lmforge data prepare`")
    manifest = load_manifest(data_dir)
    names = list(manifest["sources"])
    unknown = [name for name in (cfg.sources or []) if name not in names]
    if unknown:
        raise ConfigError(f"prompts.sources: {unknown} are not sources of {data_dir} (sources: {', '.join(names)})")
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    documents: list[PromptDocument] = []
    for source in cfg.sources or names:
        stream = ShardSet(data_dir, "train", source, manifest)
        ends = np.append(stream.doc_offsets[1:], len(stream))
        for index, (start, end) in enumerate(zip(stream.doc_offsets, ends)):
            ids = [int(t) for t in stream.get(int(start), int(end - start)) if t != tokenizer.eos_id]
            text = tokenizer.decode(ids)
            documents.append(PromptDocument(f"{source}/train/{index}", text, content_hash(text)))
            if cfg.max_documents is not None and len(documents) >= cfg.max_documents:
                return documents
    if not documents:
        raise ConfigError(f"prompts.data_dir: {data_dir} has no training documents"
                          + (f" in sources {cfg.sources}" if cfg.sources else ""))
    return documents
