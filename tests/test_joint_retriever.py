"""End-to-end retrieval training: gradients on both sides, index refresh, kill -9 and resume, learning.

The language model's signal is replaced by a synthetic scorer (loss 0 for a chunk of the
question's fact document, 2 otherwise) so these tests need no trained model; the RETRO
scorer is exercised in docs/results/joint_retriever (bench/joint_retriever.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_dict
from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.retrieval.database import mark_scratch_database
from lmforge.eval.distractor_facts import (build_facts_database, fact_document_ids, make_distractor_setting,
                                           query_chunks)
from lmforge.retrieval.joint import (EncoderRetriever, JointConfig, JointRetrieverTrainer, RefreshedIndex,
                                     embed_documents, read_losses)

M = 32
SCORER = '''
import numpy as np
def fact_scorer(db, fact_docs):
    doc = np.asarray(db.doc)[:, 0]
    def score(rows, chunk_ids):
        return np.where(doc[chunk_ids] == fact_docs[rows], 0.0, 2.0)
    return score
'''
namespace: dict = {}
exec(SCORER, namespace)
fact_scorer = namespace["fact_scorer"]


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_corpus):
    """A database of distractor-facts documents only (tiny corpus tokenizer), with its questions."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("joint_retriever")
    base = tiny_run_dict(tmp, tiny_corpus)
    prepare_data(DataConfig.from_dict(base["data"]))
    setting = make_distractor_setting(24, 12, seed=0)
    db = build_facts_database(base["data"]["out_dir"], tmp / "db", "bag_of_tokens:32", setting["documents"],
                              chunk_len=M)
    train_items, eval_items = setting["train_questions"], setting["eval_questions"]
    return {"tmp": tmp, "data": base["data"]["out_dir"], "db": db, "setting": setting, "train_items": train_items, "eval_items": eval_items,
            "train_chunks": query_chunks(db.tokenizer, train_items, M),
            "train_facts": fact_document_ids(db, train_items)}


def _trainer(task, run_dir: Path, **overrides) -> JointRetrieverTrainer:
    cfg = JointConfig(**{"steps": 40, "batch_size": 16, "candidates": 8, "refresh_every": 10, "checkpoint_every": 10,
                         "lr": 0.05, **overrides})
    return JointRetrieverTrainer(task["db"], task["train_chunks"], fact_scorer(task["db"], task["train_facts"]), cfg,
                                 run_dir)


def _recall_at_1(task, retriever) -> float:
    db, items = task["db"], task["eval_items"]
    ids = retriever.retrieve(query_chunks(db.tokenizer, items, M), 1)[:, 0]
    return float(np.mean(np.asarray(db.doc)[ids, 0] == fact_document_ids(db, items)))


def test_the_database_holds_only_the_task_documents(task):
    db, setting = task["db"], task["setting"]
    live = [d for d in db.documents if d["alive"]]
    assert [d["name"] for d in live] == [name for name, _ in setting["documents"]]
    assert len(setting["documents"]) == 4 * (24 + 12)  # a fact and three distractors per entity
    train_names = {i["entity"] for i in task["train_items"]}
    assert train_names.isdisjoint({i["entity"] for i in task["eval_items"]})


def test_gradients_reach_both_encoders_and_only_the_query_side_when_documents_are_frozen(task, tmp_path):
    trainer = _trainer(task, tmp_path / "joint")
    trainer.refresh()
    trainer.train_step()
    for encoder in (trainer.query_encoder, trainer.document_encoder):
        assert encoder.token_weights.grad is not None and encoder.token_weights.grad.abs().sum() > 0
        assert encoder.linear.weight.grad is not None and encoder.linear.weight.grad.abs().sum() > 0
    query_only = _trainer(task, tmp_path / "query_only", train_documents=False)
    before = query_only.document_encoder.token_weights.detach().clone()
    query_only.refresh()
    query_only.train_step()
    assert query_only.query_encoder.token_weights.grad.abs().sum() > 0
    assert query_only.document_encoder.token_weights.grad is None
    assert torch.equal(query_only.document_encoder.token_weights.detach(), before)


def test_a_refresh_re_embeds_the_database_into_a_new_generation_and_leaves_the_database_alone(task, tmp_path):
    db = task["db"]
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(db.path).iterdir()) if p.is_file()}
    trainer = _trainer(task, tmp_path / "run")
    trainer.refresh()
    live = np.flatnonzero(np.asarray(db.alive))
    assert np.allclose(trainer.index.embeddings, np.asarray(db.embeddings)[live], atol=1e-5)  # exact copy at first
    with torch.no_grad():  # a document encoder that now ignores the first half of the vocabulary
        trainer.document_encoder.token_weights[: trainer.document_encoder.token_weights.shape[0] // 2] = 0.0
    old = trainer.index
    cost = trainer.refresh()
    assert trainer.index.generation == old.generation + 1 == 1
    assert cost["chunks"] == len(live) and cost["seconds"] >= 0
    expected = embed_documents(db, trainer.document_encoder, live)
    assert np.array_equal(trainer.index.embeddings, expected)
    assert not np.allclose(trainer.index.embeddings, old.embeddings, atol=1e-3)
    # the refreshed index searches the new vectors: each chunk's new vector finds itself
    found = trainer.index.search(expected[:50], 1)[:, 0]
    assert np.mean(found == live[:50]) > 0.8
    saved = RefreshedIndex.load(tmp_path / "run" / "index" / "g1")
    assert np.array_equal(saved.embeddings, expected) and np.array_equal(saved.ids, live)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(db.path).iterdir()) if p.is_file()}
    assert after == files


def test_training_raises_held_out_recall_at_1_on_the_learnable_task(task, tmp_path):
    trainer = _trainer(task, tmp_path / "run", steps=60)
    trainer.refresh()
    frozen = _recall_at_1(task, EncoderRetriever(task["db"], trainer.query_encoder, trainer.index))
    frozen_db = _recall_at_1(task, task["db"])
    assert frozen == pytest.approx(frozen_db, abs=0.05)  # the untrained encoders are the frozen retriever
    history = trainer.train(resume="auto")
    trained = _recall_at_1(task, trainer.retriever())
    assert trained > frozen + 0.2, (frozen, trained)
    assert len(history["refreshes"]) == 1 + 60 // 10  # generation 0, then every 10 steps
    losses = [kl for _, kl in read_losses(tmp_path / "run")]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert (tmp_path / "run" / "query_encoder" / "query_encoder.safetensors").is_file()
    assert (tmp_path / "run" / "document_encoder" / "query_encoder.safetensors").is_file()


def test_resume_refuses_other_settings(task, tmp_path):
    _trainer(task, tmp_path / "run", steps=10).train()
    with pytest.raises(Exception, match="other settings"):
        _trainer(task, tmp_path / "run", steps=10, lr=0.1).train()
    with pytest.raises(Exception, match="already holds checkpoints"):
        _trainer(task, tmp_path / "run", steps=10).train(resume="never")


SCRIPT = SCORER + '''
import sys, time
import numpy as np, torch
from pathlib import Path
torch.set_num_threads(1)
from lmforge.eval.distractor_facts import make_distractor_setting, query_chunks, fact_document_ids
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.joint import JointConfig, JointRetrieverTrainer
db = ChunkDatabase(sys.argv[1])
items = make_distractor_setting(24, 12, seed=0)["train_questions"]
cfg = JointConfig(steps=40, batch_size=16, candidates=8, refresh_every=7, checkpoint_every=10, lr=0.05)
trainer = JointRetrieverTrainer(db, query_chunks(db.tokenizer, items, %d),
                                fact_scorer(db, fact_document_ids(db, items)), cfg, sys.argv[2])
delay = float(sys.argv[3])
trainer.progress = lambda n, **fields: time.sleep(delay)  # slow steps: time to kill it mid-run
trainer.train(resume="auto")
''' % M


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_logs_identical_losses(task, tmp_path):
    script = tmp_path / "train_joint.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_PROGRESS": "0"}
    db = str(task["db"].path)
    subprocess.run([sys.executable, str(script), db, str(tmp_path / "whole"), "0"], check=True, env=env, timeout=600)
    proc = subprocess.Popen([sys.executable, str(script), db, str(tmp_path / "killed"), "0.2"], env=env)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step_0000020.pt"
    deadline = time.monotonic() + 600

    def past_step(step: int) -> bool:  # a few steps past the checkpoint at 20 and the refresh at 21
        metrics = tmp_path / "killed" / "metrics.jsonl"
        return metrics.is_file() and f'"step": {step},' in metrics.read_text()
    while not (checkpoint.is_file() and past_step(23)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "query_encoder").exists()
    subprocess.run([sys.executable, str(script), db, str(tmp_path / "killed"), "0"], check=True, env=env, timeout=600)
    whole, resumed = read_losses(tmp_path / "whole"), read_losses(tmp_path / "killed")
    assert [s for s, _ in resumed] == list(range(1, 41))
    assert resumed == whole  # bit-identical KL at every step


def test_random_negatives_join_the_softmax_without_language_model_calls(task, tmp_path):
    scored = []
    base = fact_scorer(task["db"], task["train_facts"])

    def counting(rows, ids):
        scored.append(len(rows))
        return base(rows, ids)

    cfg = JointConfig(steps=5, batch_size=16, candidates=8, random_negatives=6, refresh_every=10, checkpoint_every=0)
    trainer = JointRetrieverTrainer(task["db"], task["train_chunks"], counting, cfg, tmp_path / "run")
    trainer.refresh()
    loss = trainer.train_step()
    assert np.isfinite(loss) and sum(scored) <= 16 * 8  # the negatives are never sent to the scorer
    with pytest.raises(Exception, match="random_negatives"):
        JointConfig(random_negatives=-1).check()


def test_task_database_is_reused_only_when_it_matches_and_an_unfinished_one_is_rebuilt(task):
    tmp, setting = task["tmp"], task["setting"]
    data = task["data"]
    sha = task["db"].tokenizer.sha256
    same = build_facts_database(data, tmp / "db", "bag_of_tokens:32", setting["documents"], M, sha)
    assert same.manifest == task["db"].manifest  # reused as it is
    with pytest.raises(DataError, match="holds another database"):
        build_facts_database(data, tmp / "db", "bag_of_tokens:16", setting["documents"], M, sha)
    with pytest.raises(DataError, match="tokenizer is not the model's"):
        build_facts_database(data, tmp / "other_tok", "bag_of_tokens:32", setting["documents"], M, "0" * 64)
    partial = tmp / "crashed.partial"  # a build killed before the rename: its scratch folder is cleared
    partial.mkdir()
    mark_scratch_database(partial, "a test")
    (partial / "embeddings.g0.npy").write_bytes(b"torn")
    db = build_facts_database(data, tmp / "crashed", "bag_of_tokens:32", setting["documents"], M, sha)
    assert not partial.exists() and np.array_equal(np.asarray(db.tokens), np.asarray(task["db"].tokens))
    assert not (tmp / "crashed" / ".lmforge-scratch-database").exists()
    foreign = tmp / "mine.partial"  # not marked: never deleted
    foreign.mkdir()
    with pytest.raises(DataError, match="remove it yourself"):
        build_facts_database(data, tmp / "mine", "bag_of_tokens:32", setting["documents"], M, sha)
    assert foreign.is_dir()
