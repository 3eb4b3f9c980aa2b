"""Pipeline steps: normalization, exact dedup counts, hash split determinism and isolation."""

from __future__ import annotations

import unicodedata

from lmforge.data.documents import Document, content_hash
from lmforge.data.pipeline import PipelineStats, count_read, exact_dedup, normalize, split_by_hash


def _docs(*texts, source="s"):
    return [Document(text=t, source=source, doc_id=str(i)) for i, t in enumerate(texts)]


def test_normalize_text():
    decomposed = unicodedata.normalize("NFD", "café")
    (doc,) = normalize(_docs(f"\ufeff{decomposed}  \r\nline two\t\rthree\n\n\n"))
    assert doc.text == "café\nline two\nthree\n"


def test_normalize_drops_short_docs_and_counts():
    stats = PipelineStats()
    out = list(normalize(_docs("  \n\t", "ab", "abcd"), min_doc_chars=3, stats=stats))
    assert [d.text for d in out] == ["abcd\n"]
    assert stats.removed_empty["s"] == 2


def test_content_hash_is_nfc_invariant():
    assert content_hash(unicodedata.normalize("NFD", "Ångström")) == content_hash("Ångström")


def test_exact_dedup_keeps_first_and_counts_per_source():
    stats = PipelineStats()
    docs = _docs("a", "b", "a", source="x") + _docs("b", "c", source="y")
    kept = list(exact_dedup(count_read(docs, stats), stats=stats))
    assert [(d.source, d.text) for d in kept] == [("x", "a"), ("x", "b"), ("y", "c")]
    assert stats.removed_duplicates == {"x": 1, "y": 1}
    assert stats.by_source()["x"]["read"] == 3


def test_split_is_deterministic_and_roughly_the_fraction():
    docs = _docs(*(f"document number {i}" for i in range(4000)))
    first = [split_by_hash(d, 0.1) for d in docs]
    assert first == [split_by_hash(d, 0.1) for d in docs]
    assert 300 < first.count("heldout") < 500


def test_identical_text_never_on_both_sides():
    # The same text in different sources/ids always gets the same side: the split is a
    # function of the content alone.
    for i in range(500):
        text = f"shared text {i}"
        sides = {split_by_hash(Document(text, src, f"{src}{i}"), 0.3) for src in ("a", "b", "c")}
        assert len(sides) == 1


def test_every_step_has_one_shape_and_counts_by_reason():
    from lmforge.data.pipeline import ExactDedup, Normalize
    from lmforge.data.steps import FilterStep, StepStats, run_steps

    class DropShort(FilterStep):
        name = "drop_short"

        def reason(self, doc):
            return "too_short" if len(doc.text) < 4 else None

    docs = _docs("alpha", "  ", "alpha", "ab", source="x") + _docs("beta", source="y")
    steps = [Normalize(), ExactDedup(), DropShort()]
    kept = list(run_steps(docs, steps, rank=0, world_size=1))
    assert [d.text for d in kept] == ["alpha\n", "beta\n"]
    assert [s.stats.summary()["removed"] for s in steps] == [{"empty": 1}, {"exact_duplicate": 1}, {"too_short": 1}]
    assert steps[1].stats.docs_in == {"x": 3, "y": 1} and steps[1].stats.docs_out == {"x": 2, "y": 1}
    # Removed documents say why; stats survive a JSON round trip and add up across ranks.
    assert docs[2].meta == {"removed": "exact_duplicate", "duplicate_of": "x:0"}
    merged = StepStats.from_dict(steps[2].stats.to_dict()).merge(steps[2].stats)
    assert merged.removed["x"]["too_short"] == 2 and merged.summary()["documents_in"] == 6
