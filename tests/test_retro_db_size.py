"""bench/retro_db_size.py on a tiny database: nested subsets, subset = direct build, output shape."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_bench, tiny_run_dict
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.retrieval.database import ChunkDatabase, add_documents, build_database
from lmforge.retrieval.neighbours import precompute_neighbours
from lmforge.train.assembly import train_run
from lmforge.train.config import RunConfig

M = 8


def _bench():
    return load_bench("retro_db_size")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("retro_db_size")
    base = tiny_run_dict(tmp, tiny_corpus)
    base["eval"] = {**base["eval"], "task_items": 0}
    data_dir = Path(base["data"]["out_dir"])
    prepare_data(DataConfig.from_dict(base["data"]))
    direct = build_database(data_dir, tmp / "direct", chunk_len=M, embedder="bag_of_tokens:32")
    # the large database: the same training chunks, then extra documents (never trained on)
    shutil.copytree(direct.path, tmp / "large")
    rng = random.Random(1)
    words = " ".join(p.read_text() for p in sorted(tiny_corpus.rglob("*.txt"))).split()
    extra = [(f"extra_{i}", " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))) for i in range(400)]
    add_documents(tmp / "large", extra, source="extra")
    return tmp, base, ChunkDatabase(tmp / "direct"), ChunkDatabase(tmp / "large")


@pytest.fixture(scope="module")
def runs(setup):
    """A RETRO model and a dense model, two steps each (enough to score; the numbers mean nothing)."""
    tmp, base, direct, _ = setup
    runs = {}
    retro = dict(base, name="retro")
    retro["model"] = {**base["model"], "family": "retro",
                      "retro": {"chunk_len": M, "n_neighbours": 2, "encoder_layers": 1}}
    retro["retrieval"] = {"db": str(direct.path)}
    precompute_neighbours(direct, k=2, block_size=256)
    for name, raw in (("retro", retro), ("dense", dict(base, name="dense"))):
        raw["train"] = {**base["train"], "steps": 2, "checkpoint_every": 2, "eval_every": 0}
        runs[name] = train_run(RunConfig.from_dict(raw))
    return runs


def test_subsets_are_nested_contain_the_training_chunks_and_are_deterministic(setup):
    bench = _bench()
    _, _, direct, large = setup
    n_base = bench.train_chunks(large)
    assert n_base == len(direct)
    subsets = bench.nested_subsets(large, [1, 2, 4], seed=0)
    assert [s["multiple"] for s in subsets] == [1, 2, 4]
    base_rows = np.zeros(len(large), dtype=bool)
    base_rows[:n_base] = True
    assert np.array_equal(subsets[0]["chunk_mask"], base_rows)
    for small, big in zip(subsets, subsets[1:]):
        assert not (small["chunk_mask"] & ~big["chunk_mask"]).any()  # every smaller database is inside the larger
        assert not (small["document_mask"] & ~big["document_mask"]).any()
    for s in subsets:
        assert s["chunks"] >= s["multiple"] * n_base
    again = bench.nested_subsets(large, [1, 2, 4], seed=0)
    other = bench.nested_subsets(large, [1, 2, 4], seed=1)
    assert all(np.array_equal(a["chunk_mask"], b["chunk_mask"]) for a, b in zip(subsets, again))
    assert not np.array_equal(subsets[1]["chunk_mask"], other[1]["chunk_mask"])
    assert bench.nested_subsets(large, [10_000], seed=0) == []  # beyond the whole database: the full size covers it


def test_a_subset_database_keeps_its_chunks_and_continuations(setup, tmp_path):
    bench = _bench()
    _, _, _, large = setup
    subset = bench.nested_subsets(large, [2], seed=0)[0]
    db = bench.write_subset(large, subset["chunk_mask"], subset["document_mask"], tmp_path / "two")
    rows = np.flatnonzero(subset["chunk_mask"])
    assert len(db) == len(rows)
    assert np.array_equal(np.asarray(db.tokens), np.asarray(large.tokens[rows]))
    assert np.array_equal(np.asarray(db.embeddings), np.asarray(large.embeddings[rows]))
    # a continuation inside the subset reads the same tokens as in the large database
    nxt = np.asarray(db.next)
    old_next = np.asarray(large.next[rows])
    have = nxt >= 0
    assert have.any()
    assert np.array_equal(np.asarray(db.tokens[nxt[have]]), np.asarray(large.tokens[old_next[have]]))
    assert ((old_next[~have] < 0) | ~subset["chunk_mask"][np.maximum(old_next[~have], 0)]).all()
    assert sum(s["n_chunks"] for s in db.sources.values()) == len(db)
    # every chunk of the subset retrieves its own embedding's nearest neighbour inside the subset
    ids = db.search(np.asarray(db.embeddings[:5]), 1)
    assert (ids[:, 0] >= 0).all() and (ids[:, 0] < len(db)).all()


def test_curve_output_shape_and_the_1x_subset_equals_the_direct_build(setup, runs, tmp_path):
    bench = _bench()
    _, _, direct, large = setup
    result = bench.run_curve(runs["retro"], large.path, tmp_path / "subsets", [1, 2, 4],
                             dense={"1x": runs["dense"]}, max_tokens=256, latency_rounds=1, single_queries=3,
                             check_direct=direct.path)
    assert [s["name"] for s in result["sizes"]] == ["1x", "2x", "4x", "full"]
    chunks = [s["chunks"] for s in result["sizes"]]
    assert chunks == sorted(chunks) and chunks[0] == len(direct) and chunks[-1] == len(large)
    domains = set(result["without_retrieval"])
    assert domains == {"prose", "code"}
    for s in result["sizes"]:
        assert set(s["bpb"]) == domains and set(s["difference"]) == domains
        for d in domains:
            low, high = s["difference"][d]["interval"]
            assert low <= s["difference"][d]["bpb"] <= high
            assert s["bpb"][d] == pytest.approx(result["without_retrieval"][d] + s["difference"][d]["bpb"])
        assert s["latency_ms_per_chunk"]["batched_total"] > 0 and s["latency_ms_per_chunk"]["single_total"] > 0
        assert set(s["neighbours_from_other_sources"]) == domains
    assert all(v == 0 for v in result["sizes"][0]["neighbours_from_other_sources"].values())  # 1x: train chunks only
    assert any(v > 0 for v in result["sizes"][-1]["neighbours_from_other_sources"].values())
    check = result["check_direct"]
    assert check["same_bpb"] and all(check["same_arrays"].values())
    dense = result["dense"]["1x"]
    assert set(dense["bpb"]) == domains
    assert set(dense["retro_minus_dense"]) == {"without_retrieval", "1x", "2x", "4x", "full"}
    bench.write_outputs(result, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sizes"][0]["chunks"] == len(direct)
    assert "| 4x |" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "db_size.png").stat().st_size > 0


def test_nothing_to_score_is_a_clear_error(setup, runs, tmp_path):
    from lmforge.core.errors import DataError

    bench = _bench()
    _, _, _, large = setup
    with pytest.raises(DataError, match="no database size to score"):
        bench.run_curve(runs["retro"], large.path, tmp_path / "subsets", [10_000], include_full=False)
    with pytest.raises(DataError, match="multiples must be >= 1"):
        bench.nested_subsets(large, [0.5])
