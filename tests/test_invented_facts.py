"""The invented_facts source: deterministic, disjoint from the knowledge benchmarks, never a copy task."""

from __future__ import annotations

import re

import numpy as np

from lmforge.data.config import DataConfig
from lmforge.data.invented_facts import (BENCHMARK_TEMPLATES_HELD_OUT, BENCHMARK_TEMPLATES_SEEN,
                                         QUESTIONS_BY_NAME, QUESTIONS_BY_TOWN, invented_fact_documents,
                                         make_people, person_documents)
from lmforge.data.sources import iter_documents, source_signature
from lmforge.eval.facts import make_entities
from lmforge.eval.facts_reading import READING_QUESTIONS, check_not_verbatim, make_reading_entities


def _source(**extra):
    cfg = DataConfig.from_dict({"sources": [{"name": "facts", "kind": "invented_facts", "max_documents": 600,
                                             **extra}]})
    return cfg.sources[0]


def test_source_is_deterministic_and_shuffles_a_persons_documents_apart():
    first = [(d.doc_id, d.text) for d in iter_documents(_source())]
    again = [(d.doc_id, d.text) for d in iter_documents(_source())]
    assert first == again and len(first) == 600
    assert source_signature(_source()) == source_signature(_source())
    kinds = {doc_id.split(":")[1] for doc_id, _ in first}
    assert kinds == {"fact", "questions_by_name", "questions_by_town"}
    # shuffled: the first documents are not one person's three in a row
    people = [doc_id.split(":")[0] for doc_id, _ in first[:30]]
    assert len(set(people)) > 20


def test_no_benchmark_person_or_town_occurs_in_the_training_source():
    text = "\n".join(d.text for d in invented_fact_documents("facts"))
    words = set(re.findall(r"[A-Za-z]+", text))
    benchmark = set()
    for seed in range(10):
        for e in make_reading_entities(24, seed):
            for person in (e, e["distractor"]):
                benchmark.update(person["name"].split())
                benchmark.add(person["town"])
        for e in make_entities(24, seed):
            benchmark.update(e["name"].split())
            benchmark.update(e["candidates"]["town"])
    assert len(benchmark) > 1000
    assert not benchmark & words
    assert not [w for w in benchmark if w in text]  # not even inside a longer word


def test_people_come_in_pairs_sharing_a_first_name_with_unique_names_and_towns():
    people = make_people(200, seed=3)
    assert len({p["name"] for p in people}) == 200 and len({p["town"] for p in people}) == 200
    assert all(a["name"].split()[0] == b["name"].split()[0] for a, b in zip(people[::2], people[1::2]))
    assert make_people(200, seed=3) == people and make_people(200, seed=4) != people


def test_no_answer_follows_its_question_in_the_fact_document_or_leaks_from_its_own_document():
    rng = np.random.default_rng(0)
    for person in make_people(300, seed=1):
        docs = person_documents(person, rng)
        fact = docs[0][1]
        for _, text, pairs in docs[1:]:
            items = [{"prompt": prompt, "candidates": [answer], "answer": 0} for prompt, answer in pairs]
            check_not_verbatim(items, [fact])  # raises if "...last word + answer" is in the fact
            for index, (prompt, answer) in enumerate(pairs):
                assert text.count(f"{prompt}{answer}.\n") == 1
                # the answer is not in the document before its question is answered
                before = "".join(p + a for p, a in pairs[:index]) + prompt
                assert answer.strip() not in before


def test_benchmark_templates_are_split_into_seen_and_held_out():
    training = {t for table in (QUESTIONS_BY_NAME, QUESTIONS_BY_TOWN) for ts in table.values() for t in ts}
    by_slot = {(kind, attribute): prompt for kind, attribute, prompt, _ in READING_QUESTIONS}
    assert set(BENCHMARK_TEMPLATES_SEEN) | set(BENCHMARK_TEMPLATES_HELD_OUT) == set(by_slot)
    assert all(by_slot[slot] in training for slot in BENCHMARK_TEMPLATES_SEEN)
    assert not any(by_slot[slot] in training for slot in BENCHMARK_TEMPLATES_HELD_OUT)
