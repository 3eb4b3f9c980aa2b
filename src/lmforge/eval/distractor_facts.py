"""Distractor facts: a knowledge task where which document is relevant can be learned.

Built on the verbatim facts benchmark (:mod:`lmforge.eval.facts`): invented entities, each
with a fact document and three questions whose answer the fact document continues. Here
every entity also gets **three distractor documents**, written in the questions' own
templates (question and answer, as a quiz sheet would be), each about someone else and
stating one of the entity's *wrong* answer candidates:

- the entity's cousin ("Question: In which town was the cousin of Darkquyr Nomdroumrourk
  born? Answer: The cousin of ... was born in <wrong town>"): the exact name, another person;
- a near miss: the same name with one vowel of the surname changed
  (``Nomdroumrourk`` / ``Nomdroumreurk``);
- the same surname with another first name.

The fact document states the facts in other words (:data:`lmforge.eval.facts.FACT_TEMPLATES`),
so a distractor shares more surface words with the question than the fact does, and a
frozen bag-of-tokens or sentence embedder often ranks it first; since it states a wrong
candidate right after the question's last words, a RETRO model that copies from it answers
wrong. What makes the fact document the relevant one — the whole name matters, the
question's template words and "cousin of" do not — holds for every entity, so a retriever
trained on some entities can carry it to others.

Entities are split: training questions come from the first ``train_entities``, held-out
evaluation from the other ``eval_entities`` (disjoint names; all documents of both are in
the database, which holds nothing else). Metrics on held-out questions:

- ``recall_at_1``: the top-1 retrieved chunk belongs to the entity's fact document;
  ``recall_at_k`` within the model's k neighbours;
- ``accuracy``: the RETRO model, reading the retriever's top-k as neighbours, picks the
  true answer among 4 candidates (:func:`lmforge.eval.facts.score_questions`; chance 0.25).

:func:`run_distractor_experiment` compares the frozen retrievers (MiniLM, bag of tokens) with
the query-only and the jointly trained (query + document encoder) ones of
:mod:`lmforge.retrieval.joint`, over several seeds, with entity-bootstrap intervals.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json, read_json
from lmforge.core.logging import RateProgress
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.facts import (FACT_TEMPLATES, QUESTIONS, _word, accuracy_interval, chunk_aligned_prompt, make_entities,
                                questions, score_questions)
from lmforge.nn.retro import RetroTransformer
from lmforge.retrieval.alignment import window_neighbour_tokens
from lmforge.retrieval.database import (MANIFEST, SCRATCH_MARKER, ChunkDatabase, add_documents, build_database,
                                        mark_scratch_database, remove_documents)
from lmforge.retrieval.joint import JointConfig, JointRetrieverTrainer

SOURCE = "distractor_facts"
TASK_FILE = "task.json"  # what a task database holds; written last, before the rename into place
VOWELS = "aeiouy"


# ---- the task -----------------------------------------------------------------------------------------
def _near_miss(surname: str, rng: np.random.Generator) -> str:
    """``surname`` with one vowel (not the first letter) replaced by another."""
    places = [i for i, ch in enumerate(surname) if ch in VOWELS and i > 0]
    if not places:
        return surname + "a"
    i = int(rng.choice(places))
    return surname[:i] + str(rng.choice([v for v in VOWELS if v != surname[i]])) + surname[i + 1:]


def make_distractor_setting(train_entities: int, eval_entities: int, seed: int = 0) -> dict[str, Any]:
    """Documents and questions of one seed: ``{"documents", "train_questions", "eval_questions"}``.

    Each question carries ``fact_title`` (its entity's fact document). Distractor ``j`` (1..3)
    of an entity states its ``j``-th wrong candidate of every attribute.
    """
    if train_entities < 1 or eval_entities < 1:
        raise ConfigError(f"distractor facts: need >= 1 training and evaluation entity, got {train_entities}, "
                          f"{eval_entities}")
    entities = make_entities(train_entities + eval_entities, seed)
    rng = np.random.default_rng([seed, 17])
    used = {e["name"] for e in entities}
    documents: list[tuple[str, str]] = []

    def unique(make: Callable[[], str]) -> str:
        for _ in range(1000):
            name = make()
            if name not in used:
                used.add(name)
                return name
        raise DataError("distractor facts: could not invent a new name")

    for e in entities:
        first, last = e["name"].split(" ", 1)
        documents.append((f"fact:{e['name']}", " ".join(t.format(**e) for t in FACT_TEMPLATES) + "\n"))
        subjects = [f"the cousin of {e['name']}",
                    unique(lambda: f"{first} {_near_miss(last, rng)}"),
                    unique(lambda: f"{_word(rng, 2)} {last}")]
        for j, subject in enumerate(subjects, start=1):
            lines = [prompt.format(name=subject) + answer.format(value=e["candidates"][attr][j])
                     for attr, (prompt, answer) in QUESTIONS.items()]
            documents.append((f"distractor{j}:{subject}", "\n".join(lines) + "\n"))

    def with_titles(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**item, "fact_title": f"fact:{item['entity']}"} for item in items]

    return {"documents": documents, "train_questions": with_titles(questions(entities[:train_entities])),
            "eval_questions": with_titles(questions(entities[train_entities:])), "seed": seed,
            "train_entities": train_entities, "eval_entities": eval_entities}


def build_facts_database(data_dir: str | Path, out: str | Path, embedder: str,
                         documents: list[tuple[str, str]], chunk_len: int = 64,
                         tokenizer_sha256: str | None = None) -> ChunkDatabase:
    """A database holding only ``documents`` (reused when ``out`` already holds exactly them).

    A database is built from prepared data, so the first chunk of each training source is
    taken in, then removed again: only the task's documents stay live. It is built in
    ``out.partial`` (marked as scratch, so a crash leaves nothing a rerun cannot safely clear)
    and renamed to ``out`` when complete; ``out/task.json`` records what it holds.
    ``tokenizer_sha256``: the model's tokenizer, which the prepared data's must be.
    """
    out = Path(out)
    task = {"embedder": embedder, "chunk_len": chunk_len, "documents": [name for name, _ in documents]}
    if (out / MANIFEST).is_file():
        db = ChunkDatabase(out)
        try:
            recorded = read_json(out / TASK_FILE)
        except (OSError, ValueError):
            recorded = None
        if recorded == task and (tokenizer_sha256 is None or db.manifest["tokenizer_sha256"] == tokenizer_sha256):
            return db
        raise DataError(f"{out} holds another database (other documents, embedder, chunk length or tokenizer); "
                        "remove it or choose another --out folder")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        if not (partial / SCRATCH_MARKER).is_file():
            raise DataError(f"{partial} exists and is not an unfinished task database; remove it yourself")
        shutil.rmtree(partial)  # an earlier run's unfinished build (marked scratch when it began)
    partial.mkdir(parents=True)
    mark_scratch_database(partial, "lmforge retrieval train-retriever")
    db = build_database(data_dir, partial, chunk_len=chunk_len, embedder=embedder, index_kind="flat",
                        max_tokens_per_source=chunk_len, recall_queries=0)
    if tokenizer_sha256 is not None and db.manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(f"{data_dir}: its tokenizer is not the model's; give the model's own prepared data (--data)")
    base = list(db.sources)
    add_documents(partial, documents, source=SOURCE)
    for name in base:
        remove_documents(partial, source=name)
    atomic_write_json(partial / TASK_FILE, task)
    (partial / SCRATCH_MARKER).unlink()
    os.replace(partial, out)
    return ChunkDatabase(out)


def query_chunks(tokenizer: Tokenizer, items: list[dict[str, Any]], chunk_len: int) -> np.ndarray:
    """The last chunk [n, m] of each question's prompt, left-padded with end-of-text as the model reads it."""
    out = []
    for item in items:
        out.append(chunk_aligned_prompt(tokenizer, item["prompt"], chunk_len)[-chunk_len:])
    return np.asarray(out, dtype=np.int64)


def fact_document_ids(db: ChunkDatabase, items: list[dict[str, Any]]) -> np.ndarray:
    """The database document id of each question's fact document."""
    by_name = {d["name"]: d["id"] for d in db.documents if d["source"] == SOURCE and d["alive"]}
    missing = [item["fact_title"] for item in items if item["fact_title"] not in by_name]
    if missing:
        raise DataError(f"{db.path}: fact document {missing[0]!r} is not in the database")
    return np.array([by_name[item["fact_title"]] for item in items], dtype=np.int64)


# ---- the language model's signal ---------------------------------------------------------------------------
class AnswerLossScorer:
    """Mean NLL (nats per token) of each question's true answer with one database chunk as its neighbour.

    The question is padded to end on a chunk boundary (as :func:`score_questions` reads it);
    its chunk's single neighbour is the candidate chunk, aligned as the model aligns.
    """

    def __init__(self, model: RetroTransformer, tokenizer: Tokenizer, db: ChunkDatabase,
                 items: list[dict[str, Any]], batch_size: int = 64):
        self.model, self.db, self.batch_size = model, db, batch_size
        m = model.retro.chunk_len
        self.prompts, self.answers = [], []
        for item in items:
            prompt = tokenizer.encode(item["prompt"])
            answer = tokenizer.encode(item["prompt"] + item["candidates"][item["answer"]])[len(prompt):]
            padded = chunk_aligned_prompt(tokenizer, item["prompt"], m)
            if len(padded) != m or not answer or len(answer) >= m:
                raise DataError(f"question {item['prompt']!r}: prompt of one chunk and a shorter answer needed")
            self.prompts.append(padded)
            self.answers.append(answer)
        self.eos = tokenizer.eos_id
        self.pairs_scored = 0

    @torch.no_grad()
    def __call__(self, rows: np.ndarray, chunk_ids: np.ndarray) -> np.ndarray:
        model, m = self.model, self.model.retro.chunk_len
        model.eval()
        out = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), self.batch_size):
            r = rows[start:start + self.batch_size]
            ids = chunk_ids[start:start + self.batch_size]
            longest = max(len(self.answers[i]) for i in r)
            tokens = np.full((len(r), m + longest), self.eos, dtype=np.int64)
            mask = np.zeros((len(r), longest), dtype=bool)
            for j, i in enumerate(r):
                tokens[j, :m] = self.prompts[i]
                tokens[j, m:m + len(self.answers[i])] = self.answers[i]
                mask[j, :len(self.answers[i])] = True
            neighbours = window_neighbour_tokens(self.db, tokens, ids[:, None, None], model.retro.align_neighbours)
            inputs = torch.from_numpy(tokens[:, :-1])
            logits = model(inputs, neighbours=torch.from_numpy(neighbours)).logits[:, m - 1:].float()
            nll = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(tokens[:, m:]).flatten(),
                                  reduction="none").view(len(r), longest)
            maskt = torch.from_numpy(mask)
            out[start:start + len(r)] = ((nll * maskt).sum(1) / maskt.sum(1)).double().numpy()
        self.pairs_scored += len(rows)
        return out


class MemoScorer:
    """A scorer that remembers every (question, chunk) loss: the LM is frozen, so runs can share them."""

    def __init__(self, scorer: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        self.scorer, self.memo = scorer, {}

    def __call__(self, rows: np.ndarray, chunk_ids: np.ndarray) -> np.ndarray:
        keys = [(int(r), int(c)) for r, c in zip(rows, chunk_ids)]
        todo = sorted({k for k in keys if k not in self.memo})
        if todo:
            pairs = np.array(todo, dtype=np.int64)
            self.memo.update(zip(todo, self.scorer(pairs[:, 0], pairs[:, 1]).tolist()))
        return np.array([self.memo[k] for k in keys], dtype=np.float64)


# ---- evaluation -------------------------------------------------------------------------------------------
class _RetrieverView:
    """The database as :func:`score_questions` reads it, with retrieval done by ``retriever``."""

    def __init__(self, db: ChunkDatabase, retriever: Any):
        self._db, self._retriever = db, retriever

    def retrieve(self, chunks: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        return self._retriever.retrieve(chunks, k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def evaluate_retriever(model: RetroTransformer, tokenizer: Tokenizer, db: ChunkDatabase, items: list[dict[str, Any]],
                       retriever: Any | None = None) -> dict[str, Any]:
    """recall@1, recall@k of the fact document and answer accuracy on ``items`` (module docs).

    ``retriever``: anything with ``retrieve(chunks, k)``; None: the database's own (frozen) index.
    """
    retriever = retriever if retriever is not None else db
    k = model.retro.n_neighbours
    chunks = query_chunks(tokenizer, items, db.chunk_len)
    ids = retriever.retrieve(chunks, k)
    docs = np.where(ids >= 0, np.asarray(db.doc)[np.maximum(ids, 0), 0], -1)
    gold = fact_document_ids(db, items)
    top1 = (docs[:, 0] == gold).astype(float)
    topk = (docs == gold[:, None]).any(axis=1).astype(float)
    answered = score_questions(model, tokenizer, items, _RetrieverView(db, retriever), k)
    return {"recall_at_1": float(top1.mean()), "recall_at_k": float(topk.mean()), "k": k,
            "accuracy": answered["accuracy"], "questions": len(items),
            "recall_scores": top1.tolist(), "accuracy_scores": answered["scores"],
            "entities": [item["entity"] for item in items]}


def summarise(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Pooled recall@1 and accuracy per retriever, with 95% entity-bootstrap intervals over all seeds."""
    out: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {}
        for metric, key in (("recall_at_1", "recall_scores"), ("accuracy", "accuracy_scores")):
            scores, clusters = [], []
            for result in per_seed:
                scores += result[name][key]
                clusters += [(result["seed"], e) for e in result[name]["entities"]]
            low, high = accuracy_interval(scores, clusters)
            entry[metric] = {"mean": float(np.mean(scores)), "interval": [low, high],
                             "per_seed": [r[name][metric] for r in per_seed]}
        out[name] = entry
    return out


RETRIEVERS = ("frozen_minilm", "frozen_bag_of_tokens", "query_only", "joint")


def run_distractor_experiment(model: RetroTransformer, tokenizer: Tokenizer, data_dir: str | Path, out: str | Path,
                              seeds: list[int], cfg: JointConfig, train_entities: int = 200, eval_entities: int = 60,
                              embedder: str = "bag_of_tokens:128", retrievers: tuple[str, ...] = RETRIEVERS,
                              log: Callable[[str], None] = print, resume: str = "auto") -> dict[str, Any]:
    """Every retriever of ``retrievers`` on every seed; writes ``out/distractor_facts.json``."""
    unknown = sorted(set(retrievers) - set(RETRIEVERS))
    if unknown:
        raise ConfigError(f"unknown retriever(s) {unknown} (known: {', '.join(RETRIEVERS)})")
    out = Path(out)
    per_seed = []
    for seed in seeds:
        setting = make_distractor_setting(train_entities, eval_entities, seed)
        folder = out / f"seed{seed}"
        result: dict[str, Any] = {"seed": seed}
        m = model.retro.chunk_len
        db = build_facts_database(data_dir, folder / "db_trainable", embedder, setting["documents"], m, tokenizer.sha256)
        result["database"] = {"chunks": int(np.asarray(db.alive).sum()), "documents": len(setting["documents"]),
                              "embedder": db.manifest["embedder"]}
        if "frozen_minilm" in retrievers:
            start = time.perf_counter()
            mini = build_facts_database(data_dir, folder / "db_minilm", "minilm", setting["documents"], m,
                                        tokenizer.sha256)
            log(f"seed {seed}: minilm database ready in {time.perf_counter() - start:.1f} s")
            result["frozen_minilm"] = evaluate_retriever(model, tokenizer, mini, setting["eval_questions"])
        if "frozen_bag_of_tokens" in retrievers:
            result["frozen_bag_of_tokens"] = evaluate_retriever(model, tokenizer, db, setting["eval_questions"])
        scorer = MemoScorer(AnswerLossScorer(model, tokenizer, db, setting["train_questions"]))
        train_chunks = query_chunks(tokenizer, setting["train_questions"], db.chunk_len)
        for name, documents in (("query_only", False), ("joint", True)):
            if name not in retrievers:
                continue
            run_cfg = replace(cfg, train_documents=documents, seed=seed)
            trainer = JointRetrieverTrainer(db, train_chunks, scorer, run_cfg, folder / name, log=log)
            start = time.perf_counter()
            with RateProgress(f"seed {seed} {name} retriever", total=run_cfg.steps, unit="step") as bar:
                trainer.progress = lambda n, _bar=bar, **fields: _bar.advance(n, **{k: str(v) for k, v in fields.items()})
                history = trainer.train(resume=resume)
            seconds = time.perf_counter() - start
            result[name] = evaluate_retriever(model, tokenizer, db, setting["eval_questions"], trainer.retriever())
            result[name]["training"] = {**history, "seconds": round(seconds, 1), "config": asdict(run_cfg)}
            # Training questions too: how much of the gain is memorised rather than carried over.
            train_eval = evaluate_retriever(model, tokenizer, db, setting["train_questions"][:90], trainer.retriever())
            result[name]["train_recall_at_1"] = train_eval["recall_at_1"]
            log(f"seed {seed} {name}: recall@1 {result[name]['recall_at_1']:.3f} accuracy "
                f"{result[name]['accuracy']:.3f} ({seconds:.0f} s, {len(history['refreshes'])} refreshes)")
        for name in retrievers:
            if name in result and name.startswith("frozen"):
                log(f"seed {seed} {name}: recall@1 {result[name]['recall_at_1']:.3f} accuracy "
                    f"{result[name]['accuracy']:.3f}")
        per_seed.append(result)
    names = [n for n in RETRIEVERS if n in retrievers]
    summary = {"summary": summarise(per_seed, names), "per_seed": per_seed, "seeds": list(seeds),
               "train_entities": train_entities, "eval_entities": eval_entities, "config": asdict(cfg)}
    atomic_write_json(out / "distractor_facts.json", summary)
    return summary
