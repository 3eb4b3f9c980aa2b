"""Stages in parallel with completion markers: reruns skip finished units; Slurm via datatrove."""

from __future__ import annotations

import shutil

import pytest

from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import load_manifest


def _cfg(out, corpus, **changes) -> DataConfig:
    return DataConfig.from_dict({
        "out_dir": str(out), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 2,
        "chunk_bytes": 20_000,  # several chunks per source, so stages have several units
        "sources": [{"name": "prose", "kind": "files", "path": str(corpus / "prose")},
                    {"name": "code", "kind": "files", "path": str(corpus / "code")}],
        **changes})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("executors") / "data"
    return prepare_data(_cfg(out, tiny_corpus)), out


def test_units_ran_in_parallel_and_left_markers(prepared):
    manifest, out = prepared
    units = manifest["work"]["units"]
    assert units["read"] == 2 and units["quality"] > 2 and units["decontaminate"] == units["quality"]
    assert units["minhash"] == units["quality"] and units["tokenizer"] == 1 and units["shards"] >= 4
    assert len(list((out / "work" / "quality").glob("*/*.done"))) == units["quality"]
    assert set(manifest["work"]["wall_seconds"]) >= {"read", "quality", "dedup", "tokenizer", "shards", "total"}
    steps = [s["name"] for s in manifest["steps"]]
    assert steps == ["normalize", "quality", "exact_dedup", "near_dedup", "decontaminate"]
    # documents flow: each step's output is the next one's input
    for before, after in zip(manifest["steps"][1:3], manifest["steps"][2:4]):
        assert before["documents_out"] == after["documents_in"]


def test_rerun_skips_finished_units(prepared, tiny_corpus, tmp_path, records):
    manifest, out = prepared
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    (copy / "manifest.json").unlink()
    lost = sorted((copy / "work" / "quality" / "prose").glob("*.done"))[1]
    lost.unlink()
    again = prepare_data(_cfg(copy, tiny_corpus, num_workers=1))
    messages = [r.getMessage() for r in records]
    n_filter = manifest["work"]["units"]["quality"]
    assert "read: skipped 2 finished unit(s) of 2" in messages
    assert f"quality: skipped {n_filter - 1} finished unit(s) of {n_filter}" in messages
    # The redone unit gives the same result, so everything after it is reused too.
    assert any(m.startswith("dedup: skipped 1 finished") for m in messages)
    assert again["sources"] == manifest["sources"] and lost.is_file()
    assert again["work"]["skipped_finished_units"]["quality"] == n_filter - 1
    # The tokenizer and every shard were finished too: skipped, not redone.
    assert again["work"]["skipped_finished_units"]["tokenizer"] == 1
    assert again["work"]["skipped_finished_units"]["shards"] == manifest["work"]["units"]["shards"]


def test_slurm_chain_through_datatrove(tmp_path, tiny_corpus, monkeypatch, prepared):
    """Submit with datatrove's SlurmPipelineExecutor (sbatch faked), then play the cluster:
    run every stage's pickled executor for each of its ranks, in order."""
    pytest.importorskip("datatrove")
    import dill
    from datatrove.executor import slurm

    launched: list[tuple[str, tuple]] = []

    def fake_sbatch(contents, job_id_retriever, *args):
        launched.append((contents, args))
        return str(1000 + len(launched))

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_sbatch)
    out = tmp_path / "data"
    cfg = _cfg(out, tiny_corpus, executor="slurm", slurm={"partition": "cpu", "tasks": 3})
    submitted = prepare_data(cfg)
    assert submitted["status"] == "submitted"
    stages = [s["name"] for s in submitted["stages"]]
    assert stages == ["read", "quality", "minhash", "dedup", "eval_index", "decontaminate", "tokenizer", "shards",
                      "manifest"]
    assert [s["tasks"] for s in submitted["stages"]] == [3, 3, 3, 1, 1, 3, 1, 3, 1]
    jobs = [(c, a) for c, a in launched if "launch_pickled_pipeline" in c]
    assert len(jobs) == 9 and "#SBATCH --partition=cpu" in jobs[0][0]
    ids = [s["job_id"] for s in submitted["stages"]]
    for (_, args), previous in zip(jobs[1:], ids[:-1]):
        assert f"--dependency=afterok:{previous}" in " ".join(args)
    assert not (out / "manifest.json").exists()

    # What a Slurm array task has in its environment; datatrove also sets DATATROVE_* (restored after).
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    monkeypatch.setattr(slurm, "expand_slurm_nodelist", lambda nodes: [nodes])  # no scontrol here
    for name in ("NODE_RANK", "EXECUTOR", "NODE_IPS", "CPUS_PER_TASK", "MEM_PER_CPU", "GPUS_ON_NODE"):
        monkeypatch.setenv(f"DATATROVE_{name}", "")
    for stage in stages:
        with open(out / "work" / "slurm" / stage / "executor.pik", "rb") as handle:
            executor = dill.load(handle)
        for rank in range(executor.world_size):
            executor._run_for_rank(rank)
    manifest = load_manifest(out)
    local, _ = prepared
    assert manifest["sources"] == local["sources"]
    assert manifest["pipeline"] == local["pipeline"]


def test_slurm_needs_a_partition(tmp_path, tiny_corpus):
    pytest.importorskip("datatrove")
    with pytest.raises(DataError, match="slurm.partition"):
        prepare_data(_cfg(tmp_path / "data", tiny_corpus, executor="slurm"))
