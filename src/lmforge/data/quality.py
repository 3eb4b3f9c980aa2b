"""Gopher-style quality rules as a pipeline step: each removal is counted under the rule's name.

The rules (Rae et al. 2021, appendix A) catch text that is not running prose: too short
or too long, made of symbols or bullet lists, truncated lines, boilerplate repeated
line by line or n-gram by n-gram. They are written for natural language, so code must
not meet them: a source marked ``content: code`` skips them, and in an ``auto`` source
each document that looks like code (see :func:`looks_like_code`) is let through and
counted as ``exempt_code`` instead.

One rule comes before all of them and holds for code too: a document made largely of
U+FFFD replacement characters or control characters is binary read as text, not text
(``max_non_text_char_fraction``; three random-byte files named ``.txt`` once passed as
``exempt_code`` and made 89% of the training bytes).

Registered as the step "quality" (see stages.py): one work unit per chunk of documents.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from lmforge.data.config import QualityConfig
from lmforge.data.documents import Document
from lmforge.data.ngrams import mix64, ngram_hashes, word_ids
from lmforge.data.stages import ChunkFilter, Context, register_step
from lmforge.data.steps import FilterStep, PipelineStep

_BULLETS = ("\u2022", "\u2023", "\u25e6", "\u2043", "\u2219", "\u00b7", "- ", "* ", "-\t", "*\t")
_ELLIPSES = ("...", "\u2026")
# Whole-text regexes count per-token properties at C speed (a Python loop per word
# costs seconds on the demo corpus). A token is a run of non-space characters.
_NO_LETTER_TOKEN = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")  # no letter at all
_WORD_CHAR = re.compile(r"\w")
# Characters that are everywhere in code and rare in prose, and lines that open like code.
_CODE_TOKEN = re.compile(r"(?<!\S)[^\s{}()\[\]=<>;_#]*[{}()\[\]=<>;_#]")
_CODE_LINE = re.compile(r"^\s*(?:def|class|import|from|return|if|for|while|elif|else:|try:|except|"
                        r"#include|#define|function|var|let|const|public|private|static|fn|func|"
                        r"package|use)\b", re.M)
# Not text: undecodable bytes (U+FFFD) and control characters, C0 and C1, except \t \n \f \r.
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")
CODE_TOKEN_FRACTION = 0.12  # tokens holding code characters, above which a document counts as code


def looks_like_code(text: str, n_tokens: int | None = None) -> bool:
    """True when code characters or code-like line openings reach CODE_TOKEN_FRACTION of the tokens.

    Prose has few brackets, '=', ';', '#' or '_' (in the demo's plays and poems: 2% of
    the tokens at the median, 8% at most); code has many (37% at the median of the Python
    standard library's files, above 23% for nine files in ten).
    """
    n_tokens = len(text.split()) if n_tokens is None else n_tokens
    if n_tokens == 0:
        return False
    hits = len(_CODE_TOKEN.findall(text)) + len(_CODE_LINE.findall(text))
    return hits >= CODE_TOKEN_FRACTION * n_tokens


def _ngram_counts(word_hashes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(index of each position's n-gram among the distinct ones, occurrences of each distinct one)."""
    _, inverse, counts = np.unique(ngram_hashes(word_hashes, n), return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


class QualityFilter(FilterStep):
    """Drop documents that break a rule of ``cfg``; the reason is the rule's name."""

    name = "quality"

    def __init__(self, cfg: QualityConfig, content: Literal["prose", "code", "auto"] = "auto"):
        super().__init__()
        self.cfg = cfg
        self.content = content

    def reason(self, doc: Document) -> str | None:
        if non_text_problem(doc.text, self.cfg):
            return "max_non_text_char_fraction"  # every source, code included: it is not text at all
        if not self.cfg.enabled or self.content == "code":
            return None
        return document_problem(doc.text, self.cfg, detect_code=self.content == "auto")

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            why = self.reason(doc)
            if why == "exempt_code":
                self.stats.flagged[doc.source][why] += 1  # kept, but said out loud
                yield doc
            elif why is None:
                yield doc
            else:
                self.remove(doc, why)


def non_text_fraction(text: str) -> float:
    """The share of ``text``'s characters that are replacement or control characters."""
    return len(_NON_TEXT.findall(text)) / len(text) if text else 0.0


def non_text_problem(text: str, cfg: QualityConfig) -> bool:
    """True when ``text`` is more replacement and control characters than the config allows."""
    limit = cfg.max_non_text_char_fraction
    return limit is not None and non_text_fraction(text) > limit


def _outside(name: str, value: float, low: float | None, high: float | None) -> str | None:
    if low is not None and value < low:
        return f"min_{name}"
    if high is not None and value > high:
        return f"max_{name}"
    return None


def document_problem(text: str, cfg: QualityConfig, detect_code: bool = False) -> str | None:
    """The name of the first rule ``text`` breaks, "exempt_code", or None if it passes."""
    lowered = text.lower()
    words = lowered.split()
    n_words = len(words)
    if detect_code and looks_like_code(text, n_words):
        return "exempt_code"
    # Word counts and lengths ignore tokens that are only punctuation ("--", "&"): those
    # are the letterless tokens (few; found in one pass) without a digit or '_' either.
    letterless = _NO_LETTER_TOKEN.findall(text)
    punct = [token for token in letterless if not _WORD_CHAR.search(token)]
    n_content = n_words - len(punct)
    problem = _outside("words", n_content, cfg.min_words, cfg.max_words)
    if problem or n_content <= 0:
        return problem
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
    mean_length = (int(lengths.sum()) - sum(map(len, punct))) / n_content
    problem = _outside("mean_word_length", mean_length, cfg.min_mean_word_length, cfg.max_mean_word_length)
    if problem:
        return problem
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
        if symbols / n_words > cfg.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    lines = [line for line in (raw.strip() for raw in text.split("\n")) if line]
    if lines and cfg.max_ellipsis_line_fraction is not None:
        if sum(line.endswith(_ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_line_fraction:
            return "max_ellipsis_line_fraction"
    if lines and cfg.max_bullet_line_fraction is not None:
        bullets = sum(line.startswith(_BULLETS) or line in ("-", "*") for line in lines)
        if bullets / len(lines) > cfg.max_bullet_line_fraction:
            return "max_bullet_line_fraction"
    if cfg.min_alpha_word_fraction is not None:
        if 1.0 - len(letterless) / n_words < cfg.min_alpha_word_fraction:
            return "min_alpha_word_fraction"
    return _repetition_problem(lines, words, lengths, cfg)


def _repetition_problem(lines: list[str], words: list[str], lengths: np.ndarray, cfg: QualityConfig) -> str | None:
    if lines and (cfg.max_duplicate_line_fraction is not None or cfg.max_duplicate_line_char_fraction is not None):
        seen: set[str] = set()
        dup_lines, dup_chars = 0, 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            else:
                seen.add(line)
        if cfg.max_duplicate_line_fraction is not None and dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
            return "max_duplicate_line_fraction"
        total_chars = sum(len(line) for line in lines)
        if cfg.max_duplicate_line_char_fraction is not None and total_chars \
                and dup_chars / total_chars > cfg.max_duplicate_line_char_fraction:
            return "max_duplicate_line_char_fraction"
    if not cfg.max_top_ngram_char_fraction and not cfg.max_duplicate_ngram_char_fraction:
        return None
    ids, _ = word_ids(words)
    # Distinct words of one document need only distinct numbers, not stable hashes.
    hashes = mix64(ids.astype(np.uint64) + np.uint64(1))
    total = int(lengths.sum())
    if total == 0:
        return None
    prefix = np.concatenate([[0], np.cumsum(lengths)])
    for n, limit in sorted(cfg.max_top_ngram_char_fraction.items()):
        if len(ids) < n:
            continue
        inverse, counts = _ngram_counts(hashes, n)
        top = int(np.argmax(counts))
        if counts[top] < 2:
            continue
        first = int(np.argmax(inverse == top))
        chars = int(prefix[first + n] - prefix[first]) * int(counts[top])
        if chars / total > limit:
            return f"max_top_{n}gram_char_fraction"
    for n, limit in sorted(cfg.max_duplicate_ngram_char_fraction.items()):
        if len(ids) < n:
            continue
        inverse, counts = _ngram_counts(hashes, n)
        starts = np.flatnonzero(counts[inverse] > 1)
        if len(starts) == 0:
            continue
        # Words covered by any repeated n-gram, each counted once however many cover it.
        cover = np.zeros(len(ids) + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        covered = np.cumsum(cover[:-1]) > 0
        if int(lengths[covered].sum()) / total > limit:
            return f"max_duplicate_{n}gram_char_fraction"
    return None


@register_step
class QualityStage(ChunkFilter):
    """The quality rules of each source's config, chunk by chunk ("removed_quality" by rule)."""

    name = "quality"
    flags = ("exempt_code",)

    def settings(self, ctx: Context, source: str) -> object:
        config = ctx.sources[source]
        return [ctx.cfg.quality_for(config).to_dict(), config.resolved_content()]

    def make_filter(self, ctx: Context, source: str) -> PipelineStep:
        config = ctx.sources[source]
        return QualityFilter(ctx.cfg.quality_for(config), config.resolved_content())
