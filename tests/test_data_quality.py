"""Gopher-style quality rules: each rule names itself, prose passes, code is never judged by them."""

from __future__ import annotations

import random

import pytest

from lmforge.core.errors import ConfigError
from lmforge.data.config import DataConfig, QualityConfig
from lmforge.data.documents import Document
from lmforge.data.quality import QualityFilter, document_problem, looks_like_code

WORDS = ("river morning castle garden letter honour shadow friend stone bird song quiet window "
         "harvest lantern meadow winter summer valley bridge market cousin marble orchard").split()


def prose(n_words: int = 200, seed: int = 0, line_words: int = 12) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i:i + line_words]).capitalize() + "." for i in range(0, n_words, line_words)]
    return "\n".join(lines) + "\n"


CODE = '''import os
from typing import Any


def load_table(path: str, columns: list[str] | None = None) -> dict[str, Any]:
    """Read a table; keep only ``columns`` when given."""
    result = {}
    with open(path) as handle:
        for line_no, line in enumerate(handle):
            key, _, value = line.partition("=")
            if columns is None or key in columns:
                result[key.strip()] = value.strip()
    return result


class Cache:
    def __init__(self, size: int = 128) -> None:
        self._items: dict[str, Any] = {}
        self.size = size
''' * 3


def test_plain_prose_passes_every_default_rule():
    assert document_problem(prose(), QualityConfig()) is None


@pytest.mark.parametrize("text, rule", [
    (prose(30), "min_words"),
    (prose(400), "max_words"),
    (" ".join(["a", "to", "in", "of"] * 30), "min_mean_word_length"),
    (" ".join(["incomprehensibilities"] * 20 + ["river"] * 40), "max_mean_word_length"),
    (prose(200) + " #tag" * 40, "max_symbol_word_ratio"),
    ("\n".join(f"{line} and then..." for line in prose(200).splitlines()), "max_ellipsis_line_fraction"),
    ("\n".join(f"- {line}" for line in prose(200).splitlines()), "max_bullet_line_fraction"),
    (prose(100) + " " + " ".join(["1999", "42", "--", "3.14"] * 30), "min_alpha_word_fraction"),
    (prose(120) + ("The same long sentence about the river and the castle keeps coming back.\n" * 12),
     "max_duplicate_line_char_fraction"),
])
def test_each_rule_removes_with_its_own_name(text, rule):
    cfg = QualityConfig(max_words=300)
    assert document_problem(text, cfg) == rule
    # The reason is the setting's name: switching that one rule off lets the document past it.
    off = QualityConfig(**{**cfg.to_dict(), rule: None})
    assert document_problem(text, off) != rule


def test_repetition_rules_for_ngrams():
    text = prose(100) + " ".join(["heave ho"] * 60) + "\n"
    assert document_problem(text, QualityConfig()) == "max_top_2gram_char_fraction"
    no_top = QualityConfig(max_top_ngram_char_fraction={})
    assert document_problem(text, no_top) == "max_duplicate_5gram_char_fraction"
    assert document_problem(text, QualityConfig(max_top_ngram_char_fraction={},
                                                max_duplicate_ngram_char_fraction={})) is None


def test_code_is_detected_and_exempt_not_removed():
    assert looks_like_code(CODE) and not looks_like_code(prose())
    # Judged as prose, this code would break the alphabetic-word rule...
    assert document_problem(CODE, QualityConfig()) is not None
    # ...but an "auto" source lets it through, counted, and a "code" source never looks.
    auto = QualityFilter(QualityConfig(), content="auto")
    docs = [Document(CODE, "mixed", "a.py"), Document(prose(), "mixed", "b.txt"), Document(prose(20), "mixed", "c")]
    kept = [d.doc_id for d in auto(docs, rank=0, world_size=1)]
    assert kept == ["a.py", "b.txt"]
    assert auto.stats.flagged["mixed"]["exempt_code"] == 1
    assert dict(auto.stats.removed["mixed"]) == {"min_words": 1}
    assert auto.stats.docs_in["mixed"] == 3 and auto.stats.docs_out["mixed"] == 2
    code_only = QualityFilter(QualityConfig(), content="code")
    assert len(list(code_only([Document(CODE, "c", "x"), Document("tiny", "c", "y")]))) == 2


def test_per_source_settings():
    cfg = DataConfig.from_dict({
        "quality": {"min_words": 40},
        "sources": [{"name": "books", "kind": "files", "path": "x", "quality": {"min_words": 5}},
                    {"name": "stdlib", "kind": "demo_code"},
                    {"name": "scripts", "kind": "files", "path": "y", "glob": "**/*.py"},
                    {"name": "forced", "kind": "demo_code", "content": "prose"},
                    {"name": "web", "kind": "jsonl", "path": "z", "quality": {"enabled": False}}],
    })
    books, stdlib, scripts, forced, web = cfg.sources
    assert cfg.quality_for(books).min_words == 5 and cfg.quality_for(books).max_words == 100_000
    assert not cfg.quality_for(stdlib).enabled and not cfg.quality_for(scripts).enabled
    assert cfg.quality_for(forced).enabled and cfg.quality_for(forced).min_words == 40
    assert not cfg.quality_for(web).enabled
    assert books.resolved_content() == "auto" and forced.resolved_content() == "prose"


def test_bad_per_source_setting_names_the_key():
    with pytest.raises(ConfigError, match=r"sources\[0\]\.quality\.min_wordz: unknown key"):
        DataConfig.from_dict({"sources": [{"name": "a", "kind": "demo_code", "quality": {"min_wordz": 3}}]})
    with pytest.raises(ConfigError, match="max_bullet_line_fraction must be in"):
        DataConfig.from_dict({"quality": {"max_bullet_line_fraction": 2.0},
                              "sources": [{"name": "a", "kind": "demo_code"}]})
    # n-gram keys may come back from JSON as strings.
    cfg = QualityConfig.from_dict({"max_top_ngram_char_fraction": {"2": 0.3}})
    assert cfg.max_top_ngram_char_fraction == {2: 0.3}
