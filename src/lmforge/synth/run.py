"""``generate_synthetic``: a teacher writes documents into shards, resumably.

The work is a fixed list of items, (prompt document, generation index) or for unconditional
sampling (none, index), cut into shards of ``docs_per_shard`` items. Each shard is generated
with its own seed (``sampling.seed`` and the shard index), written whole (temporary file,
fsync, rename) and then marked done with its checksum (``shard_NNNNN.done``, datatrove-style).
A rerun skips every shard whose marker holds the current key, and regenerates the others from
scratch, so a run killed at any point and rerun ends with each document exactly once, the same
documents as an uninterrupted run. ``synth.json`` is written last, when every shard is done.

Output folder::

    synth_config.json         the config, its fingerprint and the teacher's identity
    shards/shard_NNNNN.jsonl  one record a document: id, text, teacher, sampling, mode,
                              prompt_document_id, prompt_sha256, generation_index, tokens, finish
    shards/shard_NNNNN.done   sha256 of the shard, documents, tokens, seconds
    synth.json                summary (complete: true), tokens/s

Read back as a data source with ``kind: synthetic, path: <out_dir>`` (data/sources.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json, atomic_write_text, read_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.core.run_lock import RunLock
from lmforge.data.sources import SYNTH_CONFIG, SYNTH_SHARDS, SYNTH_SUMMARY, finished_synthetic_shard
from lmforge.synth.config import SynthConfig
from lmforge.synth.prompts import PromptDocument, prompt_documents
from lmforge.synth.teachers import Teacher, load_teacher

log = get_logger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WorkItem:
    prompt: PromptDocument | None     # None: unconditional
    generation_index: int


def work_items(cfg: SynthConfig) -> list[WorkItem]:
    if cfg.mode == "unconditional":
        assert cfg.documents is not None
        return [WorkItem(None, index) for index in range(cfg.documents)]
    return [WorkItem(doc, g) for doc in prompt_documents(cfg.prompts) for g in range(cfg.samples_per_prompt)]


def fingerprint(cfg: SynthConfig, teacher: dict[str, Any]) -> str:
    body = {"format": FORMAT_VERSION, "config": cfg.fingerprint_dict(), "teacher": teacher}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def claim_folder(out: Path, cfg: SynthConfig, teacher: dict[str, Any], fp: str, overwrite: bool = False) -> None:
    """Make ``out`` this config's folder: refuse (or with overwrite clear) another config's output."""
    marker = out / SYNTH_CONFIG
    if marker.is_file():
        previous = read_json(marker).get("fingerprint")
        if previous != fp:
            if not overwrite:
                raise DataError(f"{out} holds synthetic documents from a different synth config or teacher; "
                                "choose another out_dir or pass --overwrite to replace them")
            shutil.rmtree(out / SYNTH_SHARDS, ignore_errors=True)
            (out / SYNTH_SUMMARY).unlink(missing_ok=True)
    elif (out / SYNTH_SHARDS).exists():
        raise DataError(f"{out}: has a {SYNTH_SHARDS}/ folder but no {SYNTH_CONFIG}: not an lmforge synth folder")
    atomic_write_json(marker, {"fingerprint": fp, "format": FORMAT_VERSION, "config": cfg.to_dict(),
                               "teacher_identity": teacher})


def _prompt_ids(teacher: Teacher, cfg: SynthConfig, item: WorkItem) -> list[int] | None:
    """The prompt's teacher token ids; None when the document is too short to continue."""
    if item.prompt is None:
        return []
    if cfg.mode == "rephrase":
        return teacher.rephrase_prompt(cfg.prompts.template.format(document=item.prompt.text[:cfg.prompts.rephrase_chars]))
    ids = teacher.encode(item.prompt.text)
    return ids[:cfg.prompts.prompt_tokens] if len(ids) > cfg.prompts.prompt_tokens else None


def _records(teacher: Teacher, cfg: SynthConfig, shard: int, items: list[WorkItem],
             progress: RateProgress) -> tuple[list[dict], dict[str, int]]:
    """Generate one shard's documents, batch by batch."""
    records: list[dict] = []
    dropped = {"prompt_too_short": 0, "generation_too_short": 0}
    sampling = cfg.sampling.to_dict()
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start:start + cfg.batch_size]
        prompts = [(position, item, _prompt_ids(teacher, cfg, item)) for position, item in enumerate(batch, start)]
        dropped["prompt_too_short"] += sum(ids is None for _, _, ids in prompts)
        prompts = [(position, item, ids) for position, item, ids in prompts if ids is not None]
        if not prompts:
            progress.advance(len(batch), 0)
            continue
        seed = cfg.sampling.seed * 1_000_003 + shard * 10_007 + start
        outputs = teacher.generate([ids for _, _, ids in prompts], cfg.sampling, seed)
        for (position, item, ids), out in zip(prompts, outputs):
            if len(out.ids) < cfg.min_new_tokens:
                dropped["generation_too_short"] += 1
                continue
            text = teacher.decode(ids + out.ids if cfg.include_prompt else out.ids)
            records.append({
                "id": f"synth-{shard:05d}-{position:05d}", "text": text, "teacher": teacher.identity,
                "sampling": sampling, "mode": cfg.mode,
                "prompt_document_id": item.prompt.doc_id if item.prompt else None,
                "prompt_sha256": item.prompt.sha256 if item.prompt else None,
                "generation_index": item.generation_index, "prompt_tokens": len(ids),
                "generated_tokens": len(out.ids), "finish": out.finish})
        progress.advance(len(batch), sum(len(o.ids) for o in outputs))
    return records, dropped


def write_synthetic_shard(path: Path, docs: list[dict], key: str, dropped: dict[str, int] | None = None,
                          seconds: float = 0.0) -> dict:
    """Write one shard's records whole, then its completion marker; return the marker's record."""
    text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    atomic_write_text(path, text)
    record = {"key": key, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "documents": len(docs),
              "generated_tokens": sum(int(d.get("generated_tokens", 0)) for d in docs),
              "dropped": dropped or {}, "seconds": round(seconds, 3)}
    atomic_write_json(path.with_suffix(".done"), record)
    return record


def generate_synthetic(cfg: SynthConfig, overwrite: bool = False) -> dict:
    """Write (or finish writing) ``cfg.out_dir``; return the summary (``synth.json``)."""
    started = time.perf_counter()
    out = Path(cfg.out_dir)
    # One writer per synth folder; `data prepare` of a `kind: synthetic` source refuses the folder
    # while this lock is held (its shard list would change under the preparation).
    with RunLock(out, purpose="lmforge synth"):
        return _generate_locked(cfg, out, overwrite, started)


def _generate_locked(cfg: SynthConfig, out: Path, overwrite: bool, started: float) -> dict:
    teacher = load_teacher(cfg.teacher)
    fp = fingerprint(cfg, teacher.identity)
    claim_folder(out, cfg, teacher.identity, fp, overwrite)
    items = work_items(cfg)
    shards = [items[i:i + cfg.docs_per_shard] for i in range(0, len(items), cfg.docs_per_shard)]
    folder = out / SYNTH_SHARDS
    folder.mkdir(exist_ok=True)
    totals = {"documents": 0, "generated_tokens": 0, "dropped": {}, "skipped_finished_shards": 0}
    new_tokens, new_seconds = 0, 0.0
    with RateProgress("synth", total=len(items), unit="tokens") as progress:
        for index, shard_items in enumerate(shards):
            path = folder / f"shard_{index:05d}.jsonl"
            marker = path.with_suffix(".done")
            key = hashlib.sha256(json.dumps([fp, index, len(shard_items)]).encode()).hexdigest()
            record = finished_synthetic_shard(path, marker)
            if record is None or record.get("key") != key:
                begin = time.perf_counter()
                marker.unlink(missing_ok=True)  # the shard is rewritten: its old marker no longer holds
                docs, dropped = _records(teacher, cfg, index, shard_items, progress)
                record = write_synthetic_shard(path, docs, key, dropped, time.perf_counter() - begin)
                new_tokens += record["generated_tokens"]
                new_seconds += record["seconds"]
            else:
                totals["skipped_finished_shards"] += 1
                progress.advance(len(shard_items), 0)
            totals["documents"] += record["documents"]
            totals["generated_tokens"] += record["generated_tokens"]
            for reason, count in record["dropped"].items():
                totals["dropped"][reason] = totals["dropped"].get(reason, 0) + count
    for stale in sorted(folder.glob("shard_*.jsonl"))[len(shards):]:  # from a longer plan, never read again
        stale.unlink()
        stale.with_suffix(".done").unlink(missing_ok=True)
    summary = {"complete": True, "fingerprint": fp, "teacher": teacher.identity, "mode": cfg.mode,
               "sampling": cfg.sampling.to_dict(), "work_items": len(items), "shards": len(shards), **totals,
               "tokens_per_second_this_run": round(new_tokens / new_seconds, 1) if new_seconds else None,
               "wall_seconds_this_run": round(time.perf_counter() - started, 3)}
    atomic_write_json(out / SYNTH_SUMMARY, summary)
    log.info("synth: %d documents, %d generated tokens in %s (%d shard(s) already done); %s tokens/s",
             summary["documents"], summary["generated_tokens"], out, totals["skipped_finished_shards"],
             summary["tokens_per_second_this_run"])
    return summary
