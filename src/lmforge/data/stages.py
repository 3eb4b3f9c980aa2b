"""The data pipeline as a configured list of named steps of work units with completion markers.

``DataConfig.steps`` names the steps in order; each name is looked up in :data:`STEPS`, a
:class:`~lmforge.core.registry.Registry` of :class:`Stage` objects. A step is a list of
units (a source, a chunk of documents, a shard, or one global unit); each unit reads what
earlier steps wrote and writes its output and, last, a ``.done`` marker holding a key: a
hash of everything the output depends on (its settings, and the key of the step before
it, so a changed setting redoes that step and everything after it; the tokenizer and the
shards are keyed by the final documents themselves). A unit whose marker
holds the key it would compute now is finished and skipped, so an interrupted run resumes
where it stopped. Every unit is a pure function of files, so any process can run it: a
local process pool, or a Slurm array task (see executors.py).

The default steps (config.DEFAULT_STEPS), their units and what they leave::

    read           per source  work/read/<source>/chunk_NNNNN.arrow, work/read/<source>.done
    quality        per chunk   work/quality/<source>/NNNNN.done          (quality.py)
    minhash        per chunk   work/minhash/<source>/NNNNN.{minhash.npz,done}
    dedup          global      work/dedup.done    exact and near-duplicate removals, clusters
    eval_index     global      work/eval_index.*  n-gram index of the eval sets and the held-out split
    decontaminate  per chunk   work/decontaminate/<source>/NNNNN.done
    tokenizer      global      tokenizer.json, tokenizer.done, doc_hashes/  (output_steps.py)
    shards         per shard   shards/<split>/<source>/shard_NNNNN.{bin,idx.npy,done}

A new document filter is one module in ``lmforge/data/filters/`` defining a
:class:`ChunkFilter` decorated with :func:`register_step`, plus its name in ``steps``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_json, atomic_write_text, read_json
from lmforge.core.logging import RateProgress, get_logger
from lmforge.core.registry import Registry
from lmforge.data.config import DataConfig
from lmforge.data.documents import Document
from lmforge.data.pipeline import SPLITS, split_by_hash
from lmforge.data.sources import source_signature
from lmforge.data.steps import PipelineStep, StepStats

if TYPE_CHECKING:
    from lmforge.data.executors import LocalExecutor

log = get_logger(__name__)
WORK = "work"
STAGE_VERSION = 2
PLAN = "plan.json"
# (source, split) -> (normalized texts, content hashes), in reading order
Corpus = dict[tuple[str, str], tuple[list[str], list[str]]]

STEPS: Registry["Stage"] = Registry("data step")
# Modules whose steps are built in; every module of lmforge.data.filters is loaded too.
_BUILTIN_MODULES = ("lmforge.data.document_steps", "lmforge.data.quality", "lmforge.data.output_steps",
                    "lmforge.data.image_steps")
# The steps whose output is the prepared data: the corpus is final when the tokenizer starts.
REQUIRED = ("read", "tokenizer", "shards")


def register_step(cls: type["Stage"]) -> type["Stage"]:
    """Class decorator: make the step available to ``DataConfig.steps`` under ``cls.name``."""
    STEPS.register(cls.name)(cls())
    return cls


_loaded = False


def load_steps() -> Registry["Stage"]:
    """The registry with the built-in steps and every filter module registered."""
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        from lmforge.data import filters

        for info in sorted(pkgutil.iter_modules(filters.__path__), key=lambda m: m.name):
            importlib.import_module(f"{filters.__name__}.{info.name}")
        _loaded = True
    return STEPS


def check_steps(names: list[str], cfg: DataConfig | None = None) -> list["Stage"]:
    """The steps named, in order; a ValueError naming the problem for an impossible list."""
    registry = load_steps()
    unknown = [name for name in names if name not in registry.names()]
    if unknown:
        raise ValueError(f"steps: unknown step {unknown[0]!r} (known: {', '.join(registry.names())})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"steps: {repeated[0]!r} is listed more than once")
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise ValueError(f"steps: {missing[0]!r} is missing (every preparation needs {', '.join(REQUIRED)})")
    if names[0] != "read":
        raise ValueError(f"steps: 'read' must come first (every other step works on the documents it reads), "
                         f"got {names[0]!r} first")
    steps = [registry.get(name) for name in names]
    for position, step in enumerate(steps):
        for needed in step.after:
            if needed not in names:
                raise ValueError(f"steps: {step.name!r} needs {needed!r}, which is not listed")
            if names.index(needed) > position:
                raise ValueError(f"steps: {step.name!r} needs {needed!r} before it, but it comes after")
        if step.removes_documents and names.index("tokenizer") < position:
            raise ValueError(f"steps: {step.name!r} removes documents, so it must come before 'tokenizer' "
                             "(the tokenizer and the shards see the final documents)")
    if cfg is not None:
        for name, setting, enabled in (("dedup", "near_dedup.enabled", cfg.near_dedup.enabled),
                                       ("decontaminate", "decontamination.enabled", cfg.decontamination.enabled)):
            if enabled and name not in names:
                raise ValueError(f"steps: {setting} is true but {name!r} is not listed; "
                                 f"add it or set {setting}: false")
    return steps


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps([STAGE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


def load_marker(path: Path, key: str | None) -> dict | None:
    if key is None or not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def write_chunk(path: Path, doc_ids: list[str], texts: list[str], hashes: list[str]) -> None:
    import pyarrow as pa

    table = pa.table({"doc_id": pa.array(doc_ids, pa.string()), "text": pa.array(texts, pa.large_string()),
                      "sha256": pa.array(hashes, pa.string())})

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def read_chunk(path: Path, columns: tuple[str, ...] = ("doc_id", "text", "sha256")) -> dict[str, list[str]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable work file ({exc}); rerun with --overwrite") from exc
    return {name: table.column(name).to_pylist() for name in columns}


def split_unit(unit: str) -> tuple[str, int]:
    """("source", chunk index) of a per-chunk unit "source/NNNNN"."""
    source, index = unit.rsplit("/", 1)
    return source, int(index)


class Context:
    """The config, the output folder, its steps, and the records of finished units read so far."""

    def __init__(self, cfg: DataConfig, out: Path, run_id: str = ""):
        self.cfg, self.out, self.run_id = cfg, Path(out), run_id
        self.work = self.out / WORK
        self.sources = {s.name: s for s in cfg.sources}
        self.steps: list[Stage] = check_steps(list(cfg.steps))
        self._positions = {step.name: i for i, step in enumerate(self.steps)}
        self._records: dict[tuple[str, str], dict] = {}
        self._signatures: dict[str, str | None] = {}
        self._corpus: Corpus | None = None
        self.cache: dict[str, Any] = {}  # what a step computes once per process (e.g. the shard plan)

    @classmethod
    def create(cls, cfg: DataConfig, out: Path) -> "Context":
        """Write the plan every worker reads (config and a run id) and return the context."""
        ctx = cls(cfg, out, uuid.uuid4().hex)
        atomic_write_json(ctx.work / PLAN, {"run_id": ctx.run_id, "config": cfg.to_dict()})
        return ctx

    @classmethod
    def load(cls, out: Path) -> "Context":
        plan = read_json(Path(out) / WORK / PLAN)
        return cls(DataConfig.from_dict(plan["config"]), Path(out), plan["run_id"])

    def signature(self, source: str) -> str | None:
        """The source's input signature, computed once per run (listing files is not free)."""
        if source not in self._signatures:
            self._signatures[source] = source_signature(self.sources[source])
        return self._signatures[source]

    def step(self, name: str) -> "Stage":
        if name not in self._positions:
            raise DataError(f"{self.out}: step {name!r} is not in this preparation's steps")
        return self.steps[self._positions[name]]

    # ---- finished units -------------------------------------------------------------
    def record(self, stage: "Stage | str", unit: str) -> dict:
        """The finished record of ``unit``; an error if it has not finished."""
        stage = self.step(stage) if isinstance(stage, str) else stage
        found = self.done(stage, unit)
        if found is None:
            raise DataError(f"{self.out}: step {stage.name!r} has not finished {unit!r}")
        return found

    def done(self, stage: "Stage", unit: str) -> dict | None:
        cached = self._records.get((stage.name, unit))
        if cached is not None:
            return cached
        found = stage.finished(self, unit)
        if found is not None:
            self._records[(stage.name, unit)] = found
        return found

    def remember(self, stage: "Stage", unit: str, record: dict) -> None:
        """Cache a record a worker just returned (it also wrote it to disk)."""
        self._records[(stage.name, unit)] = record

    def upstream(self, stage: "Stage", unit: str) -> list:
        """What ``unit`` depends on from the steps before it: the chunk's digest for a per-chunk
        unit, and the key(s) of the step just before (which hold the keys before them)."""
        parts: list = []
        if stage.per_chunk:
            source, index = split_unit(unit)
            parts.append(self.record("read", source)["chunks"][index]["digest"])
        position = self._positions[stage.name]
        if position == 0:
            return parts
        previous = self.steps[position - 1]
        if previous.name == "read" and stage.per_chunk:
            return parts
        if previous.per_chunk and stage.per_chunk:
            return parts + [previous.done_key(self.record(previous, unit))]
        return parts + [previous.done_key(self.record(previous, u)) for u in previous.units(self)]

    # ---- views over finished steps --------------------------------------------------
    def chunks(self) -> list[tuple[str, int]]:
        return [(name, i) for name in self.sources for i in range(len(self.record("read", name)["chunks"]))]

    def chunk_path(self, source: str, index: int) -> Path:
        return self.work / "read" / source / f"chunk_{index:05d}.arrow"

    def removed(self, source: str, index: int, before: str | None = None) -> dict[int, str]:
        """{document index: reason} for one chunk, by every step before ``before`` (None: all)."""
        out: dict[int, str] = {}
        for step in self.steps:
            if step.name == before:
                break
            if step.removes_documents:
                for i, why in step.removals(self, source, index).items():
                    out.setdefault(i, why)
        return out

    # ---- the train / held-out split: the one place that decides it ---------------------
    def split_of(self, source: str, doc_id: str, text: str, digest: str) -> str:
        """"train" or "heldout" for one document (by its content hash; see pipeline.split_by_hash)."""
        return split_by_hash(Document(text, source, doc_id), self.cfg.heldout_fraction_for(source), digest=digest)

    def split_settings(self) -> list[float]:
        """Everything the split depends on, for the keys of the steps that use it."""
        return [self.cfg.heldout_fraction_for(name) for name in self.sources]

    def final_documents(self, before: str | None = None) -> Iterator[tuple[str, str, str, str, str]]:
        """(source, split, doc_id, text, sha256) of every document kept by the steps before
        ``before`` (None: all steps), in reading order."""
        for source, index in self.chunks():
            removed = self.removed(source, index, before)
            chunk = read_chunk(self.chunk_path(source, index))
            for i, (doc_id, text, digest) in enumerate(zip(chunk["doc_id"], chunk["text"], chunk["sha256"])):
                if i not in removed:
                    yield source, self.split_of(source, doc_id, text, digest), doc_id, text, digest

    def corpus(self) -> Corpus:
        """The final documents by (source, split), read once per process."""
        if self._corpus is None:
            corpus: Corpus = {(s.name, split): ([], []) for s in self.cfg.sources for split in SPLITS}
            for source, split, _, text, digest in self.final_documents():
                texts, hashes = corpus[(source, split)]
                texts.append(text)
                hashes.append(digest)
            self._corpus = corpus
        return self._corpus

    def corpus_digest(self) -> str:
        """Identifies the final documents: each (source, split)'s content hashes, in order."""
        digest = hashlib.sha256()
        for (source, split), (_, hashes) in self.corpus().items():
            digest.update(f"{source}\t{split}\t{len(hashes)}\n".encode())
            digest.update("".join(h + "\n" for h in hashes).encode())
        return digest.hexdigest()

    def write_doc_hashes(self) -> None:
        """doc_hashes/<split>.txt: the sorted content hashes of each split (the isolation check reads them)."""
        corpus = self.corpus()
        for split in SPLITS:
            hashes = sorted(h for (_, s), (_, hs) in corpus.items() if s == split for h in hs)
            atomic_write_text(self.out / "doc_hashes" / f"{split}.txt", "".join(h + "\n" for h in hashes))

    def eval_sets_snapshot(self) -> list[dict]:
        return read_json(self.work / "eval_sets.json")["sets"]


class Stage:
    """One named step: its units, their markers and keys, how to run one, and what it reports."""

    name = ""
    single = False             # one global unit ("all"), run in the preparing process
    per_chunk = False          # units are the chunks the read step wrote ("source/NNNNN")
    after: tuple[str, ...] = ()  # steps that must come earlier in the list
    removes_documents = False  # drops documents: must come before the tokenizer

    def units(self, ctx: Context) -> list[str]:
        if self.single:
            return ["all"]
        if self.per_chunk:
            return [f"{s}/{i:05d}" for s, i in ctx.chunks()]
        raise NotImplementedError(f"step {self.name!r} must say what its units are")

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.work / self.name / f"{unit}.done"

    def key(self, ctx: Context, unit: str) -> str | None:
        """A hash of everything the unit's output depends on; None: always redo it."""
        return key_of(self.name, ctx.upstream(self, unit))

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return True

    def done_key(self, record: dict) -> str:
        """What identifies a finished unit's output, for the keys of the step after it."""
        return record["key"]

    def finished(self, ctx: Context, unit: str) -> dict | None:
        """The unit's record if its marker holds the current key and its outputs are there."""
        found = load_marker(self.marker(ctx, unit), self.key(ctx, unit))
        return found if found is not None and self.outputs_exist(ctx, unit) else None

    def run(self, ctx: Context, unit: str) -> dict:
        """Do the unit's work, write its outputs and marker; return the record."""
        started = time.perf_counter()
        key = self.key(ctx, unit)
        record = self.compute(ctx, unit)
        record.update(key=key, seconds=round(time.perf_counter() - started, 3))
        atomic_write_json(self.marker(ctx, unit), record)
        return record

    def compute(self, ctx: Context, unit: str) -> dict:
        raise NotImplementedError

    def tidy(self, ctx: Context) -> None:
        """Before a local run of this step: remove leftovers of earlier runs it would not replace."""

    def dispatch(self, ctx: Context, pending: list[str], executor: "LocalExecutor") -> None:
        """Run the pending units locally: a global unit here, others in the worker pool."""
        if self.single:
            for unit in pending:
                ctx.remember(self, unit, self.run(ctx, unit))
            return
        out = str(ctx.out)
        with RateProgress(self.name, total=len(pending), unit="units") as bar:
            def done(args: tuple, record: dict) -> None:
                ctx.remember(self, args[2], record)
                bar.advance(1)

            executor.map(run_unit, [(self.name, out, unit) for unit in pending], on_done=done)

    # ---- what the manifest says about the step -----------------------------------------
    def removals(self, ctx: Context, source: str, index: int) -> dict[int, str]:
        """{document index: reason} this step removed from one chunk."""
        return {}

    def step_stats(self, ctx: Context) -> list[StepStats]:
        """Documents in / out and removals by reason, for the manifest's ``steps`` list."""
        return []

    def pipeline_fields(self, ctx: Context, source: str) -> dict[str, Any]:
        """This step's entries in the manifest's per-source ``pipeline`` record."""
        return {}

    def report(self, ctx: Context, manifest: dict) -> None:
        """Add this step's sections to the manifest (and write its report files)."""


class ChunkFilter(Stage):
    """A per-chunk step that drops documents with a :class:`~lmforge.data.steps.PipelineStep`.

    Subclasses give the step for a source (``make_filter``) and what its decisions depend
    on (``settings``). Removals are counted per source under ``removed_<name>`` in the
    manifest, by reason; ``flags`` are notes on kept documents, reported as counts.
    """

    per_chunk = True
    removes_documents = True
    flags: tuple[str, ...] = ()

    def make_filter(self, ctx: Context, source: str) -> PipelineStep:
        raise NotImplementedError

    def settings(self, ctx: Context, source: str) -> Any:
        """Everything besides the documents that the filter's decisions depend on."""
        return None

    def key(self, ctx: Context, unit: str) -> str | None:
        return key_of(self.name, ctx.upstream(self, unit), self.settings(ctx, split_unit(unit)[0]))

    def compute(self, ctx: Context, unit: str) -> dict:
        source, index = split_unit(unit)
        chunk = read_chunk(ctx.chunk_path(source, index), ("doc_id", "text"))
        before = ctx.removed(source, index, before=self.name)
        docs = [Document(t, source, d, {"index": i}) for i, (d, t) in enumerate(zip(chunk["doc_id"], chunk["text"]))
                if i not in before]
        step = self.make_filter(ctx, source)
        started = time.perf_counter()
        for _ in step(docs):
            pass
        step.stats.seconds = time.perf_counter() - started
        removed = {str(doc.meta["index"]): doc.meta["removed"] for doc in docs if "removed" in doc.meta}
        return {"removed": removed, "stats": step.stats.to_dict()}

    def removals(self, ctx: Context, source: str, index: int) -> dict[int, str]:
        return {int(i): why for i, why in ctx.record(self, f"{source}/{index:05d}")["removed"].items()}

    def stats(self, ctx: Context) -> StepStats:
        stats = merged_stats(ctx, self, "stats")
        stats.name = self.name
        return stats

    def step_stats(self, ctx: Context) -> list[StepStats]:
        return [self.stats(ctx)]

    def pipeline_fields(self, ctx: Context, source: str) -> dict[str, Any]:
        stats = self.stats(ctx)
        fields: dict[str, Any] = {f"removed_{self.name}": dict(sorted(stats.removed[source].items()))}
        fields.update({flag: stats.flagged[source][flag] for flag in self.flags})
        return fields


def merged_stats(ctx: Context, stage: Stage, field: str) -> StepStats:
    """One step's stats summed over the stage's units."""
    total = StepStats(field)
    for unit in stage.units(ctx):
        total.merge(StepStats.from_dict(ctx.record(stage, unit)[field]))
    return total


_CONTEXTS: dict[str, Context] = {}


def run_unit(stage_name: str, out_dir: str, unit: str) -> dict:
    """Run one unit in this process (a pool worker or a cluster task) unless it is finished."""
    plan = read_json(Path(out_dir) / WORK / PLAN)
    ctx = _CONTEXTS.get(out_dir)
    if ctx is None or ctx.run_id != plan["run_id"]:
        ctx = _CONTEXTS[out_dir] = Context.load(Path(out_dir))
    stage = ctx.step(stage_name)
    return ctx.done(stage, unit) or stage.run(ctx, unit)
