"""RETRO training end to end on the tiny corpus: loader, exact resume, retrofitting, eval, facts.

RETRO is a registered model family (``model.family: retro``): the same run assembly and trainer
as every family train it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_dict
from lmforge.core.errors import ConfigError
from lmforge.core.metrics_file import read_metrics
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.retrieval.batches import RetroLoader
from lmforge.retrieval.database import build_database
from lmforge.retrieval.neighbours import load_neighbours, precompute_neighbours
from lmforge.nn.loading import load_model
from lmforge.nn.retro import RetroModelConfig
from lmforge.train.assembly import build_trainer, train_run
from lmforge.train.callbacks import Callback
from lmforge.train.config import RunConfig
from lmforge.train.retro_family import RetroEvaluator

M = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("retro_train")
    base = tiny_run_dict(tmp, tiny_corpus)
    base["eval"] = {**base["eval"], "task_items": 0}  # multiple-choice tasks need a longer context
    data_dir = Path(base["data"]["out_dir"])
    prepare_data(DataConfig.from_dict(base["data"]))
    db = build_database(data_dir, tmp / "db", chunk_len=M, embedder="bag_of_tokens:32")
    precompute_neighbours(db, k=2, block_size=256)
    return tmp, base, db


@pytest.fixture(scope="module")
def run_a(setup) -> Path:
    """The RETRO run the resume, generation and facts tests read: trained once per module and
    worker, so no test depends on another having run first (pytest-xdist splits a module)."""
    tmp, base, _ = setup
    return train_run(_cfg(tmp, base, "a"))


def _raw(tmp: Path, base: dict, name: str, **retro) -> dict:
    raw = dict(base, name=name)
    raw["model"] = {**base["model"], "family": "retro",
                    "retro": {"chunk_len": M, "n_neighbours": 2, "encoder_layers": 1, **retro}}
    raw["retrieval"] = {"db": str(tmp / "db")}
    raw["train"] = {**base["train"], "steps": 6, "checkpoint_every": 3, "eval_every": 0}
    return raw


def _cfg(tmp: Path, base: dict, name: str, **retro) -> RunConfig:
    return RunConfig.from_dict(_raw(tmp, base, name, **retro))


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


class _Crash(Callback):
    def on_step_end(self, trainer, metrics):
        if trainer.step == 4:
            raise RuntimeError("simulated crash")


def test_loader_windows_are_chunk_aligned_and_neighbours_match(setup):
    tmp, base, db = setup
    nb, _ = load_neighbours(tmp / "db" / "neighbours_k2", db)
    loader = RetroLoader(db, nb, seq_len=32, batch_size=3, seed=1, k=2)
    starts = loader.window_starts(0)
    inputs, targets, neighbours = loader.next_batch()
    assert inputs.shape == (3, 32) and neighbours.shape == (3, 4, 2, 2 * M)
    for row, c in enumerate(starts):
        assert (inputs[row, :M].numpy() == db.tokens[c]).all()
        assert (neighbours[row, 1, 0].numpy() == db.neighbour_tokens(nb[c + 1, 0])).all()
    again = RetroLoader(db, nb, seq_len=32, batch_size=3, seed=1, k=2)
    assert torch.equal(again.next_batch()[2], neighbours)  # pure function of (seed, index)
    with pytest.raises(Exception, match="multiple"):
        RetroLoader(db, nb, seq_len=30, batch_size=3, seed=1, k=2)


def test_gold_neighbours_hold_the_text_itself_and_only_in_the_last_slot(setup):
    tmp, base, db = setup
    nb, _ = load_neighbours(tmp / "db" / "neighbours_k2", db)
    plain = RetroLoader(db, nb, seq_len=32, batch_size=4, seed=1, k=2, align=True)
    gold = RetroLoader(db, nb, seq_len=32, batch_size=4, seed=1, k=2, align=True, gold_neighbour_rate=1.0)
    starts = gold.window_starts(0)
    inputs, _, with_gold = gold.next_batch()
    _, _, without = plain.next_batch()
    assert torch.equal(with_gold[:, :, 0], without[:, :, 0])  # other slots untouched
    for row, c in enumerate(starts):
        for u in range(with_gold.shape[1]):
            text = np.asarray(db.tokens[c + u:c + u + 2]).reshape(-1)
            assert (with_gold[row, u, 1].numpy() == text).all()
    half = RetroLoader(db, nb, seq_len=32, batch_size=4, seed=1, k=2, align=True, gold_neighbour_rate=0.5)
    changed = (half.next_batch()[2][:, :, 1] != without[:, :, 1]).any(-1).float().mean().item()
    assert 0.0 < changed < 1.0  # a share of the chunks, drawn per chunk
    early = RetroLoader(db, nb, seq_len=32, batch_size=4, seed=1, k=2, align=True, gold_neighbour_rate=1.0,
                        gold_neighbour_steps=1)
    assert torch.equal(early.next_batch()[2], with_gold)  # the first batch has them
    assert torch.equal(early.next_batch()[2], plain.next_batch()[2])  # later batches do not


def test_linearly_decayed_gold_neighbours_fade_to_none(setup):
    tmp, base, db = setup
    nb, _ = load_neighbours(tmp / "db" / "neighbours_k2", db)

    def text_share(loader: RetroLoader) -> float:
        """Share of chunks whose last neighbour slot holds the text itself."""
        starts = loader.window_starts(loader.batch_index)
        slot = loader.next_batch()[2][:, :, 1]
        text = torch.stack([torch.stack([torch.from_numpy(np.asarray(db.tokens[c + u:c + u + 2]).reshape(-1)
                                                          .astype(np.int64)) for u in range(slot.shape[1])])
                            for c in starts])
        return (slot == text).all(-1).float().mean().item()

    plain = RetroLoader(db, nb, seq_len=32, batch_size=8, seed=3, k=2, align=True)
    linear = RetroLoader(db, nb, seq_len=32, batch_size=8, seed=3, k=2, align=True, gold_neighbour_rate=1.0,
                         gold_neighbour_steps=4, gold_neighbour_schedule="linear")
    shares = [text_share(linear) for _ in range(5)]  # rates 1, 0.75, 0.5, 0.25, 0
    unforced = [text_share(plain) for _ in range(5)]  # the tiny corpus repeats itself now and then
    assert shares[0] == 1.0 and shares[-1] == unforced[-1] < 0.5
    assert shares[0] > shares[2] > unforced[2]
    with pytest.raises(ValueError, match="needs a number of steps"):
        RetroLoader(db, nb, seq_len=32, batch_size=8, seed=3, k=2, gold_neighbour_rate=0.5,
                    gold_neighbour_schedule="linear")
    with pytest.raises(ConfigError, match="gold_neighbour_schedule: unknown schedule 'cosine'"):
        RunConfig.from_dict({**_raw(tmp, base, "s"), "retrieval": {"db": str(tmp / "db"),
                                                                   "gold_neighbour_schedule": "cosine"}})
    # a time budget may shorten train.steps, over which the linear rate would decay
    budgeted = _raw(tmp, base, "s")
    budgeted["optim"] = {**budgeted.get("optim", {}), "schedule": "wsd"}
    budgeted["train"] = {**budgeted["train"], "time_budget_s": 60}
    with pytest.raises(ConfigError, match="set retrieval.gold_neighbour_steps"):
        RunConfig.from_dict({**budgeted, "retrieval": {"db": str(tmp / "db"), "gold_neighbour_rate": 0.25,
                                                       "gold_neighbour_schedule": "linear"}})


def test_document_neighbours_come_from_the_own_document_but_never_near_the_text(setup):
    tmp, base, db = setup
    nb, _ = load_neighbours(tmp / "db" / "neighbours_k2", db)
    plain = RetroLoader(db, nb, seq_len=32, batch_size=8, seed=5, k=2, align=True, exclusion_radius=2)
    reader = RetroLoader(db, nb, seq_len=32, batch_size=8, seed=5, k=2, align=True, exclusion_radius=2,
                         document_neighbour_rate=1.0)
    tokens, docs = np.asarray(db.tokens), np.asarray(db.doc)
    replaced = 0
    for _ in range(3):
        starts = reader.window_starts(reader.batch_index)
        slot, usual = reader.next_batch()[2], plain.next_batch()[2]
        assert torch.equal(slot[:, :, 0], usual[:, :, 0])  # only the last slot changes
        for row, c in enumerate(starts):
            for u in range(slot.shape[1]):
                if torch.equal(slot[row, u, 1], usual[row, u, 1]):
                    continue  # a document too short to hold a chunk beyond the radius
                rows = np.flatnonzero((tokens == slot[row, u, 1, :M].numpy()).all(1))
                assert any(docs[j, 1] == docs[c + u, 1] and abs(j - (c + u)) > 2 for j in rows)
                replaced += 1
    assert replaced > 0


def test_retro_training_resumes_exactly_and_evaluates_with_retrieval(setup, run_a):
    tmp, base, db = setup
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(_cfg(tmp, base, "b"), extra_callbacks={"crash": _Crash()})
    trainer = build_trainer(_cfg(tmp, base, "b"), resume="auto")
    assert isinstance(trainer.callbacks["heldout_eval"], RetroEvaluator)  # the family's evaluator, by name
    assert trainer.step == 3
    run_b = trainer.fit()
    a, b = _losses(run_a), _losses(run_b)
    assert sorted(a) == list(range(1, 7)) and a == b
    records = [r for r in read_metrics(run_a / "metrics.jsonl") if r.get("kind") == "eval_retrieval"]
    assert records and set(records[-1]["bpb"]) == {"prose", "code"}
    assert json.loads((run_a / "eval" / "final.json").read_text())["bpb_retrieval"]


def test_retrofit_starts_identical_and_trains_only_new_parts(setup, tmp_path):
    tmp, base, db = setup
    dense = RunConfig.from_dict({**base, "name": "dense", "train": {**base["train"], "steps": 3}})
    dense_run = train_run(dense)
    ckpt = dense_run / "checkpoints" / "step_0000003"
    cfg = _cfg(tmp, base, "retrofit", base_checkpoint=str(ckpt), freeze_decoder=True)
    trainer = build_trainer(cfg)
    plain, _, _ = load_model(ckpt)
    inputs, targets, extra = trainer.next_batch()
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.model(inputs, **extra).logits, plain(inputs).logits, atol=1e-5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.model.train()
    trainer.train_step()
    for name, param in trainer.model.named_parameters():
        if not name.startswith(("encoder", "cca.")):
            assert torch.equal(before[name], param), f"frozen decoder weight {name} moved"
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n.startswith("cca."))


def test_retro_generation_and_facts_benchmark(setup, run_a, tmp_path):
    import shutil

    from lmforge.eval.facts import run_facts_benchmark
    from lmforge.eval.retrieval_eval import HeldoutRetrieval, evaluate_retrieval
    from lmforge.retrieval.database import ChunkDatabase
    from lmforge.retrieval.generation import generate_with_retrieval

    tmp, base, db = setup
    model, config, ckpt = load_model(run_a)
    out, used = generate_with_retrieval(model, db, db.tokenizer.encode("the king and the queen"), 40,
                                        temperature=0)
    assert len(out) == 40 and len(used) == (len(db.tokenizer.encode("the king and the queen")) + 39) // M
    long_prompt = list(np.asarray(db.tokens[:6]).reshape(-1)[:45])  # longer than max_seq_len (32)
    out, used = generate_with_retrieval(model, db, long_prompt, 5, temperature=1.0,
                                        generator=torch.Generator().manual_seed(0))
    assert len(out) == 5 and len(used) == (45 + 4) // M
    heldout = HeldoutRetrieval(db, Path(config["data"]["out_dir"]), 32, 256)
    result = evaluate_retrieval(model, heldout, fractions=(0.3, 1.0))
    assert set(result["bpb"]) == {"none", "db_0.3", "db_1"}
    assert sum(b["tokens"] for b in result["overlap_buckets"].values()) > 0
    copy = tmp_path / "db"
    shutil.copytree(db.path, copy)
    facts = run_facts_benchmark(model, db.tokenizer, copy, n_entities=3)
    assert all(facts[c]["questions"] == 9 for c in ("no_retrieval", "before_add", "after_add", "after_remove"))
    assert facts["after_remove"] == facts["before_add"]  # removal restores the database's answers
    assert not ChunkDatabase(copy).alive[len(db):].any()
    # the verbatim variant is a copy test: copying what follows the aligned neighbour answers it
    # where the fact is retrieved (all 72 questions on the demo database; a 32-dim lexical sketch
    # of a 320-token vocabulary retrieves far fewer here), and nothing before the facts are added
    assert facts["copy_baseline_after_add"]["accuracy"] > 0.3 > facts["copy_baseline_before_add"]["accuracy"]
    assert result["guard"]["domains"].keys() == {"prose", "code"}
    assert all(isinstance(v["retrieval_hurts"], bool) for v in result["guard"]["domains"].values())


def test_reading_benchmark_defeats_copying_and_is_summarised_over_seeds(setup, run_a, tmp_path):
    import shutil

    from lmforge.eval.facts import run_facts_benchmark, summarise_seeds

    tmp, base, db = setup
    model, _, _ = load_model(run_a)
    copy = tmp_path / "db"
    shutil.copytree(db.path, copy)
    per_seed = [run_facts_benchmark(model, db.tokenizer, copy, n_entities=4, seed=s, variant="reading")
                for s in (0, 1)]
    for result in per_seed:
        assert result["after_add"]["questions"] == 24  # 6 questions per entity
        assert result["after_remove"]["scores"] == result["before_add"]["scores"]
        # no answer follows the question's words in the documents: the copy rule is near chance
        assert result["copy_baseline_after_add"]["accuracy"] <= 0.4
    summary = summarise_seeds(per_seed)
    assert summary["after_add"]["questions"] == 48 and summary["remove_restores_before"]
    low, high = summary["after_add"]["interval"]
    assert low <= summary["after_add"]["accuracy"] <= high
    assert summary["copy_baseline_after_add"]["interval"][1] < 0.5


@pytest.mark.slow
def test_facts_added_to_the_database_are_answered_better(setup, tmp_path):
    """A RETRO model trained to read its neighbours (gold neighbours half the time, 600 steps, about
    a minute on 2 CPU cores) answers more fact questions once the facts are added to the database,
    and removing them undoes it. Seeded and deterministic on CPU: 2/12 before, 4/12 after."""
    import shutil

    from lmforge.eval.facts import run_facts_benchmark

    tmp, base, db = setup
    raw = _raw(tmp, base, "reader")
    raw["retrieval"] = {"db": str(tmp / "db"), "eval_with_retrieval": False, "gold_neighbour_rate": 0.5}
    raw["train"] = {**raw["train"], "steps": 600, "checkpoint_every": 600, "log_every": 50}
    model, _, _ = load_model(train_run(RunConfig.from_dict(raw)))
    shutil.copytree(db.path, tmp_path / "db")
    facts = run_facts_benchmark(model, db.tokenizer, tmp_path / "db", n_entities=4)
    assert facts["after_add"]["accuracy"] > facts["before_add"]["accuracy"]
    assert facts["after_remove"] == facts["before_add"]


def test_config_errors(setup):
    tmp, base, db = setup
    with pytest.raises(ConfigError, match="multiple of model.retro.chunk_len"):
        raw = _cfg(tmp, base, "x").to_dict()
        raw["train"]["seq_len"] = 30
        RunConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="chunk_len"):
        build_trainer(_cfg(tmp, base, "y", chunk_len=16))
    with pytest.raises(ConfigError, match="model.family: unknown model family 'retrro'"):
        RunConfig.from_dict({**_raw(tmp, base, "z"), "model": {**_raw(tmp, base, "z")["model"], "family": "retrro"}})
    with pytest.raises(ConfigError, match="retrieval: only a model of family 'retro'"):
        RunConfig.from_dict({**base, "retrieval": {"db": str(tmp / "db")}})


def test_family_is_recorded_and_older_configs_still_load(setup):
    tmp, base, db = setup
    cfg = _cfg(tmp, base, "family")
    assert isinstance(cfg.model, RetroModelConfig) and cfg.to_dict()["model"]["family"] == "retro"
    # Configs and checkpoints written before model.family existed: a retro section meant RETRO.
    older = _raw(tmp, base, "older")
    del older["model"]["family"]
    assert RunConfig.from_dict(older).model == cfg.model
    plain = RunConfig.from_dict(base)
    assert type(plain.model).__name__ == "ModelConfig" and plain.model.family == "transformer"
