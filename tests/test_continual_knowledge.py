"""Knowledge in the weights vs retrieved (lmforge.continual.knowledge), end to end on the tiny corpus:
a tiny dense parent continued on the fact documents (0% and 50% replay) and made to forget them
again, and a tiny RETRO model whose database gets the facts added and removed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_dict
from lmforge.cli.main import main
from lmforge.continual.knowledge import (FACTS_SOURCE, KnowledgeConfig, facts_data_section, prepare_facts_data,
                                         wilson_interval, write_fact_sources)
from lmforge.core.errors import DataError
from lmforge.core.metrics_file import read_metrics
from lmforge.data.prepare import prepare_data
from lmforge.data.config import DataConfig
from lmforge.data.shards import load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.facts import make_entities
from lmforge.retrieval.database import ChunkDatabase, build_database
from lmforge.retrieval.neighbours import precompute_neighbours
from lmforge.train.assembly import train_run
from lmforge.train.config import RunConfig

DENSE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64, "moe": None}
ENTITIES, STEPS, FORGET = 4, 30, 10


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tiny_corpus):
    """(folder, dense parent run, RETRO run, its database): both trained a few steps on the tiny corpus."""
    tmp = tmp_path_factory.mktemp("knowledge")
    train = {"steps": 8, "batch_size": 4, "seq_len": 32, "log_every": 4, "eval_every": 0, "checkpoint_every": 8,
             "keep_checkpoints": 1, "tensorboard": False}
    base = tiny_run_dict(tmp, tiny_corpus, name="dense", model=DENSE, train=train,
                         eval={"task_items": 0, "sample_tokens": 4})
    dense = train_run(RunConfig.from_dict(base))
    db = build_database(base["data"]["out_dir"], tmp / "db", chunk_len=8, embedder="bag_of_tokens:32")
    precompute_neighbours(db, k=2, block_size=256)
    retro = dict(base, name="retro", retrieval={"db": str(tmp / "db"), "gold_neighbour_rate": 0.25})
    retro["model"] = {**DENSE, "family": "retro", "retro": {"chunk_len": 8, "n_neighbours": 2, "encoder_layers": 1}}
    return tmp, dense, train_run(RunConfig.from_dict(retro)), tmp / "db"


def test_the_comparison_runs_end_to_end_and_every_number_is_measured(parents, capsys):
    tmp, dense, retro, db = parents
    generation = ChunkDatabase(db).generation
    config = {"name": "kw", "runs_dir": str(tmp / "runs"),
              "knowledge": {"dense": str(dense), "retro": str(retro), "database": str(db), "entities": ENTITIES,
                            "steps": STEPS, "replay_shares": [0.0, 0.5], "probe_every": 10, "forget_steps": FORGET,
                            "optim": {"lr": 0.01, "warmup_steps": 2}}}
    path = tmp / "knowledge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["continual-knowledge", str(path)]) == 0
    out = tmp / "runs" / "kw_knowledge"
    result = json.loads((out / "knowledge.json").read_text())
    questions = 3 * ENTITIES

    # The fact documents: their own data, the parent's tokenizer, every document trained on.
    manifest = load_manifest(out / "facts_data")
    assert manifest["sources"][FACTS_SOURCE]["train"]["documents"] == ENTITIES
    assert Tokenizer.load(out / "facts_data" / "tokenizer.json").sha256 == Tokenizer.load(dense / "tokenizer.json").sha256

    for share, key in ((0.0, "replay_0"), (0.5, "replay_0.5")):
        summary = result["weights"][key]
        assert [p["step"] for p in summary["facts"]] == [0, 10, 20, 30]
        for point in summary["facts"]:
            assert point["questions"] == questions and 0 <= point["correct"] <= questions
            assert point["interval"][0] <= point["accuracy"] <= point["interval"][1]
        # the step-0 probe is the parent's own accuracy, the same in both runs
        assert summary["accuracy_before"]["accuracy"] == result["weights"]["replay_0"]["accuracy_before"]["accuracy"]
        # Forgetting is measured on the parent's domains, from the parent's own numbers.
        assert set(summary["change_from_parent"]) == {"parent/prose", "parent/code"}
        assert all(math.isfinite(v) and v != 0.0 for v in summary["change_from_parent"].values())
        assert summary["train_seconds"] > 0 and summary["wall_seconds"] > summary["train_seconds"]
        drawn = [r for r in read_metrics(Path(summary["run"]) / "metrics.jsonl") if r["kind"] == "train"][-1]["tokens_drawn"]
        replayed = sum(v for k, v in drawn.items() if k.startswith("replay/"))
        assert abs(replayed / sum(drawn.values()) - share) <= 0.01
    # Training on the facts raises the true answers' likelihood over the others.
    trained = result["weights"]["replay_0"]
    assert trained["accuracy_after"]["mean_margin_nats"] > trained["accuracy_before"]["mean_margin_nats"]

    forget = result["forget"]
    assert [p["step"] for p in forget["facts"]] == [0, FORGET]
    assert forget["accuracy_before"] == trained["accuracy_after"] | {"step": 0, "train_seconds": 0.0}
    assert set(forget["change_from_parent"]) == {"prose", "code"}  # the parent's data, its own domains now
    assert set(forget["change_from_dense_parent"]) == {"prose", "code"}
    drawn = [r for r in read_metrics(Path(forget["run"]) / "metrics.jsonl") if r["kind"] == "train"][-1]["tokens_drawn"]
    assert FACTS_SOURCE not in drawn and sum(drawn.values()) > 0

    retrieval = result["retrieval"]
    assert retrieval["added_chunks"] > 0 and retrieval["add_seconds"] > 0 and retrieval["remove_seconds"] > 0
    # remove restores exactly what the model answered before add; the weights never changed
    assert retrieval["after_remove"]["accuracy"] == retrieval["before_add"]["accuracy"]
    assert retrieval["after_remove"]["bpb_with_retrieval"] == retrieval["before_add"]["bpb_with_retrieval"]
    for state in ("before_add", "after_add", "after_remove"):
        assert retrieval[state]["bpb_without_retrieval"] == retrieval["before_add"]["bpb_without_retrieval"]
    db_after = ChunkDatabase(db)
    assert db_after.generation > generation and not any(
        d["alive"] for d in db_after.documents if d["source"] == "facts_benchmark")

    table = (out / "knowledge.md").read_text()
    assert "`retrieval add`" in table and "50% replay" in table and f"{FORGET} steps" in table

    # A second call reuses the finished runs: the same numbers, no new training records.
    records = len(read_metrics(Path(trained["run"]) / "metrics.jsonl"))
    assert main(["continual-knowledge", str(path)]) == 0
    again = json.loads((out / "knowledge.json").read_text())
    assert again["weights"] == result["weights"] and again["forget"] == result["forget"]
    assert len(read_metrics(Path(trained["run"]) / "metrics.jsonl")) == records
    # ... but not one trained with other settings.
    config["knowledge"]["steps"] = STEPS + 1
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["continual-knowledge", str(path)]) == 2
    assert "finished earlier with other settings (train.steps)" in capsys.readouterr().err


def test_a_fact_document_in_the_held_out_split_is_refused(parents, tmp_path):
    tmp, dense, _, _ = parents
    write_fact_sources(tmp_path / "text", make_entities(ENTITIES))
    section = facts_data_section(tmp_path / "text", tmp_path / "data", dense.parent.parent / "data")
    section["heldout_fraction"] = 0.5  # the check, not the pipeline, must catch a held-out fact
    with pytest.raises(DataError, match=r"of the 4 fact documents are in the training split"):
        prepare_facts_data(section, ENTITIES)
    # With the experiment's setting every document is trained on.
    section.update(heldout_fraction=facts_data_section(tmp_path, tmp_path, tmp_path)["heldout_fraction"],
                   out_dir=str(tmp_path / "data_ok"))
    assert prepare_facts_data(section, ENTITIES)["sources"][FACTS_SOURCE]["train"]["documents"] == ENTITIES
    assert DataConfig.from_dict(section).quality.enabled is False
    prepare_data(DataConfig.from_dict(section))  # prepared already: a no-op


def test_stray_files_in_the_fact_folder_and_bad_settings_are_refused(tmp_path):
    write_fact_sources(tmp_path, make_entities(2))
    (tmp_path / "notes.txt").write_text("not a fact")
    with pytest.raises(DataError, match="notes.txt"):
        write_fact_sources(tmp_path, make_entities(2))
    with pytest.raises(Exception, match="forget_from"):
        KnowledgeConfig.from_dict({"replay_shares": [0.0, 0.5], "forget_from": 0.25})
    with pytest.raises(Exception, match="train: 'steps'"):
        KnowledgeConfig.from_dict({"train": {"steps": 5}})


def test_a_missing_parent_is_one_error_naming_the_key_and_nothing_is_written(tmp_path, capsys):
    path = tmp_path / "knowledge.yaml"
    path.write_text(yaml.safe_dump({"name": "kw", "runs_dir": str(tmp_path / "runs"),
                                    "knowledge": {"dense": str(tmp_path / "nope"), "retro": None}}))
    assert main(["continual-knowledge", str(path)]) == 2
    assert "knowledge.dense" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(18, 72)
    p, n, z = 18 / 72, 72, 1.959963984540054
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert wilson_interval(0, 72)[0] == 0.0 and wilson_interval(72, 72)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_knowledge_config_is_documented_in_the_shipped_config():
    shipped = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("configs", "continual_facts.yaml").read_text())
    cfg = KnowledgeConfig.from_dict(shipped["knowledge"], path="knowledge")  # every key known and valid
    assert cfg.entities == 24 and cfg.seed == 0 and 0.0 in cfg.replay_shares
