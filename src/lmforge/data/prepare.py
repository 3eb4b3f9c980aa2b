"""``prepare_data``: sources -> the configured steps -> tokenizer -> shards + manifest, resumable.

The steps are ``DataConfig.steps`` in order (default: read, quality, minhash, dedup,
eval_index, decontaminate, tokenizer, shards; what each does: stages.py). Each step's
units leave completion markers, so a rerun skips finished work; a finished directory
with the same config (and the same eval sets) is a no-op; a directory prepared from a
different config is never mixed into. The manifest is written last (manifest.py).

Measured on the demo corpus: docs/data.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_json, read_json
from lmforge.core.logging import get_logger
from lmforge.data.config import DataConfig
from lmforge.data.document_steps import CONTAMINATION_REPORT, DEDUP_REPORT
from lmforge.data.eval_registry import collect_eval_sets, eval_sets_digest
from lmforge.data.executors import LocalExecutor, submit_slurm
from lmforge.data.manifest import log_summary, write_manifest
from lmforge.data.output_steps import parent_tokenizer
from lmforge.data.shards import MANIFEST, load_manifest, token_dtype
from lmforge.data.stages import WORK, Context, Stage, run_unit
from lmforge.data.tokenizer import Tokenizer

log = get_logger(__name__)
# 3: the steps became a configured list (quality and minhash separate work units) and the
# quality rules gained max_non_text_char_fraction, which applies to every source.
FORMAT_VERSION = 3
FINGERPRINT_FILE = "prepare_config.json"
# Everything prepare writes; overwrite removes exactly these and nothing else in out_dir.
OWNED = (MANIFEST, FINGERPRINT_FILE, "tokenizer.json", "tokenizer.done", "shards", "doc_hashes", WORK,
         CONTAMINATION_REPORT, DEDUP_REPORT, "image_tokenizer.json", "images")
# After the configured steps, a Slurm run has one more job: the manifest.
MANIFEST_JOB = "manifest"


def fingerprint(cfg: DataConfig) -> str:
    body = json.dumps({"format": FORMAT_VERSION, **cfg.fingerprint_dict()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def prepare_data(cfg: DataConfig, overwrite: bool = False) -> dict:
    """Prepare ``cfg.out_dir`` and return its manifest (see shards.py for the layout).

    With ``executor: slurm`` the steps are submitted as jobs instead, and the returned
    dict has ``"status": "submitted"``; the last job writes the manifest.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Ranks or parallel runs preparing the same directory take turns; later ones no-op.
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(cfg, out, overwrite)


def _prepare_locked(cfg: DataConfig, out: Path, overwrite: bool) -> dict:
    started = time.perf_counter()
    fp = fingerprint(cfg)
    eval_sets = collect_eval_sets(cfg) if cfg.decontamination.enabled else []
    parent = parent_tokenizer(cfg)  # data.tokenizer_from: an unusable one fails here, before any work
    finished = _finished_manifest(out, fp, eval_sets_digest(eval_sets))
    if finished is not None and parent is not None and finished["tokenizer"]["sha256"] != parent[1].sha256:
        log.info("the tokenizer at data.tokenizer_from (%s) changed since %s was prepared: tokenizing again",
                 parent[0], out)
        finished = None
    if finished is not None and not overwrite:
        log.info("%s is already prepared with this config (tokenizer %s): nothing to do",
                 out, finished["tokenizer"]["sha256"][:12])
        return finished
    _claim(out, fp, cfg, overwrite)
    ctx = Context.create(cfg, out)
    atomic_write_json(ctx.work / "eval_sets.json", {"sets": [s.to_dict() for s in eval_sets]})
    if cfg.executor == "slurm":
        jobs = [(step.name, step.single) for step in ctx.steps] + [(MANIFEST_JOB, True)]
        submitted = submit_slurm(cfg, out, jobs)
        log.info("submitted %d chained Slurm jobs; logs under %s", len(jobs), submitted["logs"])
        return submitted
    executor = LocalExecutor(cfg.num_workers)
    timings: dict[str, float] = {}
    skipped: dict[str, int] = {}
    try:
        for step in ctx.steps:
            begin = time.perf_counter()
            skipped[step.name] = _run_step(ctx, step, executor)
            timings[step.name] = round(time.perf_counter() - begin, 3)
    finally:
        executor.close()
    timings["total"] = round(time.perf_counter() - started, 3)
    manifest = write_manifest(ctx, FORMAT_VERSION, fp, timings, skipped)
    log_summary(manifest)
    return manifest


def _run_step(ctx: Context, step: Stage, executor: LocalExecutor) -> int:
    """Run the step's unfinished units; return how many were already finished."""
    step.tidy(ctx)
    units = step.units(ctx)
    pending = [unit for unit in units if ctx.done(step, unit) is None]
    if len(pending) < len(units):
        log.info("%s: skipped %d finished unit(s) of %d", step.name, len(units) - len(pending), len(units))
    if pending:
        step.dispatch(ctx, pending, executor)
    return len(units) - len(pending)


def run_stage_slice(name: str, out_dir: str, rank: int, world_size: int) -> None:
    """Rank ``rank`` of ``world_size``'s share of step ``name`` (a Slurm array task), or the manifest."""
    ctx = Context.load(Path(out_dir))
    if name == MANIFEST_JOB:
        log_summary(write_manifest(ctx, FORMAT_VERSION, fingerprint(ctx.cfg), {}, {}))
        return
    for unit in ctx.step(name).units(ctx)[rank::world_size]:
        run_unit(name, out_dir, unit)


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


def _recorded_settings_kept(old: Any, new: Any) -> bool:
    """True when every setting recorded in ``old`` has the same value in ``new`` (settings
    added since, at any depth, are new rather than changed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(key in new and _recorded_settings_kept(value, new[key]) for key, value in old.items())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_recorded_settings_kept(o, n) for o, n in zip(old, new))
    return old == new


def _older_format_same_config(previous: dict, cfg: DataConfig) -> bool:
    """True when ``previous`` (a marker from an older format) came from this same config:
    every setting it recorded is unchanged; only settings added since are new."""
    if previous.get("format", 0) >= FORMAT_VERSION or not isinstance(previous.get("config"), dict):
        return False
    recorded_now = json.loads(json.dumps(cfg.fingerprint_dict()))  # as the marker holds it (str keys)
    return _recorded_settings_kept(previous["config"], recorded_now)


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
