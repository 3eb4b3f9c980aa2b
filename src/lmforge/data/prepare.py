"""``prepare_data``: sources -> pipeline -> tokenizer -> shards + manifest, resumable.

Steps: read every source, normalize, exact dedup, split by content hash, train the
tokenizer on the training split, then tokenize and write shards per (source, split) in
worker processes. Reruns skip finished shards; a finished directory with the same
config is a no-op; a directory prepared from a different config is never mixed into.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json, atomic_write_text, read_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.data.config import DataConfig
from lmforge.data.documents import content_hash
from lmforge.data.pipeline import (
    SPLITS,
    PipelineStats,
    count_read,
    exact_dedup,
    normalize,
    split_by_hash,
)
from lmforge.data.shards import (
    MANIFEST,
    ShardTask,
    check_isolation,
    finished_record,
    load_manifest,
    plan_shards,
    token_dtype,
    write_shard,
)
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import Tokenizer

log = get_logger(__name__)
FORMAT_VERSION = 1
FINGERPRINT_FILE = "prepare_config.json"
# Everything prepare writes; overwrite removes exactly these and nothing else in out_dir.
OWNED = (MANIFEST, FINGERPRINT_FILE, "tokenizer.json", "tokenizer.done", "shards", "doc_hashes")

_SHARD_FILE = re.compile(r"^(shard_\d{5})\.(bin|idx\.npy|done)$")
# (source, split) -> (normalized texts, content hashes), in reading order
Corpus = dict[tuple[str, str], tuple[list[str], list[str]]]


def fingerprint(cfg: DataConfig) -> str:
    body = json.dumps({"format": FORMAT_VERSION, **cfg.fingerprint_dict()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def prepare_data(cfg: DataConfig, overwrite: bool = False) -> dict:
    """Prepare ``cfg.out_dir`` and return its manifest (see shards.py for the layout)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Ranks or parallel runs preparing the same directory take turns; later ones no-op.
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(cfg, out, overwrite)


def _prepare_locked(cfg: DataConfig, out: Path, overwrite: bool) -> dict:
    started = time.perf_counter()
    fp = fingerprint(cfg)
    finished = _finished_manifest(out, fp)
    if finished is not None and not overwrite:
        log.info("%s is already prepared with this config (tokenizer %s): nothing to do",
                 out, finished["tokenizer"]["sha256"][:12])
        return finished
    _claim(out, fp, cfg, overwrite)

    stats = PipelineStats()
    corpus = _read_corpus(cfg, stats)
    _write_doc_hashes(out, corpus)
    isolation = check_isolation(out)
    if isolation["overlap"]:
        raise DataError(f"{out}: {isolation['overlap']} held-out documents also appear in the training split "
                        f"(e.g. {isolation['overlapping_hashes'][:3]})")
    read_s = time.perf_counter() - started

    tokenizer = _tokenizer(cfg, out, corpus)
    tok_s = time.perf_counter() - started - read_s
    records = _write_shards(cfg, out, corpus, tokenizer)
    manifest = _manifest(cfg, fp, tokenizer, corpus, records, stats, isolation)
    atomic_write_json(out / MANIFEST, manifest)
    total = time.perf_counter() - started
    _log_summary(manifest, total, read_s, tok_s, total - read_s - tok_s)
    return manifest


def _finished_manifest(out: Path, fp: str) -> dict | None:
    """The existing manifest if it matches this config and its files are all present."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = load_manifest(out)
        if manifest.get("fingerprint") != fp:
            return None
        if Tokenizer.load(out / "tokenizer.json").sha256 != manifest["tokenizer"]["sha256"]:
            return None
    except DataError:
        return None
    itemsize = token_dtype(manifest["tokenizer"]["vocab_size"]).itemsize
    for splits in manifest["sources"].values():
        for info in splits.values():
            for shard in info["shards"]:
                path = out / shard["path"]
                if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                    return None
    return manifest


def _claim(out: Path, fp: str, cfg: DataConfig, overwrite: bool) -> None:
    """Make ``out`` ours for this config: refuse (or, with overwrite, clear) other prepared data."""
    marker = out / FINGERPRINT_FILE
    previous = None
    if marker.is_file():
        try:
            previous = read_json(marker).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            previous = "unreadable"
    foreign = previous is None and any((out / name).exists() for name in OWNED)
    if (previous not in (None, fp) or foreign) and not overwrite:
        raise DataError(f"{out} holds data prepared from a different config; choose another out_dir "
                        "or pass overwrite=True (CLI: --overwrite) to replace it")
    if overwrite or previous != fp:
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    atomic_write_json(marker, {"fingerprint": fp, "format": FORMAT_VERSION, "config": cfg.fingerprint_dict()})


def _read_corpus(cfg: DataConfig, stats: PipelineStats) -> Corpus:
    corpus: Corpus = {(s.name, split): ([], []) for s in cfg.sources for split in SPLITS}

    def read_all():
        for source in cfg.sources:
            yield from iter_documents(source)

    docs = count_read(read_all(), stats)
    docs = exact_dedup(normalize(docs, min_doc_chars=cfg.min_doc_chars, stats=stats), stats=stats)
    with RateProgress("reading documents", total=None, unit="documents") as bar:
        for doc in docs:
            digest = content_hash(doc.text)
            split = split_by_hash(doc, cfg.heldout_fraction, digest=digest)
            texts, hashes = corpus[(doc.source, split)]
            texts.append(doc.text)
            hashes.append(digest)
            getattr(stats, f"{split}_docs")[doc.source] += 1
            bar.advance(1)
    for source in cfg.sources:
        if stats.read[source.name] == 0:
            raise DataError(f"source {source.name!r} ({source.kind}, path {source.path!r}) yielded no documents")
    return corpus


def _write_doc_hashes(out: Path, corpus: Corpus) -> None:
    for split in SPLITS:
        hashes = sorted(h for (_, s), (_, hs) in corpus.items() if s == split for h in hs)
        atomic_write_text(out / "doc_hashes" / f"{split}.txt", "".join(h + "\n" for h in hashes))


def _tokenizer(cfg: DataConfig, out: Path, corpus: Corpus) -> Tokenizer:
    """Train on the training split only; reuse the one from an interrupted run on the same data."""
    train_hashes = [h for s in cfg.sources for h in corpus[(s.name, "train")][1]]
    if not train_hashes:
        raise DataError("the training split is empty: nothing to train the tokenizer on")
    wanted = {"train_digest": hashlib.sha256("\n".join(train_hashes).encode()).hexdigest(),
              "vocab_size": cfg.vocab_size}
    path, marker = out / "tokenizer.json", out / "tokenizer.done"
    if path.is_file() and marker.is_file():
        try:
            done = read_json(marker)
            tokenizer = Tokenizer.load(path)
            if done == {**wanted, "sha256": tokenizer.sha256}:
                log.info("reusing the tokenizer trained by an earlier, interrupted run")
                return tokenizer
        except (DataError, OSError, json.JSONDecodeError):
            pass
    start = time.perf_counter()
    texts = (t for s in cfg.sources for t in corpus[(s.name, "train")][0])
    tokenizer = Tokenizer.train(texts, cfg.vocab_size, length=len(train_hashes))
    tokenizer.save(path)
    atomic_write_json(marker, {**wanted, "sha256": tokenizer.sha256})
    log.info("trained a %d-token byte-level BPE tokenizer on %d training documents in %.1f s",
             tokenizer.vocab_size, len(train_hashes), time.perf_counter() - start)
    return tokenizer


def _write_shards(cfg: DataConfig, out: Path, corpus: Corpus, tokenizer: Tokenizer) -> dict[str, dict]:
    """Write every planned shard not already finished; return {shard stem: completion record}."""
    tasks = [task for (source, split), (texts, hashes) in corpus.items()
             for task in plan_shards(split, source, texts, hashes, cfg.shard_tokens)]
    _remove_stale_shards(out, tasks)
    records: dict[str, dict] = {}
    pending: list[ShardTask] = []
    for task in tasks:
        record = finished_record(task, out, tokenizer.sha256)
        if record is None:
            pending.append(task)
        else:
            records[task.stem] = record
    if records:
        log.info("skipped %d finished shards", len(records))
    pending.sort(key=lambda t: -t.token_bound)  # largest first balances the workers
    with RateProgress("writing shards", total=len(pending), unit="tokens") as bar:
        if cfg.num_workers == 1 or len(pending) <= 1:
            for task in pending:
                records[task.stem] = write_shard(task, str(out), tokenizer.sha256)
                bar.advance(1, records[task.stem]["tokens"])
        else:
            # spawn, not fork: the parent has live tokenizer (and maybe torch) threads.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(cfg.num_workers, len(pending)), mp_context=context) as pool:
                futures = {pool.submit(write_shard, task, str(out), tokenizer.sha256): task for task in pending}
                for future in as_completed(futures):
                    records[futures[future].stem] = future.result()
                    bar.advance(1, records[futures[future].stem]["tokens"])
    return records


def _remove_stale_shards(out: Path, tasks: list[ShardTask]) -> None:
    """Drop shard files (and crash leftovers) beyond this plan, so nothing unlisted lingers."""
    planned = {task.stem for task in tasks}
    root = out / "shards"
    for path in root.glob("*/*/*") if root.is_dir() else []:
        match = _SHARD_FILE.match(path.name)
        stem = f"{path.parent.relative_to(out).as_posix()}/{match.group(1)}" if match else None
        if (path.name.startswith(".") and path.name.endswith(".tmp")) or (stem and stem not in planned):
            path.unlink()


def _manifest(cfg: DataConfig, fp: str, tokenizer: Tokenizer, corpus: Corpus, records: dict[str, dict],
              stats: PipelineStats, isolation: dict) -> dict:
    sources: dict[str, dict] = {}
    totals = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    for source in cfg.sources:
        sources[source.name] = {}
        for split in SPLITS:
            texts, hashes = corpus[(source.name, split)]
            shards = []
            for task in plan_shards(split, source.name, texts, hashes, cfg.shard_tokens):
                r = records[task.stem]
                shards.append({"path": task.stem + ".bin", "sha256": r["sha256"], "tokens": r["tokens"],
                               "documents": r["documents"], "bytes": r["bytes"]})
            info = {key: sum(s[key] for s in shards) for key in ("documents", "tokens", "bytes")}
            sources[source.name][split] = {**info, "shards": shards}
            for key in info:
                totals[split][key] += info[key]
    pipeline = stats.by_source()
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "tokenizer": {"path": "tokenizer.json", "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "sources": sources,
        "pipeline": pipeline,
        "isolation": isolation,
        "totals": {**totals,
                   "documents_read": sum(p["read"] for p in pipeline.values()),
                   "removed_empty": sum(p["removed_empty"] for p in pipeline.values()),
                   "removed_duplicates": sum(p["removed_duplicates"] for p in pipeline.values()),
                   "tokens": sum(t["tokens"] for t in totals.values()),
                   "bytes": sum(t["bytes"] for t in totals.values())},
        "config": cfg.to_dict(),
    }


def _log_summary(manifest: dict, total_s: float, read_s: float, tok_s: float, shard_s: float) -> None:
    for name, splits in manifest["sources"].items():
        p = manifest["pipeline"][name]
        log.info("%s: %d read, %d empty, %d duplicates removed; train %d docs / %d tokens, "
                 "held-out %d docs / %d tokens", name, p["read"], p["removed_empty"], p["removed_duplicates"],
                 splits["train"]["documents"], splits["train"]["tokens"],
                 splits["heldout"]["documents"], splits["heldout"]["tokens"])
    log.info("prepared %d tokens in %.1f s (read+pipeline %.1f s, tokenizer %.1f s, shards %.1f s)",
             manifest["totals"]["tokens"], total_s, read_s, tok_s, shard_s)
