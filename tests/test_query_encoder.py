"""Trainable query encoder: frozen-exact start, perplexity distillation, save/load, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_dict
from lmforge.cli.main import main
from lmforge.core.errors import CheckpointError, DataError
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.retrieval.database import build_database
from lmforge.retrieval.distillation import (DistillationConfig, kl_loss, lm_target, make_distillation_set,
                                            train_query_encoder)
from lmforge.retrieval.neighbours import precompute_neighbours, search_training_neighbours, training_chunk_sources
from lmforge.retrieval.query_encoder import (QueryEncoder, candidate_embeddings, candidate_order, candidate_scores,
                                             load_query_encoder, rerank)
from lmforge.train.assembly import train_run
from lmforge.train.config import RunConfig

M = 8
K = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus):
    """A tiny prepared corpus, a bag-of-tokens database and a RETRO run trained for 6 steps."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test single-thread fixture
    tmp = tmp_path_factory.mktemp("query_encoder")
    base = tiny_run_dict(tmp, tiny_corpus)
    base["eval"] = {**base["eval"], "task_items": 0}
    prepare_data(DataConfig.from_dict(base["data"]))
    db = build_database(Path(base["data"]["out_dir"]), tmp / "db", chunk_len=M, embedder="bag_of_tokens:32")
    precompute_neighbours(db, k=2, block_size=1024)
    raw = dict(base, name="retro")
    raw["model"] = {**base["model"], "family": "retro", "retro": {"chunk_len": M, "n_neighbours": 2, "encoder_layers": 1}}
    raw["retrieval"] = {"db": str(tmp / "db"), "eval_with_retrieval": False}
    raw["train"] = {**base["train"], "steps": 6, "checkpoint_every": 6, "eval_every": 0}
    run = train_run(RunConfig.from_dict(raw))
    return tmp, db, run


def test_untrained_encoder_reproduces_the_frozen_embedder_and_ranking(setup):
    _, db, _ = setup
    encoder = QueryEncoder.for_database(db)
    assert encoder.kind == "token_table" and encoder.pooling == "sum"
    chunks = np.asarray(db.tokens[:300])
    assert np.allclose(encoder.encode(chunks), db.embeddings[:300], atol=1e-6)
    assert np.allclose(encoder.encode(chunks), db.embedder.embed(chunks), atol=1e-6)
    eos = db.tokenizer.eos_id
    weights = encoder.token_weights.detach()
    assert float(weights[eos]) == 0.0 and float(weights[eos + 1 if eos == 0 else 0]) == 1.0
    ids = db.retrieve(chunks, K)
    assert np.array_equal(rerank(db, encoder, chunks, ids, K), ids)  # the frozen order, ties included
    assert np.array_equal(rerank(db, encoder, chunks, ids, 2), ids[:, :2])
    holes = ids.copy()
    holes[:, 0] = -1  # a missing candidate sorts last
    assert (rerank(db, encoder, chunks, holes, K)[:, -1] == -1).all()
    with pytest.raises(Exception, match="1 <= k <= K"):
        rerank(db, encoder, chunks, ids, K + 1)


def test_untrained_encoder_reproduces_a_model_embedder(setup):
    from lmforge.retrieval.embedders import ModelEmbedder

    _, db, run = setup
    embedder = ModelEmbedder(run / "checkpoints" / "step_0000006", db.tokenizer)
    encoder = QueryEncoder.for_embedder(embedder)
    assert encoder.pooling == "mean" and encoder.dim == 32
    chunks = np.array(db.tokens[:100], dtype=np.int64)
    chunks[:, -2:] = db.tokenizer.eos_id  # end-of-text rows are zero in the table and count in the mean
    assert np.allclose(encoder.encode(chunks), embedder.embed(chunks), atol=1e-6)


def test_encoder_without_a_token_table_is_a_linear_map_on_frozen_vectors():
    encoder = QueryEncoder({"name": "minilm", "dim": 4}, 4)
    assert encoder.kind == "frozen_embedding"
    frozen = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    frozen /= np.linalg.norm(frozen, axis=1, keepdims=True)
    assert np.allclose(encoder.encode(np.zeros((5, M), np.int64), frozen), frozen, atol=1e-6)


def _synthetic_case(db, n_queries: int, seed: int = 0):
    """Training chunks with K candidates each and a made-up LM loss: a candidate holding token T
    (one in 15-40% of chunks) gives a loss 0.5 nats lower. Returns (chunks, ids, losses, has_T)."""
    n_train, _ = training_chunk_sources(db)
    tokens = np.asarray(db.tokens[:n_train]).astype(np.int64)
    present = np.zeros((n_train, db.tokenizer.vocab_size), dtype=bool)
    np.put_along_axis(present, tokens, True, axis=1)
    frequency = present.mean(axis=0)
    token = int(np.flatnonzero((frequency > 0.15) & (frequency < 0.4))[0])
    rng = np.random.default_rng(seed)
    rows = rng.choice(n_train, n_queries, replace=False)
    ids = search_training_neighbours(db, rows, K, exclusion_radius=8)
    has = np.where(ids >= 0, present[np.maximum(ids, 0), token], False)
    losses = np.where(ids >= 0, 3.0 - 0.5 * has + rng.normal(0, 0.01, ids.shape), np.nan)
    return tokens[rows], ids, losses, has


def test_distillation_learns_what_the_target_prefers_and_beats_the_frozen_ranking(setup):
    _, db, _ = setup
    chunks, ids, losses, has = _synthetic_case(db, 600)
    encoder = QueryEncoder.for_database(db)
    features = encoder.features(chunks)
    vectors = candidate_embeddings(db, ids)
    split = {"train": np.arange(0, 240), "val": np.arange(240, 300)}
    sets = {name: make_distillation_set(features[torch.as_tensor(rows)], vectors[rows], ids[rows], losses[rows], 0.1)
            for name, rows in split.items()}
    history = train_query_encoder(encoder, sets["train"], sets["val"], DistillationConfig(steps=150, lr=0.01))
    assert history["steps"] == 150 and len(history["epochs"]) == 38  # 240 queries / 64 per step
    assert history["train_kl_after"] < 0.5 * history["train_kl_before"]
    assert history["val_kl_after"] < 0.6 * history["val_kl_before"]
    assert history["val_kl_after"] == min([history["val_kl_before"], *(e["val_kl"] for e in history["epochs"])])
    # Held-out queries (never trained or validated on) where the choice matters: some candidates hold T.
    held = np.arange(300, 600)
    held = held[has[held].any(axis=1) & ~has[held].all(axis=1)]
    assert len(held) > 50
    frozen_recall = has[held, 0].mean()
    top = candidate_order(candidate_scores(db, encoder.encode(chunks[held]), ids[held]))[:, 0]
    trained_recall = has[held, top].mean()
    assert frozen_recall < 0.45 and trained_recall > 0.85, (frozen_recall, trained_recall)
    assert np.array_equal(rerank(db, encoder, chunks[held], ids[held], 1)[:, 0], ids[held, top])


def test_lm_target_and_kl_basics():
    target = lm_target(np.array([[1.0, 1.1, np.nan], [2.0, 2.0, 2.0]]), tau_lm=0.1)
    assert target[0, 2] == 0 and target[0, 0] > target[0, 1] and np.allclose(target.sum(1), 1)
    assert np.allclose(target[1], 1 / 3)
    encoder = QueryEncoder({"name": "minilm", "dim": 2}, 2)
    vectors = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    data = make_distillation_set(torch.tensor([[1.0, 0.0]]), vectors, np.array([[3, 4]]), np.array([[1.0, 1.0]]), 0.1)
    # target uniform, retriever softmax([1, 0] / 0.05): KL = log 2 - ... > 0, and exactly 0 when they agree
    assert kl_loss(encoder, data, tau_q=0.05).item() > 0.5
    assert kl_loss(encoder, data, tau_q=1e6).item() == pytest.approx(0.0, abs=1e-5)


def test_save_load_round_trip_and_embedder_mismatch(setup, tmp_path):
    tmp, db, _ = setup
    encoder = QueryEncoder.for_database(db)
    with torch.no_grad():
        encoder.token_weights.mul_(torch.rand(encoder.token_weights.shape, generator=torch.Generator().manual_seed(0)))
        encoder.linear.weight.add_(0.1 * torch.randn(encoder.linear.weight.shape))
    chunks = np.asarray(db.tokens[:50])
    encoder.save(tmp_path / "enc", info={"note": "test"})
    spec = json.loads((tmp_path / "enc" / "query_encoder.json").read_text())
    assert spec["embedder"] == db.manifest["embedder"] and spec["note"] == "test"
    loaded = load_query_encoder(tmp_path / "enc", db)
    assert np.allclose(loaded.encode(chunks), encoder.encode(chunks), atol=1e-6)
    assert float(loaded.token_weights.detach()[db.tokenizer.eos_id]) == 0.0
    assert not np.allclose(loaded.encode(chunks), db.embeddings[:50], atol=1e-3)  # really the trained one

    other = build_database(Path(db.manifest["data_dir"]), tmp_path / "db16", chunk_len=M, embedder="bag_of_tokens:16",
                           max_tokens_per_source=2000)
    with pytest.raises(DataError, match="trained against embedder"):
        load_query_encoder(tmp_path / "enc", other)
    with pytest.raises(CheckpointError, match="not a query encoder"):
        load_query_encoder(tmp_path, db)


def test_cli_trains_an_encoder_writes_relevance_and_eval_reranks(setup, capsys):
    tmp, db, run = setup
    out = tmp / "qe"
    code = main(["retrieval", "train-query-encoder", str(run), "--db", str(db.path), "--out", str(out),
                 "--queries", "40", "--candidates", "4", "--heldout-queries", "12", "--steps", "20"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "R@1" in printed and "validation KL" in printed
    result = json.loads((out / "relevance.json").read_text())
    assert result["queries"] == 12 and set(result["domains"]) == {"prose", "code"}
    for key in ("before", "after"):
        assert set(result[key]) == {"top1_loss", "recall_at_1"} and 0 <= result[key]["recall_at_1"] <= 1
        assert result["oracle_loss"] <= result[key]["top1_loss"] + 1e-9
    assert result["oracle_loss"] <= result["mean_candidate_loss"] and result["no_retrieval_loss"] > 0
    assert result["distillation"]["val_kl_after"] <= result["distillation"]["val_kl_before"]
    assert result["settings"]["candidates"] == 4 and result["settings"]["context_chunks"] == 2
    assert load_query_encoder(out, db).kind == "token_table"

    eval_out = tmp / "retrieval.json"
    code = main(["retrieval", "eval", str(run), "--db", str(db.path), "--query-encoder", str(out), "--candidates", "4",
                 "--fractions", "1.0", "--max-tokens", "128", "--out", str(eval_out)])
    assert code == 0
    evaluated = json.loads(eval_out.read_text())
    assert evaluated["reranking"]["candidates"] == 4 and evaluated["reranking"]["path"] == str(out)
    assert set(evaluated["bpb"]["db_1"]) == {"prose", "code"}

    # bad input: clear one-line errors, exit code 2
    assert main(["retrieval", "eval", str(run), "--db", str(db.path), "--query-encoder", str(out),
                 "--candidates", "1", "--fractions", "1.0", "--max-tokens", "64"]) == 2
    assert "must be >= k" in capsys.readouterr().err
    assert main(["retrieval", "train-query-encoder", str(run), "--db", str(db.path), "--candidates", "1"]) == 2
    assert "--candidates must be >= 2" in capsys.readouterr().err
    other = build_database(Path(db.manifest["data_dir"]), tmp / "db4", chunk_len=4, embedder="bag_of_tokens:16",
                           max_tokens_per_source=800)
    assert main(["retrieval", "train-query-encoder", str(run), "--db", str(other.path)]) == 2
    assert "chunk_len 4" in capsys.readouterr().err


def test_bad_input_errors(setup):
    from types import SimpleNamespace

    from lmforge.core.errors import ConfigError
    from lmforge.train.query_encoder_trainer import QueryEncoderSettings, check_model_and_database

    _, db, _ = setup
    data_dir = Path(db.manifest["data_dir"])
    with pytest.raises(CheckpointError, match="not a RETRO model"):
        check_model_and_database(torch.nn.Linear(2, 2), db, data_dir, Path("ckpt"))
    with pytest.raises(ConfigError, match="smaller than the model's k=4"):
        QueryEncoderSettings(candidates=3).check(SimpleNamespace(retro=SimpleNamespace(n_neighbours=4)))
    with pytest.raises(ConfigError, match="--queries must be >= 5"):
        QueryEncoderSettings(queries=2).check(SimpleNamespace(retro=SimpleNamespace(n_neighbours=2)))
