"""Downstream tasks small models can score, built from each domain's held-out documents.

Two likelihood-ranked multiple-choice constructions, fixed by a seed:

- ``next_line`` (prose and verse): the context is the ``context_lines`` non-empty lines
  before a target line of at least ``min_chars`` characters; the candidates are the true
  line and ``n_distractors`` other lines of the same domain's held-out text, of similar
  length (within a factor of 2), none equal to the target.
- ``next_statement`` (Python): a line inside a function body; the context runs from the
  ``def`` line (at most ``context_lines`` lines) to the line before; distractors are
  statements from other functions, re-indented to the target's indentation so whitespace
  gives nothing away.

Each candidate is scored as log p(candidate + newline | context) with the model; ``acc``
takes the highest total log-probability, ``acc_norm`` the highest per byte (so long and
short candidates compete fairly). Chance is 1 / (1 + n_distractors). Because the documents
come from the held-out split, no item's text was trained on, by construction; each task
records a content hash of its items so a result names exactly what was evaluated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import numpy as np

from lmforge.data.ngrams import text_ngram_hashes
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.scoring import score_continuations

_DEF = re.compile(r"^(\s*)(async\s+)?def\s+\w+")


@dataclass(frozen=True)
class TaskItem:
    context: str
    choices: list[str]
    answer: int

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps([self.context, self.choices]).encode()).hexdigest()


def heldout_documents(data_dir: Path, source: str, tokenizer: Tokenizer, max_docs: int | None = 200,
                      split: str = "heldout") -> list[str]:
    """The documents of ``source`` as text (decoded from the shards, exact for byte-level BPE)."""
    shards = ShardSet(data_dir, split, source)
    ends = list(shards.doc_offsets[1:]) + [len(shards)]
    docs = []
    for start, end in list(zip(shards.doc_offsets, ends))[:max_docs]:
        ids = shards.get(int(start), int(end - start)).tolist()
        if ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        docs.append(tokenizer.decode(ids))
    return docs


def _similar(pool: list[str], target: str, count: int, rng: random.Random) -> list[str] | None:
    near = [line for line in pool if line.strip() != target.strip() and 0.5 <= len(line) / max(len(target), 1) <= 2]
    unique = sorted(set(near))
    if len(unique) < count:
        return None
    return rng.sample(unique, count)


def _finish(context: str, target: str, distractors: list[str], rng: random.Random) -> TaskItem:
    choices = [target, *distractors]
    rng.shuffle(choices)
    return TaskItem(context, choices, choices.index(target))


def next_line_items(docs: list[str], n_items: int, seed: int, context_lines: int = 4, n_distractors: int = 3,
                    min_chars: int = 12) -> list[TaskItem]:
    rng = random.Random(seed)
    lines_per_doc = [[line for line in doc.splitlines() if line.strip()] for doc in docs]
    pool = [line for lines in lines_per_doc for line in lines if len(line.strip()) >= min_chars]
    candidates = [(d, i) for d, lines in enumerate(lines_per_doc) for i in range(context_lines, len(lines))
                  if len(lines[i].strip()) >= min_chars]
    rng.shuffle(candidates)
    items = []
    for d, i in candidates:
        if len(items) == n_items:
            break
        lines = lines_per_doc[d]
        distractors = _similar(pool, lines[i], n_distractors, rng)
        if distractors is not None:
            items.append(_finish("\n".join(lines[i - context_lines:i]) + "\n", lines[i], distractors, rng))
    return items


def _function_statements(doc: str) -> list[tuple[list[str], int]]:
    """(lines of a function, index of a body statement) pairs, one per non-comment body line."""
    lines = doc.splitlines()
    out = []
    for start, line in enumerate(lines):
        match = _DEF.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        body = [k for k in range(start + 1, end) if lines[k].strip() and not lines[k].strip().startswith("#")]
        out += [(lines[start:end], k - start) for k in body]
    return out


def next_statement_items(docs: list[str], n_items: int, seed: int, context_lines: int = 6, n_distractors: int = 3,
                         min_chars: int = 8) -> list[TaskItem]:
    rng = random.Random(seed)
    statements = [s for doc in docs for s in _function_statements(doc)]
    pool = sorted({fn[k].strip() for fn, k in statements if len(fn[k].strip()) >= min_chars})
    rng.shuffle(statements)
    items = []
    for fn, k in statements:
        if len(items) == n_items:
            break
        target = fn[k]
        if len(target.strip()) < min_chars:
            continue
        indent = target[: len(target) - len(target.lstrip())]
        distractors = _similar(pool, target.strip(), n_distractors, rng)
        if distractors is None:
            continue
        context = "\n".join(fn[max(0, k - context_lines):k]) + "\n"
        if not _DEF.match(fn[max(0, k - context_lines)]):
            context = fn[0] + "\n" + context  # always show the signature
        items.append(_finish(context, target, [indent + d for d in distractors], rng))
    return items


def build_tasks(data_dir: str | Path, tokenizer: Tokenizer, n_items: int = 100, seed: int = 0) -> dict[str, list[TaskItem]]:
    """One task per source: ``<source>_next_statement`` for Python-looking sources, else ``<source>_next_line``."""
    data_dir = Path(data_dir)
    tasks = {}
    for source in load_manifest(data_dir)["sources"]:
        docs = heldout_documents(data_dir, source, tokenizer)
        if not docs:
            continue
        python_share = sum(bool(_function_statements(d)) for d in docs) / len(docs)
        if python_share >= 0.3:
            items = next_statement_items(docs, n_items, seed)
            name = f"{source}_next_statement"
        else:
            items = next_line_items(docs, n_items, seed)
            name = f"{source}_next_line"
        if items:
            tasks[name] = items
    return tasks


def training_ngrams(data_dir: str | Path, tokenizer: Tokenizer, n: int = 13) -> np.ndarray:
    """Sorted unique hashes of every ``n``-gram of normalized words in the training split
    (the same n-grams data preparation decontaminates with). Cached per prepared data
    directory within a process (keyed by its manifest's modification time)."""
    data_dir = Path(data_dir).resolve()
    stamp = (data_dir / "manifest.json").stat().st_mtime_ns
    return _training_ngrams(str(data_dir), stamp, tokenizer.sha256, n, tokenizer)


@functools.lru_cache(maxsize=2)
def _training_ngrams(data_dir_text: str, stamp: int, tokenizer_sha: str, n: int, tokenizer: Tokenizer) -> np.ndarray:
    data_dir = Path(data_dir_text)
    hashes = [text_ngram_hashes(doc, n) for source in load_manifest(data_dir)["sources"]
              for doc in heldout_documents(data_dir, source, tokenizer, max_docs=None, split="train")]
    return np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)


def dirty_items(items: list[TaskItem], train_ngrams: np.ndarray, n: int = 13) -> list[bool]:
    """True for an item whose context plus answer shares an ``n``-gram with the training data."""
    out = []
    for item in items:
        hashes = text_ngram_hashes(item.context + "\n" + item.choices[item.answer], n)
        if not len(hashes) or not len(train_ngrams):
            out.append(False)
            continue
        where = np.searchsorted(train_ngrams, hashes).clip(max=len(train_ngrams) - 1)  # sorted, unique
        out.append(bool((train_ngrams[where] == hashes).any()))
    return out


def task_hash(items: list[TaskItem]) -> str:
    return hashlib.sha256("".join(item.content_hash() for item in items).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate_tasks(model: torch.nn.Module, tokenizer: Tokenizer, tasks: dict[str, list[TaskItem]],
                   batch_size: int = 16, train_ngrams: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """acc / acc_norm per task (see the module docstring), with the item count and content hash.

    With ``train_ngrams`` (see :func:`training_ngrams`) the scores are also given separately
    for ``clean`` items and ``dirty`` ones (an item whose text shares a 13-gram with the
    training data), so a contamination effect shows as a gap between the two."""
    results = {}
    max_len = model.cfg.max_seq_len if hasattr(model, "cfg") else None
    for name, all_items in tasks.items():
        requests, spans, items = [], [], []
        for item in all_items:
            context = tokenizer.encode(item.context) or [tokenizer.eos_id]
            choices = [tokenizer.encode(choice + "\n") for choice in item.choices]
            if max_len is not None and max(len(c) for c in choices) >= max_len:
                continue  # a candidate longer than the model's context cannot be scored whole
            items.append(item)
            spans.append((len(requests), len(item.choices)))
            requests += [(context, choice) for choice in choices]
        if not items:
            continue
        scores = [lp for lp, _ in score_continuations(model, requests, batch_size)]
        hits, hits_norm = [], []
        for item, (first, count) in zip(items, spans):
            own = scores[first:first + count]
            per_byte = [lp / max(len((c + "\n").encode("utf-8")), 1) for lp, c in zip(own, item.choices)]
            hits.append(max(range(count), key=own.__getitem__) == item.answer)
            hits_norm.append(max(range(count), key=per_byte.__getitem__) == item.answer)
        n = len(items)
        result = {"acc": sum(hits) / n, "acc_norm": sum(hits_norm) / n, "items": n,
                  "skipped_too_long": len(all_items) - n,
                  "chance": sum(1 / len(i.choices) for i in items) / n, "hash": task_hash(items)}
        if train_ngrams is not None:
            dirty = dirty_items(items, train_ngrams)
            for label, keep in (("clean", False), ("dirty", True)):
                chosen = [k for k, d in enumerate(dirty) if d == keep]
                result[label] = {"items": len(chosen),
                                 "acc": sum(hits[k] for k in chosen) / len(chosen) if chosen else None,
                                 "acc_norm": sum(hits_norm[k] for k in chosen) / len(chosen) if chosen else None}
        results[name] = result
    return results
