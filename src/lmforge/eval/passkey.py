"""Passkey retrieval (needle in a haystack) over a grid of lengths and depths, with a multi-key variant.

An item is ``length`` tokens: end-of-text, filler, the statement "The pass key of Brathon is
482. Remember it." placed after ``depth`` of the filler (0: first, 1: just before the
question), then the question "Recall Brathon. The pass key of Brathon is" and the answer
" 482". In the multi-key variant ``multi_key_pairs`` pairs are stated, each at
its own place, and one of them (the one at ``depth``) is asked for.

Scoring, by likelihood among candidates (as :mod:`lmforge.eval.facts` scores its questions): the
model scores the true value and ``candidates - 1`` distractors (summed log-probability of each
one's tokens after the question) and is right when the true one scores strictly highest;
chance is ``1 / candidates``. In the multi-key variant the distractors are first the other
values stated in the same item, so copying "a number seen in the context" is not enough: the
model must bind the value to its key. Likelihood ranking was chosen over generating the digits
because it gives a graded, low-variance score with a known chance level even for small models,
and because its forward passes also give the strict measure for free: ``exact_match``, whether
greedy decoding would produce the true value's tokens (the argmax at every one of its positions,
:func:`lmforge.nn.scoring.score_continuations`).

Keys and values come from the evaluation part of their spaces (:mod:`lmforge.data.kv_recall`),
which the ``kv_recall`` training source never uses: no pair, key or value asked here was
trained on. Filler is ``words`` (random sentences of the same word list the ``kv_recall``
source uses) or a domain name: lines of that domain's held-out documents (a real haystack).

Items are built in tokens (every piece starts with a space, where the byte-level pre-tokenizer
always starts a pre-token, so the pieces' ids joined are the ids of the text joined), so each
item is exactly ``length`` tokens and the key sits exactly where its position says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.data import kv_recall
from lmforge.data.shards import load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.config import PasskeyConfig
from lmforge.eval.tasks import heldout_documents
from lmforge.nn.scoring import score_continuations

DEFAULT_VALUE_DIGITS = 3


class TooShort(ConfigError):
    """An item length that cannot hold the statements, the question and the answer."""


@dataclass(frozen=True)
class PasskeyItem:
    context: list[int]            # end-of-text, haystack with the statements, question
    candidates: list[list[int]]   # token ids of each candidate value; the true one first
    values: list[str]
    key: str
    needle_position: int          # index in ``context`` of the asked statement's first token
    depth: float                  # share of the filler tokens before the asked statement, as placed

    @property
    def length(self) -> int:
        return len(self.context) + len(self.candidates[0])


def _word_filler(rng: np.random.Generator) -> Iterator[str]:
    while True:
        yield kv_recall.filler_sentence(rng)


def _text_filler(lines: list[str], rng: np.random.Generator) -> Iterator[str]:
    start = int(rng.integers(len(lines)))
    while True:
        for index in range(start, len(lines)):
            yield lines[index]
        start = 0


def filler_lines(data_dir: Path, domain: str, tokenizer: Tokenizer) -> list[str]:
    """The non-empty lines of ``domain``'s held-out documents, each as `` line`` (leading space)."""
    manifest = load_manifest(data_dir)
    if domain not in manifest["sources"]:
        raise ConfigError(f"eval.passkey.filler: {domain!r} is neither 'words' nor a source of {data_dir} "
                          f"(sources: {', '.join(manifest['sources'])})")
    lines = [" " + line.strip() for doc in heldout_documents(data_dir, domain, tokenizer, max_docs=None)
             for line in doc.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"eval.passkey.filler: source {domain!r} has no held-out text in {data_dir}")
    return lines


def build_item(tokenizer: Tokenizer, rng: np.random.Generator, length: int, depth: float, pairs: int,
               candidates: int, value_digits: int, filler_lines_: list[str] | None = None) -> PasskeyItem:
    """One item of exactly ``length`` tokens (see the module docstring); ``filler_lines_`` None: word filler."""
    stated = kv_recall.draw_pairs(rng, pairs, value_digits, heldout=True)
    key, value = stated[0]
    statements = [tokenizer.encode(kv_recall.statement(k, v)) for k, v in stated]
    question = tokenizer.encode(kv_recall.query(key))
    distractors = [v for _, v in stated[1:candidates]]
    distractors += kv_recall.draw_values(rng, candidates - 1 - len(distractors), value_digits, heldout=True,
                                         exclude=[v for _, v in stated])
    values = [value, *distractors]
    options = [tokenizer.encode(kv_recall.answer(v)) for v in values]
    budget = length - 1 - sum(map(len, statements)) - len(question) - len(options[0])
    if budget < 0:
        raise TooShort(f"eval.passkey.lengths: {length} tokens cannot hold {pairs} statement(s), the question "
                          f"and the answer ({length - budget} tokens); use longer lengths")
    source = _word_filler(rng) if filler_lines_ is None else _text_filler(filler_lines_, rng)
    pieces: list[list[int]] = []
    used = 0
    while used < budget:
        ids = tokenizer.encode(next(source))
        if used + len(ids) > budget:
            # The tail of one more piece fills the rest exactly; it opens the haystack, like a
            # training window that starts inside a document.
            pieces.insert(0, ids[len(ids) - (budget - used):])
            used = budget
        else:
            pieces.append(ids)
            used += len(ids)
    # The asked statement goes where the filler before it is closest to depth x haystack; the
    # other statements at random places.
    before = np.cumsum([0] + [len(p) for p in pieces])
    places = [int(np.argmin(np.abs(before - depth * budget)))]
    places += rng.integers(0, len(pieces) + 1, size=len(statements) - 1).tolist()
    context = [tokenizer.eos_id]
    needle_position = -1
    for piece in kv_recall.interleave(pieces, list(range(len(statements))), places):
        if isinstance(piece, int):  # a statement, by index
            if piece == 0:
                needle_position = len(context)
            context += statements[piece]
        else:
            context += piece
    context += question
    return PasskeyItem(context, options, values, key, needle_position, float(before[places[0]]) / max(budget, 1))


def default_lengths(seq_len: int) -> list[int]:
    return sorted({max(seq_len // 4, 8), max(seq_len // 2, 8), seq_len})


def value_digits_of(data_dir: Path) -> int:
    """``value_digits`` of the data's first kv_recall source (from its manifest's config), else 3."""
    sources = (load_manifest(data_dir).get("config") or {}).get("sources") or []
    for source in sources:
        if source.get("kind") == "kv_recall":
            return int((source.get("kv_recall") or {}).get("value_digits", DEFAULT_VALUE_DIGITS))
    return DEFAULT_VALUE_DIGITS


def _items_hash(items: list[PasskeyItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.context, item.candidates]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def _score(model: torch.nn.Module, items: list[PasskeyItem], batch_size: int) -> tuple[list[bool], list[bool]]:
    """(right by likelihood, exact under greedy decoding) per item."""
    requests = [(item.context, option) for item in items for option in item.candidates]
    scores = score_continuations(model, requests, batch_size)
    right, exact = [], []
    first = 0
    for item in items:
        own = scores[first:first + len(item.candidates)]
        first += len(item.candidates)
        right.append(own[0][0] > max(score for score, _ in own[1:]))
        exact.append(own[0][1])
    return right, exact


def evaluate_passkey(model: torch.nn.Module, tokenizer: Tokenizer, cfg: PasskeyConfig, seq_len: int,
                     data_dir: Path | None = None, batch_size: int = 16) -> dict[str, Any]:
    """The grid: ``{"lengths", "depths", "variants": {"passkey": {...}, "multi_key": {...}}, ...}``;
    each variant has ``accuracy`` and ``exact_match`` as [length][depth] lists of fractions,
    ``pairs`` and ``hash`` of its items. A length too short for a variant's statements and
    question gets a row of None (and an entry in ``too_short``)."""
    lengths = list(cfg.lengths) or default_lengths(seq_len)
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and max(lengths) > max_len:
        raise ConfigError(f"eval.passkey.lengths: {max(lengths)} tokens exceed the model's max_seq_len {max_len} "
                          "(evaluate at a longer length with lmforge eval --seq-len N)")
    value_digits = cfg.value_digits or (value_digits_of(data_dir) if data_dir is not None else DEFAULT_VALUE_DIGITS)
    lines = None
    if cfg.filler != "words":
        if data_dir is None:
            raise ConfigError(f"eval.passkey.filler: {cfg.filler!r} needs the prepared data directory")
        lines = filler_lines(data_dir, cfg.filler, tokenizer)
    variants = {"passkey": 1}
    if cfg.multi_key_pairs > 1:
        variants["multi_key"] = cfg.multi_key_pairs
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {"lengths": lengths, "depths": list(cfg.depths), "items_per_cell": cfg.items,
                              "candidates": cfg.candidates, "chance": 1 / cfg.candidates, "filler": cfg.filler,
                              "value_digits": value_digits, "seed": cfg.seed, "variants": {}}
    for name, pairs in variants.items():
        accuracy, exact, placed, all_items = [], [], [], []
        for length in lengths:
            row_acc, row_exact, row_depth = [], [], []
            for depth in cfg.depths:
                # Seeded by the cell itself, not its place in the grid: a length gets the same items
                # in every grid that has it (the L row of an evaluation at 4L is the L evaluation's).
                rng = np.random.default_rng([cfg.seed, pairs, length, round(depth * 1000)])
                try:
                    items = [build_item(tokenizer, rng, length, depth, pairs, cfg.candidates, value_digits, lines)
                             for _ in range(cfg.items)]
                except TooShort as exc:
                    result.setdefault("too_short", []).append({"variant": name, "length": length, "why": str(exc)})
                    row_acc, row_exact, row_depth = ([None] * len(cfg.depths) for _ in range(3))
                    break
                right, greedy = _score(model, items, max(batch_size, cfg.candidates))
                row_acc.append(sum(right) / len(items))
                row_exact.append(sum(greedy) / len(items))
                row_depth.append(float(np.mean([item.depth for item in items])))
                all_items += items
            accuracy.append(row_acc)
            exact.append(row_exact)
            placed.append(row_depth)
        result["variants"][name] = {"pairs": pairs, "accuracy": accuracy, "exact_match": exact,
                                    "placed_depth": placed, "hash": _items_hash(all_items)}
        if name == "passkey" and all_items:
            example = all_items[0]
            result["example"] = {"text": tokenizer.decode(example.context), "answer": example.values[0],
                                 "candidates": example.values}
    model.train(was_training)
    return result


def describe_passkey(record: dict[str, Any]) -> list[str]:
    """The grids as text: one row per length, one column per depth (accuracy, exact match)."""
    lines = []
    for name, variant in sorted(record["variants"].items(), key=lambda item: item[1]["pairs"]):
        lines.append(f"{name} ({variant['pairs']} pair{'s' if variant['pairs'] > 1 else ''}; accuracy by likelihood "
                     f"among {record['candidates']} candidates, chance {record['chance']:.2f}; exact match under "
                     f"greedy decoding in brackets)")
        lines.append(f"  {'length':>8}" + "".join(f"{'depth ' + format(d, 'g'):>16}" for d in record["depths"]))
        for length, row, row_exact in zip(record["lengths"], variant["accuracy"], variant["exact_match"]):
            lines.append(f"  {length:>8}" + "".join(f"{f'{a:.2f} [{e:.2f}]' if a is not None else 'too short':>16}"
                                                    for a, e in zip(row, row_exact)))
    return lines
