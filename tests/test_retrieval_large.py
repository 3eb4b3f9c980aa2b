"""Large retrieval databases: installed packages as a source, decontamination against another data
directory's held-out documents, several data directories in one database, a resumable build
(killed with SIGKILL and rerun), index recall against exact search, parallel neighbours, and
held-out bpb bucketed by the chunk's overlap with the database (RETRO's leakage analysis)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _code, prepare_tiny_data, run_cli
from lmforge.core.errors import ConfigError, DataError
from lmforge.data.config import DataConfig
from lmforge.data.package_source import package_files
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.retrieval_eval import HeldoutRetrieval, database_overlap, evaluate_retrieval
from lmforge.nn.retro import RetroModelConfig
from lmforge.retrieval.database import ChunkDatabase, build_database
from lmforge.retrieval.index import build_index, measure_recall
from lmforge.retrieval.neighbours import precompute_neighbours

M = 16
VENDORED = "pkg_b/_vendored_copy.py"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus) -> Path:
    """The model's own prepared data (the demo's stand-in), with held-out documents."""
    return prepare_tiny_data(tmp_path_factory.mktemp("large_base"), tiny_corpus)


def _heldout_text(data_dir: Path, source: str) -> str:
    """The first held-out document of ``source``, as text."""
    stream = ShardSet(data_dir, "heldout", source)
    stop = int(stream.doc_offsets[1]) if len(stream.doc_offsets) > 1 else len(stream)
    return Tokenizer.load(data_dir / "tokenizer.json").decode(stream.get(0, stop))


@pytest.fixture(scope="module")
def site(tmp_path_factory, base) -> Path:
    """A fake site-packages: two packages, one "vendoring" a copy of a held-out document."""
    root = tmp_path_factory.mktemp("site-packages")
    rng = random.Random(1)
    for package in ("pkg_a", "pkg_b"):
        (root / package / "tests").mkdir(parents=True)
        (root / package / "__pycache__").mkdir()
        (root / package / "__init__.py").write_text(f'"""{package}."""\n')
        for i in range(12):
            (root / package / f"mod_{i}.py").write_text(_code(rng).replace("def f", f"def {package}_f"))
        (root / package / "tests" / "test_mod.py").write_text("def test_x():\n    assert True\n")
        (root / package / "__pycache__" / "mod.py").write_text("cached = 1\n")
    # random prose: unlike the templated code, no other document repeats a run of it
    (root / VENDORED).write_text(_heldout_text(base, "prose"))
    return root


def _prepare_packages(tmp: Path, site: Path, base: Path, decontaminate: bool) -> Path:
    out = tmp / ("packages" if decontaminate else "packages_raw")
    cfg = DataConfig.from_dict({
        "out_dir": str(out), "tokenizer_from": str(base), "heldout_fraction": 0.001, "num_workers": 1,
        "decontamination": {"enabled": decontaminate, "heldout_split": False, "eval_sets": [
            {"name": "base_heldout", "kind": "prepared_heldout", "path": str(base), "role": "heldout"}]},
        "sources": [{"name": "packages", "kind": "installed_packages", "path": str(site)}]})
    prepare_data(cfg)
    return out


@pytest.fixture(scope="module")
def packages(tmp_path_factory, site, base) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("large_packages")
    return {"decontaminated": _prepare_packages(tmp, site, base, True),
            "raw": _prepare_packages(tmp, site, base, False)}


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, base, packages) -> dict[str, ChunkDatabase]:
    tmp = tmp_path_factory.mktemp("large_dbs")
    return {name: build_database([base, data], tmp / name, chunk_len=M, embedder="bag_of_tokens:32")
            for name, data in packages.items()}


def test_package_files_skip_caches_and_tests(site):
    names = {p.relative_to(site).as_posix() for p in package_files(site)}
    assert "pkg_a/mod_0.py" in names and VENDORED in names
    assert not any("/tests/" in n or "__pycache__" in n for n in names)


def test_decontamination_removes_the_vendored_heldout_copy_and_raw_keeps_it(packages):
    removed = json.loads((packages["decontaminated"] / "contamination.json").read_text())["removed_documents"]
    # the copy, and maybe a generated module that shares a 13-gram with held-out code by chance
    assert VENDORED in [d["doc_id"] for d in removed] and len(removed) <= 3
    raw = load_manifest(packages["raw"])
    clean = load_manifest(packages["decontaminated"])
    assert raw["contamination"]["enabled"] is False
    documents = {name: m["sources"]["packages"]["train"]["documents"] for name, m in (("raw", raw), ("clean", clean))}
    assert documents["raw"] == documents["clean"] + len(removed)
    # the same tokenizer as the base data: one database can hold both
    assert (Tokenizer.load(packages["raw"] / "tokenizer.json").sha256
            == Tokenizer.load(packages["decontaminated"] / "tokenizer.json").sha256)


def test_one_database_holds_training_chunks_and_extra_chunks(dbs, base, packages):
    db = dbs["decontaminated"]
    kinds = {name: info["kind"] for name, info in db.sources.items()}
    assert kinds == {"code": "train", "prose": "train", "packages": "extra"}
    info = db.sources["packages"]
    stream = ShardSet(packages["decontaminated"], "train", "packages")
    assert info["n_chunks"] == len(stream) // M
    assert info["first_chunk"] == db.sources["code"]["n_chunks"] + db.sources["prose"]["n_chunks"]
    middle = info["n_chunks"] // 2
    assert (db.tokens[info["first_chunk"] + middle] == stream.get(middle * M, M)).all()
    assert db.documents[int(db.doc[info["first_chunk"] + middle, 0])]["source"] == "packages"
    build = db.manifest["build"]
    assert build["bytes_on_disk_per_chunk"] > 0 and build["peak_rss_bytes_per_chunk"] > 0
    assert set(build["seconds_by_stage"]) >= {"chunks", "embed", "index"}
    recall = db.manifest["recall"]
    assert recall["queries"] > 0 and recall["recall"] == 1.0  # a flat index is exact
    # neighbours are computed for the training chunks only
    out = precompute_neighbours(db, k=2, block_size=64)
    neighbours = np.load(out / "neighbours.npy")
    assert len(neighbours) == db.sources["code"]["n_chunks"] + db.sources["prose"]["n_chunks"]


def test_build_refuses_clashing_source_names(base, tmp_path):
    with pytest.raises(DataError, match="in both"):
        build_database([base, base], tmp_path / "db", chunk_len=M, embedder="bag_of_tokens:32")


def test_ivf_recall_against_exact_search_reaches_one_when_every_cell_is_probed():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, spec = build_index(vectors, np.arange(len(vectors)), "ivf", nlist=16, nprobe=2)
    assert spec["train_sample"] == len(vectors)  # 16 cells x 40 < 10,000: the whole (small) set
    recall = measure_recall(index, vectors, queries=200, k=10, nprobes=(1, 16))
    assert recall["recall_by_nprobe"]["16"] == 1.0  # all cells probed: exact
    assert recall["recall_by_nprobe"]["1"] < recall["recall_by_nprobe"]["16"]
    assert recall["recall"] < 1.0 and recall["nprobe"] == 2 and index.nprobe == 2


_SLOW_BUILD = """
import sys, time
from lmforge.retrieval.embedders import BagOfTokensEmbedder
from lmforge.retrieval.database import build_database
plain = BagOfTokensEmbedder.embed
def slow(self, chunks):
    time.sleep(0.3)
    return plain(self, chunks)
BagOfTokensEmbedder.embed = slow
build_database(sys.argv[1:3], sys.argv[3], chunk_len=16, embedder="bag_of_tokens:32", embed_block=32)
"""


def test_a_build_killed_with_sigkill_resumes_without_redoing_finished_blocks(base, packages, tmp_path):
    out = tmp_path / "db"
    env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(base), str(packages["raw"]), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / ".build" / "embed_00002.done").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the build never finished two embedding blocks"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # killed mid-embedding: no database yet
    finished = len(list((out / ".build").glob("embed_*.done")))
    with pytest.raises(DataError, match="unfinished build with other settings"):
        build_database([base, packages["raw"]], out, chunk_len=16, embedder="bag_of_tokens:16", embed_block=32)
    db = build_database([base, packages["raw"]], out, chunk_len=16, embedder="bag_of_tokens:32", embed_block=32)
    assert db.manifest["build"]["resumed"] is True
    assert db.manifest["build"]["embed_blocks_skipped"] >= finished >= 3
    assert not (out / ".build").exists()
    fresh = build_database([base, packages["raw"]], tmp_path / "fresh", chunk_len=16, embedder="bag_of_tokens:32")
    assert np.array_equal(np.asarray(db.embeddings), np.asarray(fresh.embeddings))
    assert np.array_equal(np.asarray(db.tokens), np.asarray(fresh.tokens))
    assert fresh.manifest["build"]["resumed"] is False


def test_parallel_neighbours_equal_serial_ones_and_resume_a_serial_run(dbs, tmp_path):
    db = dbs["raw"]
    serial = np.load(precompute_neighbours(db, k=2, out=tmp_path / "serial", block_size=40) / "neighbours.npy")
    partial = precompute_neighbours(db, k=2, out=tmp_path / "parallel", block_size=40, max_blocks=1)
    assert not (partial / "neighbours.npy").exists()
    out = precompute_neighbours(db, k=2, out=tmp_path / "parallel", block_size=40, workers=2)
    assert np.array_equal(np.load(out / "neighbours.npy"), serial)
    run = json.loads((out / "manifest.json").read_text())["last_run"]
    assert run["workers"] == 2 and run["blocks_skipped"] == 1 and run["chunks_per_second"] > 0


def test_database_overlap_is_one_for_a_database_chunk_and_low_for_noise(dbs):
    db = dbs["raw"]
    rows = np.array([3, 50, 200])
    chunks = np.asarray(db.tokens[rows]).astype(np.int64)
    assert (database_overlap(db, chunks, np.asarray(db.embeddings[rows])) == 1.0).all()
    noise = np.random.default_rng(0).integers(1, db.tokenizer.vocab_size, size=(3, M))
    assert (database_overlap(db, noise, db.embedder.embed(noise)) < 0.5).all()


def test_overlap_buckets_see_the_vendored_copy_only_in_the_raw_database(dbs, base):
    torch.manual_seed(0)
    vocab = Tokenizer.load(base / "tokenizer.json").vocab_size
    model = RetroModelConfig.from_dict({"vocab_size": vocab, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                        "n_kv_heads": 1, "max_seq_len": 64,
                                        "retro": {"chunk_len": M, "n_neighbours": 2}}).build().eval()
    results = {name: evaluate_retrieval(model, HeldoutRetrieval(db, base, 64, 4096), fractions=(1.0,))
               for name, db in dbs.items()}
    for result in results.values():
        overlap = result["chunk_overlap"]
        assert list(overlap["buckets"]) == ["0-0.125", "0.125-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"]
        assert sum(b["chunks"] for b in overlap["buckets"].values()) == overlap["chunks"] > 0
        counts = [c["chunks"] for c in overlap["cumulative"].values()]
        assert counts == sorted(counts) and counts[-1] == overlap["chunks"]
        everything = overlap["cumulative"]["<=1"]
        low, high = everything["gain_interval"]
        assert low <= everything["bpb_without"] - everything["bpb_with"] <= high
    high = {name: r["chunk_overlap"]["buckets"]["0.75-1"]["chunks"] for name, r in results.items()}
    # the held-out document that only the raw database holds a copy of: its chunks overlap fully
    assert high["raw"] > high["decontaminated"] + 3


@pytest.mark.slow  # two subprocesses, one spawning neighbour workers: ~10-25 s on a shared 2-core machine
def test_build_and_neighbours_through_the_cli_report_time_memory_recall_and_rates(base, packages, tmp_path):
    out = tmp_path / "db"
    build = run_cli("retrieval", "build", str(base), str(packages["raw"]), "--out", str(out), "--chunk-len", str(M),
                    "--embedder", "bag_of_tokens:32")
    assert build.returncode == 0, build.stderr
    assert "packages        extra" in build.stdout
    assert "bytes of peak memory per chunk" in build.stdout
    assert "index recall@10 against exact search: 1.0000" in build.stdout  # auto: flat, exact
    neighbours = run_cli("retrieval", "neighbours", str(out), "--workers", "2", "--block-size", "64")
    assert neighbours.returncode == 0, neighbours.stderr
    assert "2 workers" in neighbours.stdout and "chunks/s" in neighbours.stdout


def test_a_second_build_into_a_database_being_written_is_refused_and_a_finished_one_kept(base, tmp_path):
    import fcntl

    out = tmp_path / "db"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another writer (a build, add or remove) holds the database
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another lmforge process is writing this database"):
            build_database(base, out, chunk_len=M, embedder="bag_of_tokens:16")
    assert not (out / "manifest.json").exists() and not (out / ".build").exists()
    db = build_database(base, out, chunk_len=M, embedder="bag_of_tokens:16")
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="already holds a database"):
        build_database(base, out, chunk_len=M, embedder="bag_of_tokens:16")
    assert (out / "manifest.json").read_bytes() == manifest and len(ChunkDatabase(out)) == len(db)


def test_only_a_marked_scratch_database_is_deleted_by_the_benchmarks(base, tmp_path):
    from lmforge.retrieval.database import mark_scratch_database, remove_database_folder

    users = tmp_path / "users_db"
    build_database(base, users, chunk_len=M, embedder="bag_of_tokens:16")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    for folder in (users, plain):  # a real database without the marker, and no database at all
        with pytest.raises(DataError, match="not deleting it"):
            remove_database_folder(folder)
    assert (users / "manifest.json").is_file() and (plain / "notes.txt").read_text() == "mine"
    mark_scratch_database(users, "a test")
    remove_database_folder(users)
    assert not users.exists()


def test_prepared_heldout_is_refused_as_a_training_source(base, tmp_path):
    with pytest.raises(ConfigError, match="decontamination.eval_sets only"):
        DataConfig.from_dict({"out_dir": str(tmp_path / "d"), "sources": [
            {"name": "leak", "kind": "prepared_heldout", "path": str(base)}]})
