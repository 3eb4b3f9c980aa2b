"""Eval registry and n-gram decontamination: a planted eval item is found in training data and removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.core.errors import DataError
from lmforge.data import eval_registry
from lmforge.data.config import DataConfig, DecontaminationConfig
from lmforge.data.decontaminate import NgramIndex
from lmforge.data.documents import Document, content_hash
from lmforge.data.eval_registry import EvalItem, EvalSet, register_eval_set, unregister_eval_set
from lmforge.data.pipeline import normalize_text, split_by_hash
from lmforge.data.prepare import prepare_data

QUESTION = ("Which river did the old ferryman cross every winter morning before the castle bells "
            "rang out across the frozen valley below")
OTHER = "Name the seven bridges of the marble city that the cousins painted during the long summer"


@pytest.fixture
def registry():
    """Register eval sets for one test only: the registry is process-wide."""
    names: list[str] = []

    def register(name, items, **kwargs):
        register_eval_set(name, items, **kwargs)
        names.append(name)

    yield register
    for name in names:
        unregister_eval_set(name)


def test_index_matches_normalized_ngrams():
    sets = [EvalSet("task/q", "task", [EvalItem("long", QUESTION), EvalItem("mid", "one two three four five six seven eight nine"),
                                        EvalItem("tiny", "too short to check")])]
    index = NgramIndex.build(sets, DecontaminationConfig(ngram_size=13, min_item_words=8))
    assert index.sets[0]["checked_items"] == 2 and index.sets[0]["too_short_items"] == 1
    shouted = "PREFIX. " + QUESTION.upper().replace(" ", " ,  ") + "?! suffix"
    assert index.find(shouted) == {0: len(QUESTION.split()) - 12}
    # An item shorter than 13 words is one n-gram of its own length.
    assert index.find("count: One, two, three, four, five, six, seven, eight, nine!") == {1: 1}
    assert index.find("one two three four five six seven eight") == {}
    assert index.find(" ".join(QUESTION.split()[:12])) == {}  # 12 words: below the n-gram size


def test_eval_set_hash_names_its_contents():
    a = EvalSet("task/a", "task", [EvalItem("0", "some text")])
    assert a.sha256 == EvalSet("task/a", "task", [EvalItem("0", "some text")]).sha256
    assert a.sha256 != EvalSet("task/a", "task", [EvalItem("0", "other text")]).sha256
    assert a.summary() == {"name": "task/a", "role": "task", "items": 1, "sha256": a.sha256}


def test_registry_api(registry):
    registry("task/strings", ["first item text", ("id-7", "second item text")])
    loaded = eval_registry.load_registered("task/strings")
    assert [(i.item_id, i.text) for i in loaded.items] == [("0", "first item text"), ("id-7", "second item text")]
    with pytest.raises(ValueError, match="already registered"):
        register_eval_set("task/strings", [])
    register_eval_set("task/strings", lambda: ["replaced"], replace=True)
    assert eval_registry.load_registered("task/strings").items[0].text == "replaced"

    def broken():
        raise RuntimeError("no network")

    registry("task/broken", broken)
    with pytest.raises(DataError, match="'task/broken': its loader failed .*no network"):
        eval_registry.load_registered("task/broken")
    with pytest.raises(ValueError, match="role"):
        register_eval_set("task/x", [], role="train")


def _planted_corpus(tmp_path: Path, tiny_corpus: Path, heldout_fraction: float) -> tuple[Path, str]:
    """A copy of the tiny corpus with QUESTION inside one new training document."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    base = (corpus / "prose" / "doc_007.txt").read_text()
    for attempt in range(100):  # pick a wording whose content hash lands in the training split
        text = base.replace("\n", f"\n{QUESTION}, said the guide ({attempt}).\n", 1)
        if split_by_hash(Document(normalize_text(text), "prose", "x"), heldout_fraction) == "train":
            break
    (corpus / "prose" / "planted.txt").write_text(text)
    return corpus, content_hash(normalize_text(text))


def test_planted_eval_item_is_found_and_removed(tmp_path, tiny_corpus, registry, records):
    corpus, planted_hash = _planted_corpus(tmp_path, tiny_corpus, 0.2)
    registry("task/quiz", [EvalItem("q1", QUESTION), EvalItem("q2", OTHER)])
    items = tmp_path / "declared.jsonl"
    items.write_text(json.dumps({"question": OTHER}) + "\n")
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
        "decontamination": {"eval_sets": [{"name": "task/declared", "kind": "jsonl", "path": str(items),
                                           "text_field": "question"}]},
        "sources": [{"name": "prose", "kind": "files", "path": str(corpus / "prose")},
                    {"name": "code", "kind": "files", "path": str(corpus / "code")}]})
    manifest = prepare_data(cfg)

    assert manifest["pipeline"]["prose"]["removed_contaminated"] == 1
    summary = manifest["contamination"]
    assert summary["report"] == "contamination.json" and summary["ngram_size"] == 13
    assert set(summary["eval_sets"]) == {"task/quiz", "task/declared", "heldout/prose", "heldout/code"}
    quiz = eval_registry.load_registered("task/quiz")
    assert summary["eval_sets"]["task/quiz"] == {"role": "task", "sha256": quiz.sha256, "items": 2,
                                                 "items_with_hits": 1}
    assert summary["eval_sets"]["task/declared"]["items_with_hits"] == 0
    report = json.loads((tmp_path / "data" / "contamination.json").read_text())
    (hit,) = [i for i in report["items_with_hits"] if i["set"] == "task/quiz"]
    assert hit["item_id"] == "q1" and hit["sha256"] == content_hash(QUESTION)
    assert hit["training_documents"] == [{"source": "prose", "doc_id": "planted.txt", "sha256": planted_hash,
                                          "ngram_hits": len(QUESTION.split()) - 12,
                                          "status": "removed_contaminated"}]
    assert report["removed_documents"] == [{"source": "prose", "doc_id": "planted.txt", "sha256": planted_hash,
                                            "eval_items": ["task/quiz:q1"]}]
    # Gone from the training data the tokenizer and shards saw.
    assert planted_hash not in (tmp_path / "data" / "doc_hashes" / "train.txt").read_text().split()

    # A new eval item later: same config, so no refusal; only decontamination onwards runs again.
    records.clear()
    registry("task/more", [EvalItem("m1", OTHER)])
    again = prepare_data(cfg)
    messages = [r.getMessage() for r in records]
    assert any("eval sets changed" in m for m in messages)
    assert any(m == "read: skipped 2 finished unit(s) of 2" for m in messages)
    assert any(m.startswith("dedup: skipped 1 finished") for m in messages)
    # The new item hits nothing, so the documents are as they were: no new tokenizer, no new shards.
    assert "tokenizer: skipped 1 finished unit(s) of 1" in messages
    assert any(m.startswith("shards: skipped") for m in messages)
    assert again["tokenizer"] == manifest["tokenizer"]
    assert "task/more" in again["contamination"]["eval_sets"]
    assert again["contamination"]["eval_sets_digest"] != summary["eval_sets_digest"]


def test_heldout_split_is_an_eval_set(tmp_path, tiny_corpus):
    """A training document that quotes a held-out document is removed too."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    cfg_dict = {"out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
                "sources": [{"name": "prose", "kind": "files", "path": str(corpus / "prose")}]}
    first = prepare_data(DataConfig.from_dict(cfg_dict))
    heldout_hashes = set((tmp_path / "data" / "doc_hashes" / "heldout.txt").read_text().split())
    heldout_doc = next(p for p in sorted((corpus / "prose").glob("*.txt"))
                       if content_hash(normalize_text(p.read_text())) in heldout_hashes)
    quote = " ".join(heldout_doc.read_text().split()[:60])
    for attempt in range(100):  # a wording that lands in the training split
        text = f"As the saying goes ({attempt}):\n{quote}\nThe end.\n"
        if split_by_hash(Document(normalize_text(text), "prose", ""), 0.2) == "train":
            break
    (corpus / "prose" / "quotes.txt").write_text(text)
    cfg_dict["out_dir"] = str(tmp_path / "data2")
    manifest = prepare_data(DataConfig.from_dict(cfg_dict))
    assert first["contamination"]["removed_documents"] == 0
    assert manifest["pipeline"]["prose"]["removed_contaminated"] == 1
    assert manifest["contamination"]["eval_sets"]["heldout/prose"]["items_with_hits"] == 1
