"""Synthetic key-value recall documents: filler text, pass keys stated at some depth, queries at the end.

A document states one or more pairs ("The pass key of Brathon is 482. Remember it.") between
sentences of filler and ends by asking for one of them ("Recall Brathon. The pass key of Brathon
is 482."). Predicting the value at the end is possible only by reading back
to the statement, so a model trained on these learns to retrieve from its context, and the
passkey evaluation (:mod:`lmforge.eval.passkey`) measures how far back it can.

Everything is drawn from a seeded generator, so the same settings give the same documents.

Held-out keys. Every key (an invented word) and every value (a number of ``value_digits``
digits) falls in the evaluation part or the training part of its space by a hash of its text
(:func:`key_is_heldout`, :func:`value_is_heldout`; one in eight is held out). Documents of the
``kv_recall`` source use only training keys and values; the passkey evaluation uses only
held-out ones, so no pair it asks for, no key and no value can have been seen in training,
whatever the seeds. (The source's documents are also split train/held-out by content hash, as
every source's are: its held-out documents measure held-out loss, with training-part keys.)

Filler is random sentences of common words (:data:`FILLER_WORDS`, none of them a word of the
statements), not real text: no two documents share a 13-word run, so the preparation's
decontamination against its own held-out split, and near-dedup, keep them all.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Iterator

import numpy as np

from lmforge.data.config import KvRecallConfig
from lmforge.data.documents import Document

GENERATOR_VERSION = "1"  # part of the source's signature: raise it when the documents change
HELDOUT_BUCKETS = 8  # one key (or value) in this many is reserved for evaluation
_ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sk", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]
FILLER_WORDS = tuple("""
grass green sky blue sun yellow tree river stone cloud rain wind field road house garden bird song
morning evening night light dark warm cold small large old young quiet loud slow quick bright soft
hill valley lake forest flower leaf branch root sand shore wave ship boat bridge tower wall gate
door window table chair bread apple honey milk salt fire smoke ash snow ice storm thunder summer
winter spring autumn town village market street lamp candle letter paper ink book page story
friend child mother father brother sister king queen farmer baker miller sailor walks runs sings
sleeps waits looks turns opens closes carries brings finds keeps holds grows falls rises shines
here there always often never slowly softly gently again together under over near beyond through
""".split())
_PAIR = re.compile(r"The pass key of (\w+) is (\d+)\.")


def _bucket(kind: str, text: str) -> int:
    return hashlib.sha256(f"kv_recall/{kind}/{text}".encode()).digest()[0] % HELDOUT_BUCKETS


def key_is_heldout(key: str) -> bool:
    """Whether ``key`` belongs to the evaluation part of the key space (never in training documents)."""
    return _bucket("key", key) == 0


def value_is_heldout(value: str) -> bool:
    """Whether ``value`` belongs to the evaluation part of the value space (never in training documents)."""
    return _bucket("value", value) == 0


def statement(key: str, value: str) -> str:
    return f" The pass key of {key} is {value}. Remember it."


def query(key: str) -> str:
    """The question at the end; the answer :func:`answer` follows it directly.

    Short on purpose: any 13 words in a row that end with it reach back to a random filler word
    or to a value, so two documents asking for the same key share no 13-gram, and the
    preparation's decontamination (13-grams against its own held-out split) removes none
    ("What is the pass key of K? The pass key of K is" alone is 13 words)."""
    return f" Recall {key}. The pass key of {key} is"


def answer(value: str) -> str:
    return f" {value}"


def stated_pairs(text: str) -> list[tuple[str, str]]:
    """The (key, value) pairs a document states or answers (for tests and checks)."""
    return _PAIR.findall(text)


def filler_sentence(rng: np.random.Generator, words: int | None = None) -> str:
    """`` Word word ... word.`` (with a leading space): ``words`` words, 4 to 11 when not given."""
    count = int(rng.integers(4, 12)) if words is None else words
    picked = [FILLER_WORDS[i] for i in rng.integers(0, len(FILLER_WORDS), size=count)]
    return " " + " ".join(picked).capitalize() + "."


def draw_pairs(rng: np.random.Generator, count: int, value_digits: int, heldout: bool) -> list[tuple[str, str]]:
    """``count`` pairs with distinct keys and distinct values, all from the evaluation part of
    their spaces (``heldout``) or all from the training part."""
    keys: list[str] = []
    while len(keys) < count:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)]
        key = "".join(syllables).capitalize()
        if key_is_heldout(key) == heldout and key not in keys:
            keys.append(key)
    values = draw_values(rng, count, value_digits, heldout)
    return list(zip(keys, values))


def draw_values(rng: np.random.Generator, count: int, value_digits: int, heldout: bool,
                exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``count`` distinct values of ``value_digits`` digits (no leading zero) from one part of the space."""
    pool = [v for v in _value_pool(value_digits, heldout) if v not in exclude]
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} values of {value_digits} digits in that part of the value space, "
                         f"{count} needed (raise value_digits)")
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


@functools.lru_cache(maxsize=8)
def _value_pool(value_digits: int, heldout: bool) -> tuple[str, ...]:
    low, high = 10 ** (value_digits - 1), 10 ** value_digits
    return tuple(str(v) for v in range(low, high) if value_is_heldout(str(v)) == heldout)


def recall_text(rng: np.random.Generator, pairs: list[tuple[str, str]], asked: int | list[int],
                length_chars: int) -> str:
    """One document of about ``length_chars`` characters: filler with each pair's statement at a
    random place, then the query for ``pairs[asked]`` (each of ``asked``, in order) and its answer."""
    ending = "".join(query(pairs[k][0]) + answer(pairs[k][1]) + "." for k in np.atleast_1d(asked).tolist())
    needles = [statement(k, v) for k, v in pairs]
    budget = length_chars - len(ending) - sum(len(s) for s in needles)
    filler: list[str] = []
    while budget >= 0 or not filler:  # >= : the first piece loses its leading space
        sentence = filler_sentence(rng)
        filler.append(sentence)
        budget -= len(sentence)
    # Each statement goes before a random filler sentence or after the last one (depth 0 to 1).
    places = rng.integers(0, len(filler) + 1, size=len(needles)).tolist()
    return ("".join(interleave(filler, needles, places)) + ending).lstrip()


def interleave(filler: list, needles: list, places: list[int]) -> list:
    """``filler`` with ``needles[k]`` inserted before ``filler[places[k]]`` (after the last at
    ``len(filler)``); needles at one place keep their order."""
    out: list = []
    by_place = sorted(range(len(needles)), key=lambda k: places[k])
    placed = 0
    for index in range(len(filler) + 1):
        while placed < len(by_place) and places[by_place[placed]] == index:
            out.append(needles[by_place[placed]])
            placed += 1
        if index < len(filler):
            out.append(filler[index])
    return out


def recall_documents(cfg: KvRecallConfig, source: str) -> Iterator[Document]:
    """The ``cfg.documents`` documents of a ``kv_recall`` source (training keys and values only):
    1 to ``cfg.pairs`` pairs each, ``cfg.queries`` of them (at most all) asked at the end."""
    rng = np.random.default_rng([cfg.seed, 0x6B76])
    low, high = cfg.length_chars
    for index in range(cfg.documents):
        count = int(rng.integers(1, cfg.pairs + 1))
        pairs = draw_pairs(rng, count, cfg.value_digits, heldout=False)
        asked = rng.permutation(count)[:cfg.queries].tolist()
        text = recall_text(rng, pairs, asked, int(rng.integers(low, high + 1)))
        yield Document(text=text, source=source, doc_id=f"kv_recall:{cfg.seed}:{index}")
