"""Binary files read as text are dropped in every domain, code included, and counted by rule."""

from __future__ import annotations

import random
import shutil

import pytest

from lmforge.core.errors import ConfigError
from lmforge.data.config import DataConfig, QualityConfig
from lmforge.data.documents import Document
from lmforge.data.pipeline import normalize_text
from lmforge.data.prepare import prepare_data
from lmforge.data.quality import QualityFilter, non_text_fraction

RULE = "max_non_text_char_fraction"


def _random_text(seed: int, size: int = 200_000) -> str:
    raw = random.Random(seed).randbytes(size)
    return normalize_text(raw.decode("utf-8", errors="replace"))


def test_fraction_of_random_bytes_and_of_text():
    assert non_text_fraction(_random_text(0)) > 0.5
    assert non_text_fraction("Plain prose.\n\tIndented, with a form feed\f and CRLF\r\n") == 0.0
    assert non_text_fraction("ab\x00\ufffd") == 0.5 and non_text_fraction("") == 0.0
    assert non_text_fraction("x\x85") == 0.5  # C1 controls count too


@pytest.mark.parametrize("content", ["prose", "code", "auto"])
def test_rule_holds_for_every_content_kind(content):
    cfg = QualityConfig()
    step = QualityFilter(cfg, content)
    docs = [Document(_random_text(1, 5000), "s", "bin"), Document("def f(x):\n    return x\n" * 20, "s", "py")]
    kept = [d.doc_id for d in step(docs)]
    assert "bin" not in kept and step.stats.removed["s"][RULE] == 1
    assert "py" in kept or content == "prose"  # (a function repeated is no prose)


def test_without_the_rule_binary_passed_as_code():
    """What the issue saw: random bytes let through as code (and, in an auto source, as exempt_code)."""
    docs = [Document(_random_text(1, 5000), "s", "bin")]
    off = QualityConfig(max_non_text_char_fraction=None)
    assert [d.doc_id for d in QualityFilter(off, "code")(docs)] == ["bin"]
    auto = QualityFilter(off, "auto")
    assert [d.doc_id for d in auto(docs)] == ["bin"] and auto.stats.flagged["s"]["exempt_code"] == 1


def test_bad_threshold_is_named():
    with pytest.raises(ConfigError, match=RULE):
        QualityConfig.from_dict({RULE: 1.5})


def test_random_files_named_txt_are_dropped_by_the_pipeline(tmp_path, tiny_corpus):
    """Real random-byte files next to real text, through the real pipeline: none is trained on."""
    mixed, code = tmp_path / "mixed", tmp_path / "code"
    shutil.copytree(tiny_corpus / "prose", mixed)
    code.mkdir()
    for i, path in enumerate(sorted((tiny_corpus / "code").glob("*.txt"))[:20]):
        shutil.copy(path, code / f"module_{i:02d}.py")
    for i in range(3):
        (mixed / f"notes_{i}.txt").write_bytes(random.Random(10 + i).randbytes(200_000))
    (code / "blob.py").write_bytes(random.Random(20).randbytes(50_000))
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
        "sources": [{"name": "mixed", "kind": "files", "path": str(mixed)},
                    {"name": "code", "kind": "files", "path": str(code), "glob": "**/*.py"}]})
    assert cfg.quality_for(cfg.sources[1]).enabled is False  # code: the prose rules are off
    manifest = prepare_data(cfg)
    mixed_p, code_p = manifest["pipeline"]["mixed"], manifest["pipeline"]["code"]
    assert mixed_p["removed_quality"] == {RULE: 3}
    assert code_p["removed_quality"] == {RULE: 1} and code_p["exempt_code"] == 0
    quality = next(s for s in manifest["steps"] if s["name"] == "quality")
    assert quality["removed"][RULE] == 4
    assert manifest["totals"]["removed_quality"] == 4
    # What is left is the real text: 41 prose files (one a duplicate) and 20 modules, no megabytes of noise.
    assert mixed_p["train_docs"] + mixed_p["heldout_docs"] == 40
    assert code_p["train_docs"] + code_p["heldout_docs"] == 20
    real_bytes = sum(p.stat().st_size for p in mixed.glob("doc_*.txt")) + sum(
        p.stat().st_size for p in code.glob("module_*.py"))
    assert manifest["totals"]["train"]["bytes"] + manifest["totals"]["heldout"]["bytes"] <= real_bytes
