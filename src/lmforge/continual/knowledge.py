"""Knowledge in the weights vs knowledge retrieved: ``lmforge continual-knowledge CONFIG``.

The same new knowledge — the invented facts of :mod:`lmforge.eval.facts` (24 entities, three
attributes each, 72 four-way questions, chance 25%) — goes into a model two ways:

- **into the weights**: a dense parent is continued on the fact documents (``--init-from``), with
  each replay share of the parent's own data (``replay_shares``), for ``steps`` steps;
- **into the database**: ``retrieval add`` of the same documents to a RETRO model's database,
  and ``retrieval remove`` of them again.

Measured for each route: fact accuracy before and after (likelihood of the true answer, no
retrieval for the dense model), the change of held-out bits-per-byte on the parent's domains
(forgetting), and seconds. Then the way back: the facts model (replay share ``forget_from``) is
continued on the parent's data alone for ``forget_steps`` steps, and its fact accuracy every
``probe_every`` steps shows what it takes to make weights forget what ``retrieval remove`` undoes
at once.

The fact documents become a data source of their own (a folder of ``.txt`` files, kind ``files``)
prepared with the parent's tokenizer (``data.tokenizer_from``), with the prose quality rules and
near-deduplication off (the documents are short and share their templates, so both would drop
them) and a held-out fraction of ``FACTS_HELDOUT_FRACTION``: the pipeline needs a fraction in
(0, 1), and every fact must be trained on, since the questions ask about all of them. That all
24 documents landed in the training split is checked after preparation.

Everything goes to ``runs/<name>_knowledge/`` (the fact text, its prepared data, ``knowledge.json``
and ``knowledge.md``); the runs are ``runs/<name>_facts_replay<pct>`` and ``runs/<name>_forget``.
Finished runs are reused, interrupted ones resumed. Fact accuracy during training is logged by a
callback as ``{"kind": "facts", ...}`` records in each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lmforge.core.config import Config, apply_overrides, read_yaml
from lmforge.core.errors import CheckpointError, ConfigError, DataError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.core.logging import get_logger
from lmforge.core.metrics_file import append_metrics, read_metrics
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.facts import SOURCE, fact_documents, make_entities, questions, score_questions
from lmforge.train.callbacks import Callback

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer

log = get_logger(__name__)
# The smallest held-out share the pipeline takes is above 0; at 1e-6 a document is held out with
# probability one in a million (the split is by content hash), and prepare_facts_data checks it.
FACTS_HELDOUT_FRACTION = 1e-6
FACTS_SOURCE = "facts"
# What a continued run keeps of its parent's resolved config; data, init and replay are its own.
_INHERITED = ("model", "optim", "train", "eval")


@dataclass
class KnowledgeConfig(Config):
    dense: str = "runs/retro_baseline"     # the dense parent: run directory or checkpoint
    retro: str | None = "runs/retro_demo"  # a RETRO run or checkpoint; None: the dense route only
    database: str | None = None            # its database; None: the run's retrieval.db
    entities: int = 24
    seed: int = 0                          # of the invented entities
    steps: int = 100                       # continuation on the facts
    replay_shares: list[float] = field(default_factory=lambda: [0.0, 0.5])
    optim: dict[str, Any] = field(default_factory=dict)   # optim keys over the parent's, for every continuation
    train: dict[str, Any] = field(default_factory=dict)   # train keys over the parent's (batch_size, log_every...)
    probe_every: int = 10                  # fact accuracy every this many steps (and at the first and last)
    forget_steps: int = 200                # the facts model continued on the parent's data; 0: skipped
    forget_from: float = 0.0               # which replay share's facts model is made to forget
    forget_probe_every: int | None = None  # fact accuracy in the forgetting run; None: probe_every

    def __post_init__(self) -> None:
        if self.entities < 1:
            raise ValueError(f"entities must be >= 1, got {self.entities}")
        if self.steps < 1 or self.probe_every < 1 or self.forget_steps < 0 or (self.forget_probe_every or 1) < 1:
            raise ValueError("steps, probe_every and forget_probe_every must be >= 1, forget_steps >= 0")
        if not self.replay_shares or any(not 0.0 <= r < 1.0 for r in self.replay_shares):
            raise ValueError(f"replay_shares: values in [0, 1), got {self.replay_shares}")
        if self.forget_steps and self.forget_from not in self.replay_shares:
            raise ValueError(f"forget_from ({self.forget_from}) must be one of replay_shares {self.replay_shares}")
        for key in ("steps", "init", "name"):
            if key in self.train:
                raise ValueError(f"train: {key!r} is set by the experiment (steps: knowledge.steps)")


# ---- accuracy with an interval ------------------------------------------------------------------

def wilson_interval(correct: int, total: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    if total < 1:
        raise ValueError("wilson_interval: no trials")
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def accuracy_record(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`score_questions`'s result with the count of correct answers and a 95% Wilson interval."""
    correct = round(result["accuracy"] * result["questions"])
    return {**result, "correct": correct, "interval": wilson_interval(correct, result["questions"])}


# ---- fact accuracy while training ---------------------------------------------------------------

class FactProbe(Callback):
    """Scores the fact questions (no retrieval) at step 0 of a fresh run, every ``every`` steps and
    at the last, logging ``{"kind": "facts", "step", "accuracy", ..., "train_seconds"}`` records.
    ``train_seconds`` sums the steps' own time (``step_time_s``): evaluation, probes and
    checkpoints are not in it. It is kept in checkpoints, so a resumed run continues the sum."""

    def __init__(self, tokenizer: Tokenizer, items: list[dict[str, Any]], every: int):
        self.tokenizer, self.items, self.every = tokenizer, items, every
        self.train_seconds = 0.0

    def _probe(self, trainer: "Trainer") -> None:
        if not (trainer.is_main or trainer.eval_on_all_ranks):
            return
        model = trainer.eval_model
        result = accuracy_record(score_questions(model, self.tokenizer, self.items, None))
        trainer.model.train()
        if trainer.is_main:
            append_metrics(trainer.run_dir / "metrics.jsonl",
                           {"kind": "facts", "step": trainer.step, "train_seconds": self.train_seconds, **result})

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.step == 0:
            self._probe(trainer)

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        self.train_seconds += float(metrics["step_time_s"])
        if trainer.step % self.every == 0 or trainer.step == trainer.total_steps:
            self._probe(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))


# ---- the fact documents as a data source --------------------------------------------------------

def write_fact_sources(folder: Path, entities: list[dict[str, Any]]) -> list[Path]:
    """One ``.txt`` file per fact document (a ``files`` source reads each file as a document)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, text) in enumerate(fact_documents(entities)):
        path = folder / f"fact_{i:03d}.txt"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        paths.append(path)
    stale = sorted(set(folder.glob("*.txt")) - set(paths))
    if stale:
        raise DataError(f"{folder} holds other text files than the fact documents ({stale[0].name}); "
                        "remove them or choose another output folder")
    return paths


def facts_data_section(text_dir: Path, out_dir: Path, tokenizer_from: Path) -> dict[str, Any]:
    """The data config of the fact documents (see the module docstring for each choice)."""
    return {
        "out_dir": str(out_dir),
        "tokenizer_from": str(tokenizer_from),
        "heldout_fraction": FACTS_HELDOUT_FRACTION,
        "num_workers": 1,
        "quality": {"enabled": False},    # short templated documents: the prose rules drop them
        "near_dedup": {"enabled": False},  # they share their templates: near-duplicates by design
        "sources": [{"name": FACTS_SOURCE, "kind": "files", "path": str(text_dir), "glob": "*.txt",
                     "content": "prose"}],
    }


def prepare_facts_data(section: dict[str, Any], n_documents: int) -> dict[str, Any]:
    """Prepare the fact documents; every one of them must be in the training split."""
    from lmforge.data.config import DataConfig
    from lmforge.data.prepare import prepare_data

    manifest = prepare_data(DataConfig.from_dict(section, path="data"))
    splits = manifest["sources"].get(FACTS_SOURCE, {})
    train_docs = int(splits.get("train", {}).get("documents", 0))
    heldout_docs = int(splits.get("heldout", {}).get("documents", 0))
    if train_docs != n_documents or heldout_docs:
        raise DataError(f"{section['out_dir']}: {train_docs} of the {n_documents} fact documents are in the "
                        f"training split ({heldout_docs} held out); every fact must be trained on")
    return manifest


# ---- the runs -----------------------------------------------------------------------------------

def _resolved_config(target: str, key: str) -> tuple[dict[str, Any], Path]:
    """The resolved run config of the run or checkpoint ``target`` (config key ``key``), and the checkpoint."""
    from lmforge.nn.loading import resolve_checkpoint

    if not Path(target).exists():
        raise ConfigError(f"{key}: {target} is no run or checkpoint (train it first; see configs/continual_facts.yaml)")
    try:
        checkpoint = resolve_checkpoint(target)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}: {exc}") from None
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"{key}: {checkpoint}/config.yaml is not a run config (no model section)")
    return config, checkpoint


def continued_config(parent: dict[str, Any], name: str, runs_dir: str, data: dict[str, Any], init_path: str,
                     steps: int, cfg: KnowledgeConfig, replay_share: float = 0.0) -> dict[str, Any]:
    """A run config continuing ``init_path`` on ``data``: the parent's model, optimizer (with
    ``cfg.optim`` over it), training and evaluation settings; evaluated at its start and end."""
    run = {key: copy.deepcopy(parent[key]) for key in _INHERITED if key in parent}
    run.update(name=name, runs_dir=runs_dir, data=data, init={"path": init_path})
    run["optim"] = {**run.get("optim", {}), **cfg.optim}
    run["train"] = {**run.get("train", {}), "eval_every": 0, "checkpoint_every": steps, "keep_checkpoints": 1,
                    "tensorboard": False, **cfg.train, "steps": steps}
    if replay_share > 0:
        run["replay"] = {"share": replay_share}  # the parent's data, in the parent's mixture
    return run


def _train(config: dict[str, Any], probe: FactProbe, seconds_file: Path) -> Path:
    """Train (or reuse a finished run; resume an interrupted one); record its wall seconds."""
    from lmforge.train.assembly import train_run
    from lmforge.train.config import RunConfig

    cfg = RunConfig.from_dict(config)
    run_dir = Path(cfg.runs_dir) / cfg.name
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    if (run_dir / "eval" / "final.json").is_file():
        done = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        settings = {"init.path": ((done.get("init") or {}).get("path"), cfg.init.path),
                    "replay.share": ((done.get("replay") or {}).get("share"), cfg.replay.share if cfg.replay else None),
                    "train.steps": ((done.get("train") or {}).get("steps"), cfg.train.steps)}
        differs = [key for key, (then, now) in settings.items() if then != now]
        if differs:
            raise ConfigError(f"{run_dir} finished earlier with other settings ({', '.join(differs)}); "
                              "remove it, or give the experiment another name")
        log.info("%s finished earlier: reused", run_dir)
        return run_dir
    resume = "auto" if (run_dir / "metrics.jsonl").exists() else None
    log.info("knowledge experiment: run %s (%d steps)", cfg.name, cfg.train.steps)
    started = time.perf_counter()
    train_run(cfg, resume, extra_callbacks={"fact_probe": probe})
    seconds[cfg.name] = time.perf_counter() - started + (seconds.get(cfg.name, 0.0) if resume else 0.0)
    atomic_write_json(seconds_file, seconds)
    return run_dir


def run_summary(run_dir: Path, wall_seconds: float | None) -> dict[str, Any]:
    """Fact accuracy per probe, held-out bpb at the start and end, and the change per domain."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    facts = {r["step"]: r for r in records if r.get("kind") == "facts"}  # the last per step
    if len(evals) < 2 or not facts:
        raise DataError(f"{run_dir}/metrics.jsonl: no start and end evaluation or no facts records; "
                        "was the run trained by the knowledge experiment?")
    curve = [{key: facts[step][key] for key in ("step", "accuracy", "correct", "questions", "interval",
                                                 "mean_margin_nats", "train_seconds")} for step in sorted(facts)]
    start, end = evals[0], evals[-1]
    return {"run": str(run_dir), "facts": curve, "accuracy_before": curve[0], "accuracy_after": curve[-1],
            "bpb_before": start["bpb"], "bpb_after": end["bpb"], "bpb_interval_after": end.get("bpb_interval", {}),
            "change_from_parent": end.get("change_from_parent", {}),
            "train_seconds": curve[-1]["train_seconds"], "wall_seconds": wall_seconds}


# ---- the retrieval route ------------------------------------------------------------------------

def retrieval_route(retro: str, database: str | None, entities: list[dict[str, Any]],
                    max_tokens: int | None = None) -> dict[str, Any]:
    """``retrieval add`` then ``retrieval remove`` of the fact documents, timed, with fact accuracy and
    held-out bits-per-byte (with and without retrieval) before, after add and after remove.

    The steps of :func:`lmforge.eval.facts.run_facts_benchmark`, with the clock and the held-out
    evaluation between them. The database ends as it began (the facts are added, then removed)."""
    from lmforge.core.run_marker import resolve_data_dir
    from lmforge.eval.retrieval_eval import HeldoutRetrieval, evaluate_retrieval
    from lmforge.nn.loading import load_model
    from lmforge.nn.retro import RetroTransformer
    from lmforge.retrieval.database import ChunkDatabase, add_documents, remove_documents

    model, config, checkpoint = load_model(retro)
    if not isinstance(model, RetroTransformer):
        raise ConfigError(f"knowledge.retro: {checkpoint} is not a RETRO model (its model config has no retro section)")
    db_path = database or (config.get("retrieval") or {}).get("db")
    if not db_path:
        raise ConfigError(f"knowledge.database: {checkpoint}'s config names no retrieval.db; give the database")
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    db = ChunkDatabase(db_path)
    if db.manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise DataError(f"knowledge.database: {db_path} was built with another tokenizer than {checkpoint}'s")
    if any(d["alive"] for d in db.documents if d["source"] == SOURCE):
        raise DataError(f"{db_path} already holds live {SOURCE!r} documents; remove them first "
                        f"(lmforge retrieval remove {db_path} --source {SOURCE})")
    items, embedder = questions(entities), db.embedder
    data_dir = resolve_data_dir(checkpoint, config["data"]["out_dir"])
    max_tokens = max_tokens or int(config.get("eval", {}).get("max_tokens_per_domain", 16384))
    heldout = HeldoutRetrieval(db, data_dir, int(config["train"]["seq_len"]), max_tokens)

    def measure(database: ChunkDatabase | None) -> dict[str, Any]:
        state: dict[str, Any] = {"accuracy": accuracy_record(score_questions(model, tokenizer, items, database))}
        if database is not None:
            heldout.db = database  # same embedder: the held-out chunks' vectors stay valid
            bpb = evaluate_retrieval(model, heldout, fractions=(1.0,), buckets=False)["bpb"]
            state["bpb_without_retrieval"], state["bpb_with_retrieval"] = bpb["none"], bpb["db_1"]
        return state

    def reopen() -> ChunkDatabase:
        fresh = ChunkDatabase(db_path)
        fresh.set_embedder(embedder)
        return fresh

    result: dict[str, Any] = {"run": str(checkpoint), "database": str(db_path), "no_retrieval": measure(None),
                              "before_add": measure(db)}
    started = time.perf_counter()
    added = add_documents(db_path, fact_documents(entities), source=SOURCE, embedder=embedder)
    result["add_seconds"] = time.perf_counter() - started
    result["added_chunks"] = added["chunks"]
    result["after_add"] = measure(reopen())
    started = time.perf_counter()
    removed = remove_documents(db_path, source=SOURCE)
    result["remove_seconds"] = time.perf_counter() - started
    result["removed"] = {k: v for k, v in removed.items() if isinstance(v, (int, float, str))}
    result["after_remove"] = measure(reopen())
    return result


# ---- the experiment -----------------------------------------------------------------------------

def run_knowledge(config_path: str, overrides: list[str], out_dir: str | None = None) -> Path:
    """Run (or reuse) every part of the comparison; write knowledge.json and knowledge.md; return
    the output folder."""
    from lmforge.train.continuation import PARENT_PREFIX, parent_data_dir

    raw = apply_overrides(read_yaml(config_path), overrides)
    if "knowledge" not in raw:
        raise ConfigError(f"{config_path}: no knowledge: section (see configs/continual_facts.yaml)")
    cfg = KnowledgeConfig.from_dict(raw["knowledge"], path="knowledge")
    name, runs_dir = str(raw.get("name", "knowledge")), str(raw.get("runs_dir", "runs"))
    out = Path(out_dir or Path(runs_dir) / f"{name}_knowledge")
    # Everything named is checked before anything is written.
    parent, parent_checkpoint = _resolved_config(cfg.dense, "knowledge.dense")
    if parent["model"].get("family", "transformer") != "transformer":
        raise ConfigError(f"knowledge.dense: {parent_checkpoint} is a {parent['model']['family']!r} model; "
                          "the weights route continues a dense (transformer) model")
    if cfg.retro is not None:
        _resolved_config(cfg.retro, "knowledge.retro")
    parent_data = parent_data_dir(cfg.dense)
    out.mkdir(parents=True, exist_ok=True)
    seconds_file = out / "seconds.json"
    tokenizer = Tokenizer.load(parent_checkpoint / "tokenizer.json")
    entities = make_entities(cfg.entities, cfg.seed)
    items = questions(entities)

    write_fact_sources(out / "facts_text", entities)
    facts_data = facts_data_section(out / "facts_text", out / "facts_data", parent_data)
    prepare_facts_data(facts_data, cfg.entities)

    result: dict[str, Any] = {"entities": cfg.entities, "seed": cfg.seed, "questions": len(items), "chance": 0.25,
                              "parent": str(parent_checkpoint), "parent_data": str(parent_data),
                              "facts_data": facts_data, "config": cfg.to_dict(), "weights": {}}
    facts_runs = {}
    for share in cfg.replay_shares:
        run_name = f"{name}_facts_replay{round(100 * share)}"
        run_config = continued_config(parent, run_name, runs_dir, facts_data, cfg.dense, cfg.steps, cfg, share)
        facts_runs[share] = _train(run_config, FactProbe(tokenizer, items, cfg.probe_every), seconds_file)
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    for share, run_dir in facts_runs.items():
        result["weights"][f"replay_{share:g}"] = {"replay": share, **run_summary(run_dir, seconds.get(run_dir.name))}

    if cfg.forget_steps:
        source = facts_runs[cfg.forget_from]
        data = copy.deepcopy(parent["data"])
        data["out_dir"] = str(parent_data)  # where the parent's data was found (its config may be relative)
        run_config = continued_config(parent, f"{name}_forget", runs_dir, data, str(source), cfg.forget_steps, cfg)
        run_dir = _train(run_config, FactProbe(tokenizer, items, cfg.forget_probe_every or cfg.probe_every),
                         seconds_file)
        seconds = json.loads(seconds_file.read_text())
        forget = run_summary(run_dir, seconds.get(run_dir.name))
        dense_bpb = result["weights"][f"replay_{cfg.forget_from:g}"]["bpb_before"]  # the parent's, as parent/<d>
        forget["change_from_dense_parent"] = {d: v - dense_bpb[f"{PARENT_PREFIX}{d}"] for d, v in forget["bpb_after"].items()
                                              if f"{PARENT_PREFIX}{d}" in dense_bpb}
        result["forget"] = {"from": str(source), "from_replay": cfg.forget_from, **forget}

    if cfg.retro is not None:
        max_tokens = int(parent.get("eval", {}).get("max_tokens_per_domain", 16384))
        result["retrieval"] = retrieval_route(cfg.retro, cfg.database, entities, max_tokens)

    atomic_write_json(out / "knowledge.json", result)
    atomic_write_text(out / "knowledge.md", knowledge_markdown(result))
    return out


# ---- the table ----------------------------------------------------------------------------------

def _acc(record: dict[str, Any]) -> str:
    low, high = record["interval"]
    return f"{record['accuracy']:.3f} [{low:.2f}, {high:.2f}]"


def _changes(change: dict[str, float], domains: list[str]) -> str:
    return " / ".join(f"{change[d]:+.3f}" if d in change else "–" for d in domains)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g} s" if value < 10 else f"{value:.0f} s"


def _round_step(step: int) -> bool:
    """1, 2 or 5 times a power of ten: the forgetting curve's steps shown in the main table."""
    digits = str(step).rstrip("0")
    return step > 0 and digits in ("1", "2", "5")


def knowledge_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table, then the accuracy curves of the continued runs."""
    weights = result["weights"]
    first = next(iter(weights.values()))
    old = sorted(d for d in first["change_from_parent"])           # parent/<domain> of the facts runs
    plain = [d.removeprefix("parent/") for d in old]
    lines = [f"Facts: {result['entities']} invented entities, {result['questions']} questions with 4 candidates "
             f"(chance {result['chance']}); accuracy with its 95% Wilson interval. Forgetting: change of held-out "
             f"bits-per-byte on the parent's domains ({' / '.join(plain)}).", "",
             "| route | fact accuracy before | after | held-out bpb change (" + " / ".join(plain) + ") | seconds |",
             "|---|---|---|---|---|"]
    for summary in weights.values():
        steps = summary["facts"][-1]["step"]
        lines.append(f"| weights: continue dense on the facts, {100 * summary['replay']:g}% replay, {steps} steps "
                     f"| {_acc(summary['accuracy_before'])} | {_acc(summary['accuracy_after'])} "
                     f"| {_changes(summary['change_from_parent'], old)} "
                     f"| {_seconds(summary['train_seconds'])} training ({_seconds(summary['wall_seconds'])} wall) |")
    retrieval, notes = result.get("retrieval"), []
    if retrieval:
        before, added, removed = retrieval["before_add"], retrieval["after_add"], retrieval["after_remove"]
        change = {d: added["bpb_with_retrieval"][d] - before["bpb_with_retrieval"][d] for d in plain}
        lines.append(f"| database: RETRO `retrieval add` ({retrieval['added_chunks']} chunks) "
                     f"| {_acc(before['accuracy'])} | {_acc(added['accuracy'])} "
                     f"| 0 (weights unchanged); with retrieval {_changes(change, plain)} "
                     f"| {_seconds(retrieval['add_seconds'])} |")
        change = {d: removed["bpb_with_retrieval"][d] - before["bpb_with_retrieval"][d] for d in plain}
        lines.append(f"| database: RETRO `retrieval remove` | {_acc(added['accuracy'])} "
                     f"| {_acc(removed['accuracy'])} | with retrieval, from before add: {_changes(change, plain)} "
                     f"| {_seconds(retrieval['remove_seconds'])} |")
        notes.append(f"RETRO's accuracy without retrieval: {_acc(retrieval['no_retrieval']['accuracy'])}; its "
                     f"\"before\" is with retrieval from the database without the facts. Held-out bpb with "
                     f"retrieval before add: {_changes(before['bpb_with_retrieval'], plain).replace('+', '')}.")
    forget = result.get("forget")
    if forget:
        last = forget["facts"][-1]
        for point in [p for p in forget["facts"][1:] if _round_step(p["step"]) or p is last]:
            change = ""
            if point is last:
                change = (f"{_changes(forget['change_from_parent'], plain)} from the facts model, "
                          f"{_changes(forget['change_from_dense_parent'], plain)} from the dense parent")
            lines.append(f"| weights: the facts model ({100 * forget['from_replay']:g}% replay) continued on the "
                         f"parent's data, {point['step']} steps | {_acc(forget['accuracy_before'])} | {_acc(point)} "
                         f"| {change} | {_seconds(point['train_seconds'])} training |")
    steps = sorted({p["step"] for summary in weights.values() for p in summary["facts"]})
    lines += ["", *notes, *([""] if notes else []), "Fact accuracy by step (no retrieval):", "",
              "| run | " + " | ".join(f"step {step}" for step in steps) + " |", "|---|" + "---|" * len(steps)]
    for summary in weights.values():
        by_step = {p["step"]: f"{p['accuracy']:.3f}" for p in summary["facts"]}
        lines.append(f"| facts, {100 * summary['replay']:g}% replay | "
                     + " | ".join(by_step.get(step, "") for step in steps) + " |")
    if forget:
        lines.append("")
        lines.append("| forgetting run | " + " | ".join(f"step {p['step']}" for p in forget["facts"]) + " |")
        lines.append("|---|" + "---|" * len(forget["facts"]))
        lines.append("| parent's data, no facts | " + " | ".join(f"{p['accuracy']:.3f}" for p in forget["facts"]) + " |")
    return "\n".join(lines) + "\n"
