"""Gold fact neighbours (``retrieval.gold_fact_rate``): question chunks of an invented_facts source
read a chunk of their person's fact document in the first neighbour slot during training."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_dict
from lmforge.core.errors import ConfigError
from lmforge.data import invented_facts
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet
from lmforge.retrieval.batches import RetroLoader
from lmforge.retrieval.database import build_database
from lmforge.retrieval.fact_pairs import fact_chunks_of_training_chunks, question_fact_documents
from lmforge.retrieval.neighbours import (excluded_for_training, load_neighbours, precompute_neighbours,
                                          training_chunk_sources)
from lmforge.train.config import RunConfig

M = 8
PEOPLE = 40
FACTS = {"name": "facts", "kind": "invented_facts", "near_dedup_threshold": 1.0, "quality": {"enabled": False}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("gold_facts")
    base = tiny_run_dict(tmp, tiny_corpus)
    base["data"]["sources"] = [base["data"]["sources"][0], FACTS]
    with pytest.MonkeyPatch.context() as patch:  # 40 people, not 3,000: a small, fast source
        patch.setattr(invented_facts, "invented_fact_documents",
                      functools.partial(invented_facts.invented_fact_documents, people=PEOPLE))
        prepare_data(DataConfig.from_dict(base["data"]))
    db = build_database(Path(base["data"]["out_dir"]), tmp / "db", chunk_len=M, embedder="bag_of_tokens:32")
    precompute_neighbours(db, k=2, block_size=256)
    neighbours, _ = load_neighbours(tmp / "db" / "neighbours_k2", db)
    return tmp, base, db, neighbours


def _text(db, document: dict) -> str:
    shards = ShardSet(db.sources["facts"]["data_dir"], "train", "facts")
    j = int(document["name"].split(":")[1])
    ends = np.append(shards.doc_offsets[1:], len(shards))
    start = int(shards.doc_offsets[j])
    return db.tokenizer.decode(shards.get(start, int(ends[j]) - start))


def test_pairs_come_from_the_source_names_and_join_a_question_to_its_person(setup):
    _, _, db, _ = setup
    pairs = question_fact_documents(db, "facts")
    people = invented_facts.make_people(PEOPLE)
    assert PEOPLE < len(pairs) <= 2 * PEOPLE  # two question documents per person, less those held out
    for question, fact in pairs.items():
        fact_text, question_text = _text(db, db.documents[fact]), _text(db, db.documents[question])
        assert "Question:" not in fact_text and question_text.startswith("Question:")
        owner = [p for p in people if f"{p['name']} was born in {p['town']}" in fact_text]
        assert len(owner) == 1
        assert owner[0]["name"] in question_text or owner[0]["town"] in question_text
    assert invented_facts.fact_document_of("person00007:questions_by_town") == "person00007:fact"
    assert invented_facts.fact_document_of("person00007:fact") is None


def _loaders(db, neighbours, rate: float):
    fact_chunks = fact_chunks_of_training_chunks(db, question_fact_documents(db, "facts"))
    common = dict(seq_len=32, batch_size=8, seed=3, k=2, weights={"facts": 1.0}, exclusion_radius=2)
    return (RetroLoader(db, neighbours, **common),
            RetroLoader(db, neighbours, **common, gold_fact_rate=rate, fact_chunks=fact_chunks), fact_chunks)


def test_question_chunks_read_their_fact_document_in_the_first_slot(setup):
    _, _, db, neighbours = setup
    plain, reader, (first, count) = _loaders(db, neighbours, 1.0)
    tokens, docs = np.asarray(db.tokens), np.asarray(db.doc)
    source_of = training_chunk_sources(db)[1]
    given = questions = 0
    for _ in range(4):
        starts = reader.window_starts(reader.batch_index)
        slots, usual = reader.next_batch()[2], plain.next_batch()[2]
        assert torch.equal(slots[:, :, 1], usual[:, :, 1])  # the last slot is never touched
        for row, c in enumerate(starts):
            for u in range(slots.shape[1]):
                q = c + u
                read = slots[row, u, 0, :M].numpy()
                if count[q] == 0:  # no question chunk: its retrieved neighbour stays
                    assert torch.equal(slots[row, u, 0], usual[row, u, 0])
                    continue
                questions += 1
                chunks = np.arange(first[q], first[q] + count[q])
                allowed = chunks[~excluded_for_training(docs, source_of, q, chunks, 2)]
                if len(allowed) == 0:
                    assert torch.equal(slots[row, u, 0], usual[row, u, 0])
                    continue
                assert any((tokens[j] == read).all() for j in allowed)  # a chunk of the paired fact document
                given += 1
    assert questions > 0 and given >= 0.9 * questions


def test_the_rate_is_the_share_of_question_chunks_given_a_fact_neighbour(setup):
    _, _, db, neighbours = setup
    plain, reader, (_, count) = _loaders(db, neighbours, 0.5)
    changed = questions = 0
    for _ in range(40):
        starts = reader.window_starts(reader.batch_index)
        slots, usual = reader.next_batch()[2], plain.next_batch()[2]
        for row, c in enumerate(starts):
            for u in range(slots.shape[1]):
                if count[c + u] > 0:
                    questions += 1
                    changed += not torch.equal(slots[row, u, 0], usual[row, u, 0])
                else:
                    assert torch.equal(slots[row, u], usual[row, u])
    assert questions > 200 and 0.35 < changed / questions < 0.6


def _raw(tmp: Path, base: dict, **retrieval) -> dict:
    raw = dict(base, name="gold_facts")
    raw["model"] = {**base["model"], "family": "retro", "retro": {"chunk_len": M, "n_neighbours": 2,
                                                                  "encoder_layers": 1}}
    raw["retrieval"] = {"db": str(tmp / "db"), **retrieval}
    raw["train"] = {**base["train"], "steps": 2, "eval_every": 0}
    return raw


def test_config_errors(setup):
    tmp, base, _, _ = setup
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="retrieval.gold_fact_rate must be in"):
            RunConfig.from_dict(_raw(tmp, base, gold_fact_rate=bad))
    with pytest.raises(ConfigError, match="gold_fact_source: 'prose' is no data source of kind invented_facts"):
        RunConfig.from_dict(_raw(tmp, base, gold_fact_rate=0.5, gold_fact_source="prose"))
    no_facts = dict(base, data={**base["data"], "sources": base["data"]["sources"][:1]})
    with pytest.raises(ConfigError, match="needs one data source of kind invented_facts, found 0"):
        RunConfig.from_dict(_raw(tmp, no_facts, gold_fact_rate=0.5))
    resolved = RunConfig.from_dict(_raw(tmp, base, gold_fact_rate=0.5))
    assert resolved.retrieval.gold_fact_source == "facts"  # the one invented_facts source, recorded
