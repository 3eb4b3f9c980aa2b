"""``prepare_data``: sources -> pipeline -> tokenizer -> shards + manifest, resumable.

Stages (stages.py): read and normalize each source; quality rules and MinHash signatures
per chunk; exact then near-duplicate removal over everything; the eval n-gram index
(registered eval sets plus this preparation's held-out split); decontamination per chunk.
Then the split by content hash, the tokenizer trained on the training split only, and
shards per (source, split). Every unit leaves a completion marker, so a rerun skips
finished work; a finished directory with the same config (and the same eval sets) is a
no-op; a directory prepared from a different config is never mixed into.

Measured on the demo corpus: docs/data.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from lmforge.core.logging import RateProgress, get_logger
from lmforge.data.config import DataConfig
from lmforge.data.decontaminate import NgramIndex, report as contamination_report
from lmforge.data.eval_registry import EvalSet, collect_eval_sets
from lmforge.data.executors import LocalExecutor, submit_slurm
from lmforge.data.mixture import manifest_mixture
from lmforge.data.pipeline import SPLITS
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
from lmforge.data.stages import (
    DECONTAMINATE,
    DEDUP,
    EVAL_INDEX,
    FILTER,
    READ,
    STAGES,
    WORK,
    Context,
    Stage,
    merged_stats,
    run_unit,
)
from lmforge.data.steps import StepStats
from lmforge.data.tokenizer import Tokenizer

log = get_logger(__name__)
FORMAT_VERSION = 2
FINGERPRINT_FILE = "prepare_config.json"
CONTAMINATION_REPORT = "contamination.json"
DEDUP_REPORT = "dedup_report.json"
# Everything prepare writes; overwrite removes exactly these and nothing else in out_dir.
OWNED = (MANIFEST, FINGERPRINT_FILE, "tokenizer.json", "tokenizer.done", "shards", "doc_hashes", WORK,
         CONTAMINATION_REPORT, DEDUP_REPORT)

_SHARD_FILE = re.compile(r"^(shard_\d{5})\.(bin|idx\.npy|done)$")
# (source, split) -> (normalized texts, content hashes), in reading order
Corpus = dict[tuple[str, str], tuple[list[str], list[str]]]
# After the document stages, local runs go on in this process; Slurm runs as jobs.
FINAL_STAGES = ("tokenizer", "shards", "manifest")


def fingerprint(cfg: DataConfig) -> str:
    body = json.dumps({"format": FORMAT_VERSION, **cfg.fingerprint_dict()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def prepare_data(cfg: DataConfig, overwrite: bool = False) -> dict:
    """Prepare ``cfg.out_dir`` and return its manifest (see shards.py for the layout).

    With ``executor: slurm`` the stages are submitted as jobs instead, and the returned
    dict has ``"status": "submitted"``; the last job writes the manifest.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Ranks or parallel runs preparing the same directory take turns; later ones no-op.
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(cfg, out, overwrite)


def eval_sets_digest(eval_sets: list[EvalSet]) -> str:
    return hashlib.sha256("\n".join(f"{s.name}\t{s.sha256}" for s in eval_sets).encode()).hexdigest()


def _prepare_locked(cfg: DataConfig, out: Path, overwrite: bool) -> dict:
    started = time.perf_counter()
    fp = fingerprint(cfg)
    eval_sets = collect_eval_sets(cfg) if cfg.decontamination.enabled else []
    finished = _finished_manifest(out, fp, eval_sets_digest(eval_sets))
    if finished is not None and not overwrite:
        log.info("%s is already prepared with this config (tokenizer %s): nothing to do",
                 out, finished["tokenizer"]["sha256"][:12])
        return finished
    _claim(out, fp, cfg, overwrite)
    ctx = Context.create(cfg, out)
    atomic_write_json(ctx.work / "eval_sets.json", {"sets": [s.to_dict() for s in eval_sets]})
    if cfg.executor == "slurm":
        stages = [(stage.name, stage.single) for stage in STAGES.values()]
        stages += [(name, name != "shards") for name in FINAL_STAGES]
        submitted = submit_slurm(cfg, out, stages)
        log.info("submitted %d chained Slurm jobs; logs under %s", len(stages), submitted["logs"])
        return submitted
    executor = LocalExecutor(cfg.num_workers)
    timings: dict[str, float] = {}
    skipped: dict[str, int] = {}
    try:
        for stage in STAGES.values():
            begin = time.perf_counter()
            skipped[stage.name] = _run_stage(ctx, stage, executor)
            timings[stage.name] = round(time.perf_counter() - begin, 3)
        begin = time.perf_counter()
        corpus = _corpus(ctx)
        tokenizer = _tokenizer(cfg, out, corpus)
        timings["tokenizer"] = round(time.perf_counter() - begin, 3)
        begin = time.perf_counter()
        records = _write_shards(cfg, out, corpus, tokenizer, executor)
        timings["shards"] = round(time.perf_counter() - begin, 3)
    finally:
        executor.close()
    timings["total"] = round(time.perf_counter() - started, 3)
    manifest = _finish(ctx, fp, eval_sets, corpus, tokenizer, records, timings, skipped)
    _log_summary(manifest)
    return manifest


def _run_stage(ctx: Context, stage: Stage, executor: LocalExecutor) -> int:
    """Run the stage's unfinished units; return how many were already finished."""
    units = stage.units(ctx)
    pending = [unit for unit in units if ctx.done(stage, unit) is None]
    if len(pending) < len(units):
        log.info("%s: skipped %d finished unit(s) of %d", stage.name, len(units) - len(pending), len(units))
    if not pending:
        return len(units)
    out = str(ctx.out)
    if stage.single:
        stage.run(ctx, pending[0])
    else:
        with RateProgress(stage.name, total=len(pending), unit="units") as bar:
            executor.map(run_unit, [(stage.name, out, unit) for unit in pending],
                         on_done=lambda args, record: bar.advance(1))
    return len(units) - len(pending)


def run_stage_slice(name: str, out_dir: str, rank: int, world_size: int) -> None:
    """Rank ``rank`` of ``world_size``'s share of stage ``name`` (a Slurm array task)."""
    ctx = Context.load(Path(out_dir))
    if name in STAGES:
        for unit in STAGES[name].units(ctx)[rank::world_size]:
            run_unit(name, out_dir, unit)
        return
    out = Path(out_dir)
    corpus = _corpus(ctx, write_hashes=name == "tokenizer")
    if name == "tokenizer":
        _tokenizer(ctx.cfg, out, corpus)
        return
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    tasks = _plan(ctx.cfg, corpus)
    if name == "shards":
        for task in tasks[rank::world_size]:
            if finished_record(task, out, tokenizer.sha256) is None:
                write_shard(task, out_dir, tokenizer.sha256)
        return
    records = {task.stem: finished_record(task, out, tokenizer.sha256) for task in tasks}
    missing = [stem for stem, record in records.items() if record is None]
    if missing:
        raise DataError(f"{out}: {len(missing)} shard(s) unfinished (e.g. {missing[0]}); rerun the shards stage")
    eval_sets = [EvalSet.from_dict(s) for s in read_json(ctx.work / "eval_sets.json")["sets"]]
    _log_summary(_finish(ctx, fingerprint(ctx.cfg), eval_sets, corpus, tokenizer, records, {}, {}))


def _finished_manifest(out: Path, fp: str, eval_digest: str) -> dict | None:
    """The existing manifest if it matches this config and eval sets, and its files are all present."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = load_manifest(out)
        if manifest.get("fingerprint") != fp:
            return None
        if manifest.get("contamination", {}).get("eval_sets_digest") != eval_digest:
            log.info("the registered eval sets changed since %s was prepared: decontaminating again", out)
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


def _older_format_same_config(previous: dict, cfg: DataConfig) -> bool:
    """True when ``previous`` (a marker from an older format) came from this same config:
    every setting it recorded is unchanged; only settings added since are new."""
    if previous.get("format", 0) >= FORMAT_VERSION or not isinstance(previous.get("config"), dict):
        return False
    old, new = previous["config"], cfg.fingerprint_dict()
    if len(old.get("sources", [])) != len(new["sources"]):
        return False
    same_sources = all({k: v for k, v in n.items() if k in o} == o for o, n in zip(old["sources"], new["sources"]))
    return same_sources and all(new.get(k) == v for k, v in old.items() if k != "sources")


def _claim(out: Path, fp: str, cfg: DataConfig, overwrite: bool) -> None:
    """Make ``out`` ours for this config: refuse (or, with overwrite, clear) other prepared data."""
    marker = out / FINGERPRINT_FILE
    previous, recorded = None, {}
    if marker.is_file():
        try:
            recorded = read_json(marker)
            previous = recorded.get("fingerprint")
        except (OSError, json.JSONDecodeError):
            previous = "unreadable"
    foreign = previous is None and any((out / name).exists() for name in OWNED)
    if previous not in (None, fp) and _older_format_same_config(recorded, cfg):
        log.info("%s was prepared by an older lmforge data format from the same config: preparing it again", out)
        overwrite = True
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


def _corpus(ctx: Context, write_hashes: bool = True) -> Corpus:
    """The kept documents by (source, split); writes doc_hashes/ and checks isolation."""
    corpus: Corpus = {(s.name, split): ([], []) for s in ctx.cfg.sources for split in SPLITS}
    for source, split, _, text, digest in ctx.final_documents():
        texts, hashes = corpus[(source, split)]
        texts.append(text)
        hashes.append(digest)
    if write_hashes:
        for split in SPLITS:
            hashes = sorted(h for (_, s), (_, hs) in corpus.items() if s == split for h in hs)
            atomic_write_text(ctx.out / "doc_hashes" / f"{split}.txt", "".join(h + "\n" for h in hashes))
    isolation = check_isolation(ctx.out)
    if isolation["overlap"]:
        raise DataError(f"{ctx.out}: {isolation['overlap']} held-out documents also appear in the training split "
                        f"(e.g. {isolation['overlapping_hashes'][:3]})")
    return corpus


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


def _plan(cfg: DataConfig, corpus: Corpus) -> list[ShardTask]:
    return [task for (source, split), (texts, hashes) in corpus.items()
            for task in plan_shards(split, source, texts, hashes, cfg.shard_tokens)]


def _write_shards(cfg: DataConfig, out: Path, corpus: Corpus, tokenizer: Tokenizer,
                  executor: LocalExecutor) -> dict[str, dict]:
    """Write every planned shard not already finished; return {shard stem: completion record}."""
    tasks = _plan(cfg, corpus)
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
        def done(args: tuple, record: dict) -> None:
            records[args[0].stem] = record
            bar.advance(1, record["tokens"])

        executor.map(write_shard, [(task, str(out), tokenizer.sha256) for task in pending], on_done=done)
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


def _pipeline_by_source(ctx: Context, corpus: Corpus) -> dict[str, dict]:
    """Per source: what was read, what each step removed and why, what was kept."""
    dedup = ctx.record(DEDUP, "all")
    exact = StepStats.from_dict(dedup["exact_dedup"])
    near = StepStats.from_dict(dedup["near_dedup"])
    quality = merged_stats(ctx, FILTER, "quality")
    decontaminated = merged_stats(ctx, DECONTAMINATE, "step") if ctx.cfg.decontamination.enabled \
        else StepStats("decontaminate")
    pipeline = {}
    for name in ctx.sources:
        read = ctx.record(READ, name)
        pipeline[name] = {
            "read": read["read"], "removed_empty": read["removed_empty"],
            "removed_quality": dict(sorted(quality.removed[name].items())),
            "exempt_code": quality.flagged[name]["exempt_code"],
            "removed_duplicates": exact.removed[name]["exact_duplicate"],
            "removed_near_duplicates": near.removed[name]["near_duplicate"],
            "removed_contaminated": decontaminated.removed[name]["contaminated"],
            "train_docs": len(corpus[(name, "train")][0]), "heldout_docs": len(corpus[(name, "heldout")][0]),
            "input_problems": read["problem_counts"],
        }
    return pipeline


def _steps(ctx: Context) -> list[dict]:
    """Each step's documents in / out and removals by reason, summed over units, with the
    seconds its units spent (also when an earlier, interrupted run did them)."""
    normalize = StepStats("normalize")
    for name in ctx.sources:
        normalize.merge(StepStats.from_dict(ctx.record(READ, name)["normalize"]))
        normalize.seconds += ctx.record(READ, name)["seconds"]  # reading the source included
    dedup = ctx.record(DEDUP, "all")
    quality = merged_stats(ctx, FILTER, "quality")
    exact = StepStats.from_dict(dedup["exact_dedup"])
    near = StepStats.from_dict(dedup["near_dedup"])
    # Near-dedup's time: the MinHash signatures (filter stage) plus clustering (dedup stage).
    near.seconds = merged_stats(ctx, FILTER, "minhash").seconds + dedup["seconds"]
    steps = [normalize, quality, exact, near]
    if ctx.cfg.decontamination.enabled:
        decontaminate = merged_stats(ctx, DECONTAMINATE, "step")
        decontaminate.seconds = (sum(ctx.record(DECONTAMINATE, u)["seconds"] for u in DECONTAMINATE.units(ctx))
                                 + ctx.record(EVAL_INDEX, "all")["seconds"])
        steps.append(decontaminate)
    summaries = []
    for name, step in zip(("normalize", "quality", "exact_dedup", "near_dedup", "decontaminate"), steps):
        summary = step.summary()
        summary["name"] = name
        summary["unit_seconds"] = summary.pop("seconds")
        summaries.append(summary)
    return summaries


def _dedup_report(ctx: Context) -> dict:
    dedup = ctx.record(DEDUP, "all")
    near = ctx.cfg.near_dedup
    thresholds = {s.name: ctx.cfg.near_dedup_threshold_for(s) for s in ctx.cfg.sources}
    lowest = min(thresholds.values())
    summary = {
        "enabled": near.enabled, "shingle_size": near.shingle_size, "num_bands": near.num_bands,
        "rows_per_band": near.rows_per_band, "threshold": near.threshold, "thresholds_by_source": thresholds,
        # Chance that a pair right at the (lowest) threshold is even compared.
        "candidate_probability_at_threshold": round(near.candidate_probability(lowest), 4),
        **{k: v for k, v in dedup["lsh"].items() if k != "enabled"},
        "clusters": len(dedup["clusters"]),
        "documents_in_clusters": sum(len(c["members"]) for c in dedup["clusters"]),
        "removed": sum(len(c["members"]) - 1 for c in dedup["clusters"]),
        "exact_duplicates_removed": len(dedup["exact_duplicates"]),
    }
    if near.enabled and summary["candidate_probability_at_threshold"] < 0.9:
        log.warning("near-dedup: a pair at similarity %.2f is compared with probability %.2f only; raise "
                    "num_bands (or lower rows_per_band) to find more near-duplicates", lowest,
                    summary["candidate_probability_at_threshold"])
    return {"summary": summary, "clusters": dedup["clusters"], "exact_duplicates": dedup["exact_duplicates"]}


def _contamination(ctx: Context, eval_sets: list[EvalSet]) -> tuple[dict, dict]:
    """(the report written to contamination.json, its summary for the manifest)."""
    cfg = ctx.cfg.decontamination
    digest = eval_sets_digest(eval_sets)
    if not cfg.enabled:
        return {"enabled": False}, {"enabled": False, "eval_sets_digest": digest}
    index = NgramIndex.load(ctx.work)
    hits = [hit for unit in DECONTAMINATE.units(ctx) for hit in ctx.record(DECONTAMINATE, unit)["hits"]]
    full = contamination_report(index, hits, cfg)
    full["documents_scanned"] = sum(ctx.record(DECONTAMINATE, u)["scanned"] for u in DECONTAMINATE.units(ctx))
    summary = {"enabled": True, "report": CONTAMINATION_REPORT, "ngram_size": cfg.ngram_size,
               "eval_sets_digest": digest,
               "eval_sets": {s["name"]: {"role": s["role"], "sha256": s["sha256"], "items": s["items"],
                                         "items_with_hits": s["items_with_hits"]} for s in full["eval_sets"]},
               "documents_scanned": full["documents_scanned"], **full["totals"]}
    return full, summary


def _finish(ctx: Context, fp: str, eval_sets: list[EvalSet], corpus: Corpus, tokenizer: Tokenizer,
            records: dict[str, dict], timings: dict, skipped: dict) -> dict:
    """Write the reports and the manifest (last of all); return the manifest."""
    cfg, out = ctx.cfg, ctx.out
    isolation = check_isolation(out)
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
    pipeline = _pipeline_by_source(ctx, corpus)
    dedup = _dedup_report(ctx)
    atomic_write_json(out / DEDUP_REPORT, dedup)
    contamination, contamination_summary = _contamination(ctx, eval_sets)
    if cfg.decontamination.enabled:
        atomic_write_json(out / CONTAMINATION_REPORT, contamination)
        contamination_summary["sha256"] = sha256_file(out / CONTAMINATION_REPORT)
    train_tokens = {name: sources[name]["train"]["tokens"] for name in sources}
    weights = {s.name: s.weight for s in cfg.sources}
    try:
        mixture = manifest_mixture(train_tokens, weights, cfg.mixture_temperature)
    except ValueError as exc:
        mixture = {"error": str(exc)}
    summed = {key: sum(p[key] for p in pipeline.values())
              for key in ("read", "removed_empty", "removed_duplicates", "removed_near_duplicates",
                          "removed_contaminated")}
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "tokenizer": {"path": "tokenizer.json", "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "sources": sources,
        "pipeline": pipeline,
        "steps": _steps(ctx),
        "near_dedup": {**dedup["summary"], "report": DEDUP_REPORT},
        "contamination": contamination_summary,
        "input_problems": {name: ctx.record(READ, name)["problems"] for name in ctx.sources
                           if ctx.record(READ, name)["problems"]},
        "isolation": isolation,
        "mixture": mixture,
        "totals": {**totals,
                   "documents_read": summed["read"],
                   "removed_empty": summed["removed_empty"],
                   "removed_quality": sum(sum(p["removed_quality"].values()) for p in pipeline.values()),
                   "removed_duplicates": summed["removed_duplicates"],
                   "removed_near_duplicates": summed["removed_near_duplicates"],
                   "removed_contaminated": summed["removed_contaminated"],
                   "tokens": sum(t["tokens"] for t in totals.values()),
                   "bytes": sum(t["bytes"] for t in totals.values())},
        "work": {"executor": cfg.executor, "num_workers": cfg.num_workers,
                 "units": {stage.name: len(stage.units(ctx)) for stage in STAGES.values()},
                 "skipped_finished_units": skipped, "wall_seconds": timings},
        "config": cfg.to_dict(),
    }
    manifest = json.loads(json.dumps(manifest))  # what a reader of the file gets (str keys)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _log_summary(manifest: dict) -> None:
    for name, splits in manifest["sources"].items():
        p = manifest["pipeline"][name]
        log.info("%s: %d read, %d empty, %d by quality rules, %d duplicates, %d near-duplicates, %d contaminated "
                 "removed; train %d docs / %d tokens, held-out %d docs / %d tokens", name, p["read"],
                 p["removed_empty"], sum(p["removed_quality"].values()), p["removed_duplicates"],
                 p["removed_near_duplicates"], p["removed_contaminated"], splits["train"]["documents"],
                 splits["train"]["tokens"], splits["heldout"]["documents"], splits["heldout"]["tokens"])
    near, contamination = manifest["near_dedup"], manifest["contamination"]
    log.info("near-duplicates: %d clusters; contamination: %s", near["clusters"],
             f"{contamination['items_with_hits']} eval items hit, {contamination['removed_documents']} "
             f"training documents removed (see {CONTAMINATION_REPORT})" if contamination.get("enabled") else "off")
    timings = manifest["work"]["wall_seconds"]
    if timings:
        log.info("prepared %d tokens in %.1f s (%s)", manifest["totals"]["tokens"], timings["total"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total"))
