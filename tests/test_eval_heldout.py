"""Held-out bits-per-byte: which windows are scored, the bootstrap interval, per-source
held-out fractions, and the warnings for held-out splits too small to measure on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import prepare_tiny_data, tiny_run_dict
from lmforge.core.errors import ConfigError
from lmforge.data.config import DataConfig
from lmforge.data.heldout_check import heldout_warnings
from lmforge.data.loader import heldout_windows
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.eval.bootstrap import bpb_interval, ratio_interval
from lmforge.eval.config import EvalConfig
from lmforge.eval.heldout import eval_windows, evaluate_heldout
from lmforge.eval.suite import describe, heldout_record
from lmforge.nn.config import ModelConfig


def _tiny_model(data_dir, seed=0):
    from lmforge.data.tokenizer import Tokenizer

    torch.manual_seed(seed)
    vocab = Tokenizer.load(data_dir / "tokenizer.json").vocab_size
    return ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, max_seq_len=32).build()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus):
    return prepare_tiny_data(tmp_path_factory.mktemp("heldout"), tiny_corpus)


# ---- which windows ------------------------------------------------------------------------------
def test_full_budget_scores_every_target_once():
    assert eval_windows(100, 32, 1000) == [(0, 32), (32, 32), (64, 32), (96, 3)]
    assert eval_windows(97, 32, 97) == [(0, 32), (32, 32), (64, 32)]
    assert eval_windows(1, 32, 1000) == [] and eval_windows(100, 32, 1) == []
    assert eval_windows(100, 32, 20) == [(0, 19)]  # less than one window: the start, as before


def test_small_budget_spreads_windows_over_the_whole_stream():
    n, seq_len, budget = 100_001, 100, 2_001
    windows = eval_windows(n, seq_len, budget)
    starts = [s for s, _ in windows]
    assert len(windows) == 20 and all(length == seq_len for _, length in windows)
    assert sum(length for _, length in windows) <= budget - 1
    assert starts == sorted(set(starts)) and all(s % seq_len == 0 for s in starts)  # on the grid, distinct
    assert starts[0] == 0 and starts[-1] >= 0.9 * n  # from the first document to the last
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= seq_len  # evenly spaced
    assert eval_windows(n, seq_len, budget) == windows  # fixed positions: runs compare


# ---- the interval -------------------------------------------------------------------------------
def test_ratio_interval_is_seeded_and_brackets_the_ratio():
    rng = np.random.default_rng(0)
    n_bytes = rng.integers(1_000, 5_000, size=40).astype(float)
    bpb = rng.normal(2.0, 0.3, size=40)
    nll = bpb * n_bytes * math.log(2)
    low, high = ratio_interval(nll, n_bytes)
    point = nll.sum() / (math.log(2) * n_bytes.sum())
    assert low < point < high and bpb.min() < low and high < bpb.max()
    assert ratio_interval(nll, n_bytes) == (low, high)
    assert ratio_interval(nll, n_bytes, seed=1) != (low, high)
    assert ratio_interval(nll[:1], n_bytes[:1]) == pytest.approx((bpb[0], bpb[0]))  # one unit: no spread


def test_more_documents_give_a_narrower_interval():
    rng = np.random.default_rng(1)

    def width(units):
        n_bytes = np.full(units, 3000.0)
        nll = rng.normal(2.0, 0.3, size=units) * n_bytes * math.log(2)
        low, high = ratio_interval(nll, n_bytes)
        return high - low

    assert width(400) < width(25) / 2  # about 1/sqrt(units)


def test_too_few_documents_fall_back_to_windows():
    doc = np.array([1.0, 2.0]), np.array([1.0, 1.0])
    windows = np.array([1.0, 1.1, 1.9, 2.0]), np.ones(4)
    assert bpb_interval(*doc, *windows)[1] == "window"
    five = np.arange(1.0, 6.0), np.ones(5)
    assert bpb_interval(*five, *windows)[1] == "document"
    with pytest.raises(ValueError, match="equal-length"):
        ratio_interval(np.ones(3), np.ones(2))


# ---- evaluation on prepared data ------------------------------------------------------------------
def test_full_budget_matches_the_contiguous_windows_and_counts_every_document(data_dir):
    model = _tiny_model(data_dir)
    result = evaluate_heldout(model, data_dir, seq_len=32, max_tokens_per_domain=10**9, batch_size=4)
    manifest = load_manifest(data_dir)
    for domain in ("prose", "code"):
        nll, count = 0.0, 0
        with torch.no_grad():
            for inputs, targets in heldout_windows(data_dir, domain, 32, None, 4):
                nll += F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                count += targets.numel()
        assert result["tokens"][domain] == count == len(ShardSet(data_dir, "heldout", domain)) - 1
        assert result["loss"][domain] == pytest.approx(nll / count, rel=1e-5)
        assert result["documents"][domain] == manifest["sources"][domain]["heldout"]["documents"] >= 5
        low, high = result["bpb_interval"][domain]
        assert result["interval_unit"][domain] == "document"
        assert low < result["bpb"][domain] < high


def test_small_budget_samples_every_document_and_is_deterministic(data_dir):
    model = _tiny_model(data_dir)
    first = evaluate_heldout(model, data_dir, seq_len=32, max_tokens_per_domain=400, batch_size=4)
    again = evaluate_heldout(model, data_dir, seq_len=32, max_tokens_per_domain=400, batch_size=4)
    assert first == again
    manifest = load_manifest(data_dir)
    for domain in ("prose", "code"):
        assert first["tokens"][domain] <= 399
        # 12 windows spread over the stream reach more documents than the first 400 tokens hold
        stream = ShardSet(data_dir, "heldout", domain)
        in_prefix = int(np.searchsorted(stream.doc_offsets, 400))
        assert in_prefix < first["documents"][domain] <= manifest["sources"][domain]["heldout"]["documents"]


def test_record_and_description_carry_the_interval(data_dir):
    record = heldout_record(_tiny_model(data_dir), data_dir, 32, EvalConfig(max_tokens_per_domain=512),
                            torch.device("cpu"))
    assert set(record["bpb_interval"]) == set(record["bpb"]) == set(record["eval_documents"])
    assert record["interval_level"] == 0.95
    lines = describe(record)
    assert "95% interval" in lines[0] and "documents" in lines[0]
    low, high = record["bpb_interval"]["prose"]
    assert any(line.startswith("prose") and f"{low:.4f}-{high:.4f}" in line for line in lines)
    record["interval_unit"]["prose"] = "window"
    assert any("prose: interval over scored windows" in line for line in describe(record))


# ---- per-source held-out fractions, and the warnings ---------------------------------------------
def test_source_heldout_fraction_overrides_the_global_one_by_hash(tmp_path, tiny_corpus, records):
    raw = tiny_run_dict(tmp_path, tiny_corpus)["data"]
    raw["heldout_fraction"] = 1e-12  # nothing lies below: no held-out document unless a source says so
    raw["sources"][0]["heldout_fraction"] = 0.5  # prose
    cfg = DataConfig.from_dict(raw)
    assert cfg.heldout_fraction_for("prose") == 0.5 and cfg.heldout_fraction_for("code") == 1e-12
    manifest = prepare_data(cfg)
    heldout_hashes = (tmp_path / "data" / "doc_hashes" / "heldout.txt").read_text().split()
    assert manifest["sources"]["code"]["heldout"]["documents"] == 0
    assert len(heldout_hashes) == manifest["sources"]["prose"]["heldout"]["documents"] > 5
    assert all(int(h[:16], 16) / 2**64 < 0.5 for h in heldout_hashes)  # still a pure function of the hash
    warned = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert any("'code' has no held-out documents" in m for m in warned)

    result = evaluate_heldout(_tiny_model(tmp_path / "data"), tmp_path / "data", 32, 256)
    assert set(result["bpb"]) == {"prose"}
    assert sum("'code' has no held-out documents" in r.getMessage() for r in records) == 2  # prepare, eval


def test_no_heldout_anywhere_is_a_clear_warning(tmp_path, tiny_corpus, records):
    raw = tiny_run_dict(tmp_path, tiny_corpus)["data"]
    raw.update(heldout_fraction=1e-12, sources=raw["sources"][1:])
    prepare_data(DataConfig.from_dict(raw))
    result = evaluate_heldout(_tiny_model(tmp_path / "data"), tmp_path / "data", 32, 256)
    assert result["bpb"] == {}
    assert any("no held-out tokens in any domain" in r.getMessage() for r in records)
    record = {"loss": {}, "bpb": {}, "eval_tokens": {}}
    assert any("no held-out tokens in any domain" in line for line in describe(record))


def test_warnings_name_small_and_empty_heldout_splits():
    manifest = {"sources": {"a": {"heldout": {"documents": 0, "tokens": 0}},
                            "b": {"heldout": {"documents": 2, "tokens": 9000}},
                            "c": {"heldout": {"documents": 5, "tokens": 200_000}}}}
    lines = heldout_warnings(manifest)
    assert len(lines) == 2
    assert "'a' has no held-out documents" in lines[0]
    assert "'b' has only 2 held-out documents" in lines[1]


def test_source_heldout_fraction_is_checked_and_optional():
    base = {"sources": [{"name": "s", "kind": "demo_code"}]}
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="source 's': heldout_fraction must be in"):
            DataConfig.from_dict({"sources": [{"name": "s", "kind": "demo_code", "heldout_fraction": bad}]})
    # unset, it leaves the fingerprint as it was (data prepared before the option stays valid)
    assert "heldout_fraction" not in DataConfig.from_dict(base).fingerprint_dict()["sources"][0]


def test_eval_windows_for_other_measurements_are_the_scored_ones(data_dir):
    from lmforge.eval.heldout import heldout_eval_windows

    full = list(heldout_eval_windows(data_dir, "code", 32, 10**9, 4))
    contiguous = list(heldout_windows(data_dir, "code", 32, None, 4))
    assert len(full) == len(contiguous)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, contiguous))
    stream = ShardSet(data_dir, "heldout", "code")
    spread = torch.cat([y for _, y in heldout_eval_windows(data_dir, "code", 32, 200, 4)])
    expected = [stream.get(start + 1, n).astype("int64") for start, n in eval_windows(len(stream), 32, 200)]
    assert torch.equal(spread, torch.from_numpy(np.stack(expected)))
