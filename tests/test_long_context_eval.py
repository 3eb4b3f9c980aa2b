"""Evaluations that show the context is used: held-out loss by position, the passkey grid and the
synthetic key-value recall source (docs/long_context.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.core.errors import ConfigError
from lmforge.data import kv_recall
from lmforge.data.config import DataConfig, KvRecallConfig, SourceConfig
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.config import EvalConfig, PasskeyConfig
from lmforge.eval.heldout import evaluate_heldout
from lmforge.eval.passkey import build_item, evaluate_passkey
from lmforge.eval.positions import buckets_by_domain, position_buckets
from lmforge.eval.suite import heldout_record
from lmforge.eval.tasks import heldout_documents
from lmforge.nn.config import ModelConfig

RECALL = {"name": "recall", "kind": "kv_recall", "kv_recall": {"documents": 300, "length_chars": [150, 400]}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("long_context")
    cfg = tiny_run_dict(tmp, tiny_corpus)["data"]
    cfg["sources"].append(RECALL)
    prepare_data(DataConfig.from_dict(cfg))
    return tmp / "data"


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return Tokenizer.load(data_dir / "tokenizer.json")


def _unigram_log_probs(data_dir, vocab: int) -> torch.Tensor:
    manifest = load_manifest(data_dir)
    tokens = np.concatenate([ShardSet(data_dir, "heldout", d, manifest).get(0, len(ShardSet(data_dir, "heldout", d)))
                             for d in manifest["sources"]]).astype(np.int64)
    counts = np.bincount(tokens, minlength=vocab) + 0.1
    return torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)


class Unigram(torch.nn.Module):
    """Ignores its context: the same distribution at every position."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.log_probs = torch.nn.Parameter(log_probs)

    def forward(self, ids):
        return SimpleNamespace(logits=self.log_probs.expand(*ids.shape, -1))


class InWindowCache(Unigram):
    """Uses its context: half unigram, half the frequencies of the tokens read so far in the window."""

    def forward(self, ids):
        counts = torch.nn.functional.one_hot(ids, self.log_probs.shape[0]).float().cumsum(1)
        seen = counts / counts.sum(-1, keepdim=True)
        return SimpleNamespace(logits=(0.5 * self.log_probs.exp() + 0.5 * seen).log())


# ---- loss by position --------------------------------------------------------------------------
@pytest.mark.parametrize("width", [8, 5, 64])
def test_position_buckets_partition_the_scored_tokens(data_dir, tokenizer, width):
    torch.manual_seed(0)
    model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=32).build()
    cfg = EvalConfig(max_tokens_per_domain=2000, position_bucket=width, bootstrap_samples=10)
    record = heldout_record(model, data_dir, 32, cfg, torch.device("cpu"))
    assert set(record["loss_by_position"]) == set(record["loss"]) == {"prose", "code", "recall"}
    for domain, buckets in record["loss_by_position"].items():
        # contiguous buckets of `width` positions over the window (the last may be shorter)
        assert buckets["start"] == list(range(0, 32, width)) and buckets["end"][-1] == 32
        assert all(e - s <= width for s, e in zip(buckets["start"], buckets["end"]))
        tokens, nbytes = np.array(buckets["tokens"]), np.array(buckets["bytes"])
        assert tokens.sum() == record["eval_tokens"][domain] and nbytes.sum() == record["eval_bytes"][domain]
        loss = float(np.dot(buckets["loss"], tokens) / tokens.sum())
        assert loss == pytest.approx(record["loss"][domain], rel=1e-9)
        bpb = float(np.dot(buckets["bpb"], nbytes) / nbytes.sum())
        assert bpb == pytest.approx(record["bpb"][domain], rel=1e-9)
    assert record["eval_seq_len"] == 32


def test_position_buckets_of_known_sums():
    sums = {"nll": [4.0, 2.0, 1.0, 1.0, 0.5], "bytes": [2.0, 2.0, 2.0, 2.0, 1.0], "tokens": [2, 2, 2, 2, 1]}
    out = position_buckets(sums, 2)
    assert out["start"] == [0, 2, 4] and out["end"] == [2, 4, 5] and out["tokens"] == [4, 4, 1]
    assert out["loss"] == [1.5, 0.5, 0.5]
    assert out["bpb"][0] == pytest.approx(6.0 / (math.log(2) * 4.0))
    with pytest.raises(ValueError, match="width"):
        position_buckets(sums, 0)


def test_a_model_that_ignores_its_context_has_a_flat_curve_and_one_that_uses_it_falls(data_dir, tokenizer):
    log_probs = _unigram_log_probs(data_dir, tokenizer.vocab_size)
    curves = {}
    for model in (Unigram(log_probs), InWindowCache(log_probs)):
        result = evaluate_heldout(model, data_dir, 64, 100_000, bootstrap_samples=10)
        curves[type(model).__name__] = buckets_by_domain(result["positions"], 16)
    for domain in ("prose", "recall"):  # the domains with thousands of held-out tokens per bucket
        flat = curves["Unigram"][domain]["loss"]
        falling = curves["InWindowCache"][domain]["loss"]
        assert max(flat) - min(flat) < 0.05, flat
        assert falling == sorted(falling, reverse=True) and falling[0] - falling[-1] > 0.3, falling


# ---- the kv_recall source ------------------------------------------------------------------------
def _source(**settings) -> SourceConfig:
    return SourceConfig.from_dict({"name": "recall", "kind": "kv_recall", "kv_recall": settings})


def test_kv_recall_documents_are_deterministic_and_end_with_a_question_on_a_stated_pair():
    first = [d.text for d in iter_documents(_source(documents=50, seed=3))]
    assert first == [d.text for d in iter_documents(_source(documents=50, seed=3))]
    assert first != [d.text for d in iter_documents(_source(documents=50, seed=4))]
    assert len(first) == 50 and len(set(first)) == 50
    for text in first:
        pairs = kv_recall.stated_pairs(text)
        statements, asked = pairs[:-1], pairs[-1]
        assert 1 <= len(statements) <= 4 and asked in statements  # the answer is the asked key's value
        assert len({k for k, _ in statements}) == len(statements)
        key = asked[0]
        assert text.endswith(kv_recall.query(key) + kv_recall.answer(asked[1]) + ".")
        assert text.index(kv_recall.query(key)) > max(text.find(kv_recall.statement(k, v).lstrip())
                                                      for k, v in statements)
    for doc in iter_documents(_source(documents=30, pairs=3, queries=2)):  # several questions, distinct pairs
        stated = kv_recall.stated_pairs(doc.text)
        n_statements = doc.text.count("Remember it.")
        asked = stated[n_statements:]
        assert len(asked) == min(2, n_statements) and len(set(asked)) == len(asked)
        assert set(asked) <= set(stated[:n_statements]) and doc.text.count(" Recall ") == len(asked)
    lengths = [len(d.text) for d in iter_documents(_source(documents=200, length_chars=[300, 600]))]
    assert min(lengths) >= 300 and max(lengths) <= 600 + 100  # at most one filler sentence over


def test_documents_asking_for_the_same_key_share_no_13_gram():
    """Decontamination removes a training document sharing a 13-gram with a held-out one: two
    documents about the same key (keys repeat among thousands of documents) must share none."""
    from lmforge.data.ngrams import text_ngram_hashes

    for seed in range(40):
        rng = np.random.default_rng(seed)
        pairs = [("Lyslys", "134"), ("Gumskim", "735")]
        first = kv_recall.recall_text(rng, pairs, 0, 150)
        second = kv_recall.recall_text(rng, [("Lyslys", "638"), ("Gumskim", "212")], 0, 150)
        assert not set(text_ngram_hashes(first, 13).tolist()) & set(text_ngram_hashes(second, 13).tolist())


def test_kv_recall_settings_are_checked():
    with pytest.raises(ConfigError, match=r"kv_recall.length_chars"):
        _source(length_chars=[500, 100])
    with pytest.raises(ConfigError, match=r"kv_recall.pairs"):
        _source(pairs=0)
    with pytest.raises(ConfigError, match="kv_recall"):
        SourceConfig.from_dict({"name": "x", "kind": "files", "path": "p", "kv_recall": {"documents": 3}})
    assert SourceConfig.from_dict({"name": "r", "kind": "kv_recall"}).kv_recall == KvRecallConfig()
    # data prepared before the option (no kv_recall key) keeps its fingerprint
    data = DataConfig.from_dict({"sources": [{"name": "p", "kind": "files", "path": "p"}]})
    assert "kv_recall" not in data.fingerprint_dict()["sources"][0]


def test_kv_recall_source_is_split_and_kept_whole_by_preparation(data_dir):
    manifest = load_manifest(data_dir)
    splits = manifest["sources"]["recall"]
    assert splits["train"]["documents"] > 0 and splits["heldout"]["documents"] > 0
    assert splits["train"]["documents"] + splits["heldout"]["documents"] == 300
    pipeline = manifest["pipeline"]["recall"]
    assert pipeline["removed_near_duplicates"] == 0 and pipeline["removed_contaminated"] == 0


def test_heldout_keys_and_values_never_occur_in_training_documents(data_dir, tokenizer):
    trained = [p for split in ("train", "heldout")
               for doc in heldout_documents(data_dir, "recall", tokenizer, max_docs=None, split=split)
               for p in kv_recall.stated_pairs(doc)]
    assert len(trained) > 300
    assert not any(kv_recall.key_is_heldout(k) or kv_recall.value_is_heldout(v) for k, v in trained)
    rng = np.random.default_rng(0)
    items = [build_item(tokenizer, rng, 160, 0.5, 4, 10, 3) for _ in range(50)]
    asked = {(item.key, item.values[0]) for item in items}
    keys, values = {k for k, _ in trained}, {v for _, v in trained}
    assert all(kv_recall.key_is_heldout(k) and kv_recall.value_is_heldout(v) for k, v in asked)
    assert not {k for k, _ in asked} & keys and not {v for item in items for v in item.values} & values
    # both parts of each space are populated: one in HELDOUT_BUCKETS is held out
    share = np.mean([kv_recall.value_is_heldout(str(v)) for v in range(100, 1000)])
    assert 0.06 < share < 0.2


# ---- the passkey generator and grid --------------------------------------------------------------
@pytest.mark.parametrize("length,depth,pairs", [(64, 0.0, 1), (128, 0.5, 1), (200, 1.0, 1), (160, 0.25, 3)])
def test_passkey_item_places_the_key_at_the_depth_and_the_question_at_the_end(tokenizer, length, depth, pairs):
    rng = np.random.default_rng(1)
    for _ in range(5):
        item = build_item(tokenizer, rng, length, depth, pairs, 10, 3)
        assert item.length == length and item.context[0] == tokenizer.eos_id
        statement = tokenizer.encode(kv_recall.statement(item.key, item.values[0]))
        assert item.context[item.needle_position:item.needle_position + len(statement)] == statement
        question = tokenizer.encode(kv_recall.query(item.key))
        assert item.context[-len(question):] == question
        # the filler before the key is within one filler sentence (at most ~20 tokens) of depth x filler
        filler = length - 1 - len(question) - len(item.candidates[0]) - pairs * len(statement)
        assert abs(item.depth - depth) * filler <= 20
        assert len(set(item.values)) == 10 and all(len(v) == 3 for v in item.values)
        # the ids are those of the text: what the model reads is what the statement says
        whole = item.context[1:] + item.candidates[0]
        assert tokenizer.encode(tokenizer.decode(whole)) == whole


def test_passkey_multi_key_distractors_are_the_other_stated_values(tokenizer):
    item = build_item(tokenizer, np.random.default_rng(2), 160, 0.5, 4, 10, 3)
    text = tokenizer.decode(item.context)
    stated = dict(kv_recall.stated_pairs(text))
    assert len(stated) == 4 and stated[item.key] == item.values[0]
    assert set(item.values[1:4]) == set(stated.values()) - {item.values[0]}


def test_passkey_grid_shape_and_range(data_dir, tokenizer):
    torch.manual_seed(0)
    model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=128).build()
    cfg = PasskeyConfig(lengths=[96, 128], depths=[0.0, 0.5, 1.0], items=3, multi_key_pairs=2, candidates=4)
    grid = evaluate_passkey(model, tokenizer, cfg, 128, data_dir)
    assert set(grid["variants"]) == {"passkey", "multi_key"} and grid["chance"] == 0.25
    for variant in grid["variants"].values():
        for key in ("accuracy", "exact_match", "placed_depth"):
            assert np.array(variant[key]).shape == (2, 3)
            assert all(0.0 <= v <= 1.0 for row in variant[key] for v in row)
    assert grid == evaluate_passkey(model, tokenizer, cfg, 128, data_dir)  # fixed by the seed
    # a cell's items depend on the cell, not on the other lengths of the grid
    alone = evaluate_passkey(model, tokenizer, PasskeyConfig(lengths=[128], depths=[0.0, 0.5, 1.0], items=3,
                                                             multi_key_pairs=2, candidates=4), 128, data_dir)
    for name, variant in alone["variants"].items():
        assert variant["placed_depth"][0] == grid["variants"][name]["placed_depth"][1]
        assert variant["accuracy"][0] == grid["variants"][name]["accuracy"][1]
    text = evaluate_passkey(model, tokenizer, PasskeyConfig(lengths=[96], items=1, filler="prose"), 128, data_dir)
    assert "The pass key of" in text["example"]["text"] and text["filler"] == "prose"
    # a length that cannot hold a variant's statements and question: a row of None, noted
    short = evaluate_passkey(model, tokenizer, PasskeyConfig(lengths=[64, 128], items=1, multi_key_pairs=4), 128,
                             data_dir)
    assert short["variants"]["multi_key"]["accuracy"][0] == [None] * 5
    assert None not in short["variants"]["multi_key"]["accuracy"][1]
    assert [(s["variant"], s["length"]) for s in short["too_short"]] == [("multi_key", 64)]
    with pytest.raises(ConfigError, match="max_seq_len 128"):
        evaluate_passkey(model, tokenizer, PasskeyConfig(lengths=[256], items=1), 128, data_dir)
    with pytest.raises(ConfigError, match="neither 'words' nor a source"):
        evaluate_passkey(model, tokenizer, PasskeyConfig(lengths=[96], items=1, filler="poetry"), 128, data_dir)


# ---- end to end: train with the recall source, lmforge eval --passkey --seq-len, the report ---------
@pytest.mark.slow
def test_tiny_run_with_recall_source_then_eval_passkey_and_longer_windows(tmp_path, tiny_corpus):
    cfg = tiny_run_dict(tmp_path, tiny_corpus,
                        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64,
                               "moe": None},
                        train={"steps": 6, "batch_size": 4, "seq_len": 64, "log_every": 1, "eval_every": 0,
                               "checkpoint_every": 6, "keep_checkpoints": 1, "tensorboard": False},
                        eval={"max_tokens_per_domain": 512, "sample_tokens": 4, "sample_prompts": ["the "],
                              "task_items": 0, "position_bucket": 16})
    cfg["data"]["sources"].append(RECALL)
    config = write_config(tmp_path / "run.yaml", cfg)
    result = run_cli("train", str(config), "--no-report")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "tiny"
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    assert set(final["loss_by_position"]) == {"prose", "code", "recall"}
    assert final["loss_by_position"]["recall"]["start"] == [0, 16, 32, 48]

    result = run_cli("eval", str(run_dir), "--passkey", "--passkey-items", "2", "--seq-len", "256",
                     "--passkey-lengths", "128,256")
    assert result.returncode == 0, result.stderr
    out = run_dir / "eval" / "step_0000006.seq256.json"
    record = json.loads(out.read_text())
    assert record["eval_seq_len"] == 256 and record["train_seq_len"] == 64
    assert record["loss_by_position"]["recall"]["end"][-1] == 256  # positions past the trained length
    grid = record["passkey"]
    assert grid["lengths"] == [128, 256] and len(grid["depths"]) == 5
    for variant in grid["variants"].values():
        assert np.array(variant["accuracy"]).shape == (2, 5)
        assert all(0.0 <= v <= 1.0 for row in variant["accuracy"] + variant["exact_match"] for v in row)
    png = run_dir / "eval" / "step_0000006.seq256.passkey.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "multi_key" in result.stdout and "by position" in result.stdout

    bad = run_cli("eval", str(run_dir), "--passkey-items", "2")
    assert bad.returncode == 2 and "--passkey-items: set only with --passkey" in bad.stderr

    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    html = (run_dir / "report.html").read_text()
    assert "Long context: is the context used?" in html and 'alt="passkey accuracy by length and depth"' in html
    assert 'alt="held-out loss by position"' in html and "step_0000006.seq256" in html
