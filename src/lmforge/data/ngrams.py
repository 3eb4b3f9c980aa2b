"""Words and word n-grams as stable 64-bit hashes, vectorized with numpy.

Near-duplicate detection (MinHash shingles), decontamination (13-grams) and the
repetition rules of the quality filter all look at word n-grams. Hashes must agree
across worker processes and machines, so words are hashed with blake2b (Python's
``hash()`` is salted per process), once per distinct word, and n-grams are combined
from word hashes with array arithmetic rather than a Python loop per n-gram.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+")
# Odd 64-bit constants: a polynomial base for combining words, and the splitmix64
# finalizer, which spreads the (linear, hence structured) polynomial over all 64 bits.
_BASE = np.uint64(0x100000001B3)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def normalized_words(text: str) -> list[str]:
    """Lower-cased runs of letters, digits and '_' : the words n-grams are made of.

    Punctuation, spacing and case are dropped, so a passage matches however it was
    quoted or laid out.
    """
    return _WORD.findall(text.lower())


def word_ids(words: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(int64 id per word, the distinct words in first-seen order)."""
    distinct = list(dict.fromkeys(words))
    index = {w: i for i, w in enumerate(distinct)}
    ids = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))
    return ids, distinct


def stable_word_hashes(words: Sequence[str]) -> np.ndarray:
    """uint64 hash per word, identical in every process (blake2b of the UTF-8 bytes)."""
    ids, distinct = word_ids(words)
    table = np.fromiter(
        (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little") for w in distinct),
        dtype=np.uint64, count=len(distinct))
    return table[ids] if len(ids) else np.zeros(0, np.uint64)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps, as intended)."""
    h = values ^ (values >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of ``n`` consecutive words (empty if fewer than n words)."""
    count = len(word_hashes) - n + 1
    if count <= 0 or n <= 0:
        return np.zeros(0, np.uint64)
    word_hashes = word_hashes.astype(np.uint64, copy=False)
    h = np.zeros(count, np.uint64)
    for k in range(n):
        h = h * _BASE + word_hashes[k:k + count]
    return mix64(h)


def text_ngram_hashes(text: str, n: int) -> np.ndarray:
    return ngram_hashes(stable_word_hashes(normalized_words(text)), n)
