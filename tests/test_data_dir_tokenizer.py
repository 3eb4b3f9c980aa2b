"""``lmforge eval`` (and everything that finds a run's data through ``resolve_data_dir``) never
scores a checkpoint against data prepared with another tokenizer: such a folder is skipped and
named, with real prepared data folders and a real trained run."""

from __future__ import annotations

import shutil

import pytest

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.core.errors import DataError
from lmforge.core.run_marker import resolve_data_dir
from lmforge.data.prepare import prepare_data
from lmforge.train.config import RunConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    """A tiny run trained in ``project/`` with the relative ``data.out_dir: data``, and the same
    corpus prepared again with another vocabulary size (another tokenizer) in ``other/data``."""
    tmp = tmp_path_factory.mktemp("data_dir")
    project = tmp / "project"
    project.mkdir()
    cfg = tiny_run_dict(tmp, tiny_corpus, name="r", runs_dir="runs",
                        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32,
                               "moe": None},
                        train={"steps": 2, "batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 0,
                               "checkpoint_every": 2, "keep_checkpoints": 1, "tensorboard": False})
    cfg["data"]["out_dir"] = "data"
    cfg["eval"] = {"max_tokens_per_domain": 64, "sample_tokens": 2, "sample_prompts": ["the "]}
    result = run_cli("train", str(write_config(project / "run.yaml", cfg)), "--no-report", cwd=project)
    assert result.returncode == 0, result.stderr
    other = {**cfg["data"], "out_dir": str(tmp / "other" / "data"), "vocab_size": 300}
    prepare_data(RunConfig.from_dict({**cfg, "data": other}).data)
    return tmp


def test_eval_refuses_data_prepared_with_another_tokenizer(trained):
    run, other = trained / "project" / "runs" / "r", trained / "other"
    assert (run / "tokenizer.json").read_bytes() != (other / "data" / "tokenizer.json").read_bytes()
    moved = trained / "project" / "data_moved"
    (trained / "project" / "data").rename(moved)  # the run's own data is gone; other/ has a namesake
    try:
        result = run_cli("eval", str(run), cwd=other)
    finally:
        moved.rename(trained / "project" / "data")
    assert result.returncode == 2
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith("lmforge: error: data directory 'data' of ")
    assert f"{trained / 'project' / 'data'}: not found" in error
    assert f"{other / 'data'}: holds another tokenizer than {run / 'checkpoints' / 'step_0000002'}" in error
    assert not (run / "eval" / "step_0000002.json").exists()  # nothing scored, nothing written


def test_a_folder_with_the_runs_tokenizer_is_chosen_over_one_with_another(trained, tmp_path, monkeypatch):
    run, own = trained / "project" / "runs" / "r", trained / "project" / "data"
    checkpoint = run / "checkpoints" / "step_0000002"
    monkeypatch.chdir(trained / "other")  # holds data/ with another tokenizer
    assert resolve_data_dir(checkpoint, "data") == own  # the recorded working directory's
    assert resolve_data_dir(run, "data") == own
    # The recorded folder prepared again with other settings; a copy of the run's data here.
    copy = tmp_path / "data"
    shutil.copytree(own, copy)
    monkeypatch.chdir(tmp_path)
    original = own / "tokenizer.json"
    saved = original.read_bytes()
    try:
        original.write_bytes((trained / "other" / "data" / "tokenizer.json").read_bytes())
        assert resolve_data_dir(checkpoint, "data") == copy
        with pytest.raises(DataError, match=f"{own}: holds another tokenizer"):
            resolve_data_dir(checkpoint, own)  # absolute: the one candidate, checked too
    finally:
        original.write_bytes(saved)
    assert resolve_data_dir(checkpoint, own) == own
