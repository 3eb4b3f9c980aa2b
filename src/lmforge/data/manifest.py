"""The manifest of a prepared directory, written last of all from the steps' finished records.

Each step contributes what it knows (see ``Stage.step_stats``, ``pipeline_fields`` and
``report`` in stages.py): per source, what was read, what each step removed and why,
what was kept; per step, documents in / out; report files (near-duplicate clusters,
contamination). Here they are put together with the shards and the tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter

from lmforge.core.io import atomic_write_json
from lmforge.core.logging import get_logger
from lmforge.data.config import DataConfig
from lmforge.data.eval_registry import EvalSet, eval_sets_digest
from lmforge.data.heldout_check import heldout_warnings
from lmforge.data.mixture import manifest_mixture
from lmforge.data.pipeline import SPLITS
from lmforge.data.shards import MANIFEST, check_isolation, token_dtype
from lmforge.data.sources import source_origin
from lmforge.data.stages import Context
from lmforge.data.tokenizer import Tokenizer

log = get_logger(__name__)


def write_manifest(ctx: Context, format_version: int, fingerprint: str, timings: dict, skipped: dict) -> dict:
    """Write the step reports and the manifest (last of all); return the manifest."""
    cfg, out = ctx.cfg, ctx.out
    corpus = ctx.corpus()
    ctx.record("tokenizer", "all")  # an error if the tokenizer is missing or not the one trained on this corpus
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    shards_step = ctx.step("shards")
    sources: dict[str, dict] = {s.name: {split: [] for split in SPLITS} for s in cfg.sources}
    for task in shards_step.tasks(ctx):
        record = ctx.record(shards_step, task.stem)
        sources[task.source][task.split].append(
            {"path": task.stem + ".bin", "sha256": record["sha256"], "tokens": record["tokens"],
             "documents": record["documents"], "bytes": record["bytes"]})
    totals = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    for name, splits in sources.items():
        for split, shards in splits.items():
            info = {key: sum(s[key] for s in shards) for key in ("documents", "tokens", "bytes")}
            splits[split] = {**info, "shards": shards}
            for key in info:
                totals[split][key] += info[key]
    pipeline = {}
    for name in ctx.sources:
        fields: dict = {}
        for step in ctx.steps:
            fields.update(step.pipeline_fields(ctx, name))
        fields.update(train_docs=len(corpus[(name, "train")][0]), heldout_docs=len(corpus[(name, "heldout")][0]))
        pipeline[name] = fields
    summaries = []
    for step in ctx.steps:
        for stats in step.step_stats(ctx):
            summary = stats.summary()
            summary["unit_seconds"] = summary.pop("seconds")
            summaries.append(summary)
    removed: Counter = Counter()
    for fields in pipeline.values():
        for key, value in fields.items():
            if key.startswith("removed_"):
                removed[key] += sum(value.values()) if isinstance(value, dict) else value
    train_tokens = {name: sources[name]["train"]["tokens"] for name in sources}
    try:
        mixture = manifest_mixture(train_tokens, {s.name: s.weight for s in cfg.sources}, cfg.mixture_temperature)
    except ValueError as exc:
        mixture = {"error": str(exc)}
    manifest = {
        "format": format_version,
        "fingerprint": fingerprint,
        "tokenizer": {"path": "tokenizer.json", "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "sources": sources,
        "pipeline": pipeline,
        "steps": summaries,
        "isolation": check_isolation(out),
        "mixture": mixture,
        "data_origin": data_origin(cfg, sources),
        "totals": {**totals, "documents_read": sum(p.get("read", 0) for p in pipeline.values()), **removed,
                   "tokens": sum(t["tokens"] for t in totals.values()),
                   "bytes": sum(t["bytes"] for t in totals.values())},
        "work": {"executor": cfg.executor, "num_workers": cfg.num_workers,
                 "units": {step.name: len(step.units(ctx)) for step in ctx.steps},
                 "skipped_finished_units": skipped, "wall_seconds": timings},
        "config": cfg.to_dict(),
    }
    for step in ctx.steps:
        step.report(ctx, manifest)
    # Without a decontaminate step, still record which eval sets there were (none are used).
    manifest.setdefault("contamination", {"enabled": False, "eval_sets_digest": eval_sets_digest(
        [EvalSet.from_dict(s) for s in ctx.eval_sets_snapshot()])})
    manifest = json.loads(json.dumps(manifest))  # what a reader of the file gets (str keys)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def data_origin(cfg: DataConfig, sources: dict[str, dict]) -> dict:
    """Real vs synthetic: per source its origin (and a synthetic one's provenance) and tokens, and
    the training tokens of each origin."""
    by_source: dict[str, dict] = {}
    tokens = {"real": 0, "synthetic": 0}
    for source in cfg.sources:
        info = source_origin(source)
        splits = sources[source.name]
        info.update(train_tokens=splits["train"]["tokens"], heldout_tokens=splits["heldout"]["tokens"],
                    train_documents=splits["train"]["documents"])
        tokens[info["origin"]] += splits["train"]["tokens"]
        by_source[source.name] = info
    total = tokens["real"] + tokens["synthetic"]
    return {"by_source": by_source, "train_tokens": tokens,
            "synthetic_share_of_train_tokens": tokens["synthetic"] / total if total else 0.0}


def log_summary(manifest: dict) -> None:
    for name, splits in manifest["sources"].items():
        p = manifest["pipeline"][name]
        removed = ", ".join(f"{sum(v.values()) if isinstance(v, dict) else v} {k.removeprefix('removed_')}"
                            for k, v in p.items() if k.startswith("removed_"))
        log.info("%s: %d read; removed: %s; train %d docs / %d tokens, held-out %d docs / %d tokens", name,
                 p["read"], removed or "none", splits["train"]["documents"], splits["train"]["tokens"],
                 splits["heldout"]["documents"], splits["heldout"]["tokens"])
    origin = manifest.get("data_origin", {}).get("train_tokens", {})
    if origin.get("synthetic"):
        log.info("training tokens: %d real, %d synthetic (%.1f%% synthetic)", origin["real"], origin["synthetic"],
                 100 * manifest["data_origin"]["synthetic_share_of_train_tokens"])
    near, contamination = manifest.get("near_dedup"), manifest["contamination"]
    log.info("near-duplicates: %s; contamination: %s", f"{near['clusters']} clusters" if near else "not looked for",
             f"{contamination['items_with_hits']} eval items hit, {contamination['removed_documents']} "
             f"training documents removed (see {contamination['report']})" if contamination.get("enabled") else "off")
    timings = manifest["work"]["wall_seconds"]
    if timings:
        log.info("prepared %d tokens in %.1f s (%s)", manifest["totals"]["tokens"], timings["total"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total"))
    for line in heldout_warnings(manifest):
        log.warning("%s", line)
