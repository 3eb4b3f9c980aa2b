"""``lmforge retrieval`` verbs on a tiny RETRO run, through the real command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_dict
from lmforge.cli.main import main
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.retrieval.database import ChunkDatabase, build_database
from lmforge.retrieval.neighbours import precompute_neighbours

M = 8


@pytest.fixture(scope="module")
def retro(tmp_path_factory, tiny_corpus):
    """Prepared data, a bag-of-tokens database with neighbours, a RETRO config file and a run trained
    6 steps by `lmforge train` (RETRO is a model family like any other)."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test single-thread fixture
    tmp = tmp_path_factory.mktemp("cli_retrieval")
    raw = tiny_run_dict(tmp, tiny_corpus, name="retro")
    raw["eval"] = {**raw["eval"], "task_items": 0}  # multiple-choice tasks need a longer context
    prepare_data(DataConfig.from_dict(raw["data"]))
    db = build_database(Path(raw["data"]["out_dir"]), tmp / "db", chunk_len=M, embedder="bag_of_tokens:32")
    precompute_neighbours(db, k=2, block_size=1024)
    raw["model"] = {**raw["model"], "retro": {"chunk_len": M, "n_neighbours": 2, "encoder_layers": 1}}
    raw["retrieval"] = {"db": str(tmp / "db"), "eval_with_retrieval": False}
    raw["train"] = {**raw["train"], "steps": 6, "checkpoint_every": 6, "eval_every": 0}
    config = tmp / "retro.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--no-report"]) == 0
    return tmp, config, tmp / "runs" / "retro"


def test_facts_through_the_cli_leaves_the_database_as_it_was(retro, tmp_path, capsys):
    tmp, _, run = retro
    db = tmp_path / "db"
    shutil.copytree(tmp / "db", db)  # the benchmark adds, then removes, documents
    before = ChunkDatabase(db)
    out = tmp_path / "facts.json"
    assert main(["retrieval", "facts", str(run), "--db", str(db), "--entities", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "after_remove" in printed and f"written: {out}" in printed
    result = json.loads(out.read_text())
    assert result["output"] == str(out) and result["entities"] == 2
    for condition in ("no_retrieval", "before_add", "after_add", "after_remove"):
        assert result[condition]["questions"] == 6 and 0 <= result[condition]["accuracy"] <= 1
    after = ChunkDatabase(db)
    assert after.generation == before.generation + 2  # one add, one remove
    assert sum(d["alive"] for d in after.documents) == sum(d["alive"] for d in before.documents)


def test_reading_facts_over_seeds_through_the_cli(retro, tmp_path, capsys):
    tmp, _, run = retro
    db = tmp_path / "db"
    shutil.copytree(tmp / "db", db)
    out = tmp_path / "reading.json"
    assert main(["retrieval", "facts", str(run), "--db", str(db), "--entities", "3", "--variant", "reading",
                 "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reading variant, seeds [0, 1]" in printed and "copy_baseline_after_add" in printed
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1] and len(result["per_seed"]) == 2
    assert result["summary"]["after_add"]["questions"] == 36 and result["summary"]["remove_restores_before"]


def test_eval_through_the_cli_scores_each_fraction_and_writes_the_default_file(retro, capsys):
    tmp, _, run = retro
    assert main(["retrieval", "eval", str(run), "--db", str(tmp / "db"), "--fractions", "0.5,1",
                 "--max-tokens", "128"]) == 0
    out = run / "eval" / "retrieval.json"
    assert f"written: {out}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["bpb"]) == {"none", "db_0.5", "db_1"} and result["output"] == str(out)


def test_eval_of_chosen_domains_scores_only_those(retro, tmp_path, capsys):
    tmp, _, run = retro
    out = tmp_path / "code.json"
    assert main(["retrieval", "eval", str(run), "--db", str(tmp / "db"), "--fractions", "1", "--max-tokens", "128",
                 "--out", str(out)]) == 0
    domains = sorted(json.loads(out.read_text())["bpb"]["none"])
    assert len(domains) >= 2
    assert main(["retrieval", "eval", str(run), "--db", str(tmp / "db"), "--fractions", "1", "--max-tokens", "128",
                 "--domains", domains[0], "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["bpb"]["none"]) == [domains[0]] and result["domains"] == [domains[0]]
    assert main(["retrieval", "eval", str(run), "--db", str(tmp / "db"), "--domains", "nosuch",
                 "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "no held-out domain 'nosuch'" in err and not (tmp_path / "x.json").exists()


def test_eval_of_a_missing_database_is_one_line(retro, tmp_path, capsys):
    _, _, run = retro
    assert main(["retrieval", "eval", str(run), "--db", str(tmp_path / "nodb"), "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and str(tmp_path / "nodb") in err and "Traceback" not in err


def test_retrieval_train_is_an_alias_of_train_for_retro_configs(retro, capsys):
    """`retrieval train` dispatches to the handler of `lmforge train`, which trains any model family."""
    tmp, config, _ = retro
    code = main(["retrieval", "train", str(config), "--set", "name=alias", "--no-report"])
    assert code == 0, capsys.readouterr().err
    run = tmp / "runs" / "alias"
    assert (run / "metrics.jsonl").is_file() and list((run / "checkpoints").iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["retro"]["chunk_len"] == M


def test_train_query_encoder_writes_into_the_run_and_eval_reranks_with_it(retro, capsys):
    tmp, _, run = retro
    assert main(["retrieval", "train-query-encoder", str(run), "--db", str(tmp / "db"), "--queries", "20",
                 "--candidates", "4", "--heldout-queries", "8", "--steps", "5", "--device", "cpu"]) == 0
    out = run / "query_encoder"
    assert f"written: {out / 'query_encoder.safetensors'}, {out / 'relevance.json'}" in capsys.readouterr().out
    relevance = json.loads((out / "relevance.json").read_text())
    assert relevance["encoder"] == str(out) and relevance["settings"]["candidates"] == 4
    eval_out = tmp / "reranked.json"
    assert main(["retrieval", "eval", str(run), "--db", str(tmp / "db"), "--query-encoder", str(out),
                 "--candidates", "4", "--fractions", "1", "--max-tokens", "64", "--out", str(eval_out)]) == 0
    assert "the query encoder's top 2 of 4 candidates" in capsys.readouterr().out
    assert json.loads(eval_out.read_text())["reranking"] == {"candidates": 4, "encoder": "token_table",
                                                             "path": str(out)}


def test_generate_refuses_an_empty_prompt(retro, capsys):
    _, _, run = retro
    assert main(["generate", str(run), "--prompt", "", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: --prompt is empty: give some text to continue"
