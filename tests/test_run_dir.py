"""Run directories: names that are one folder, the marker, deleting only a run directory,
a full disk at creation, the data directory from elsewhere, abandoned-branch metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import mounted_tmpfs, run_cli, tiny_run_dict, write_config
from lmforge.core.errors import ConfigError, DataError, LmforgeError
from lmforge.core.metrics_file import append_metrics, current_branch, read_metrics
from lmforge.core.run_lock import RunLock
from lmforge.train.config import RunConfig
from lmforge.train.run_dir import (
    MARKER,
    init_run_dir,
    read_marker,
    record_resume,
    remove_run_dir,
    resolve_data_dir,
    validate_run_name,
)


@pytest.mark.parametrize("name", ["run", "d64L4_tpp20", "my.run-2", "été", "a b"])
def test_ordinary_run_names_are_accepted(name):
    assert validate_run_name(name) == name


@pytest.mark.parametrize("name, why", [
    ("", "empty"), (".", "runs folder or its parent"), ("..", "runs folder or its parent"),
    ("a/b", "separator"), ("../x", "separator"), ("a\\b", "separator"), ("a\x00b", "control"),
    ("a\nb", "control"), (" run", "whitespace"), ("-run", "option"), ("x" * 256, "255 bytes"),
])
def test_run_names_that_are_not_one_folder_are_refused(name, why):
    with pytest.raises(ConfigError, match=f"^name: .*{why}"):
        validate_run_name(name)


def _data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text("{}")
    (data / "tokenizer.json").write_text("{}")
    return data


def _cfg(tmp_path: Path, name: str = "r") -> RunConfig:
    return RunConfig.from_dict({"name": name, "runs_dir": str(tmp_path / "runs")})


def test_init_writes_a_marker_kept_across_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = init_run_dir(_cfg(tmp_path), _data_dir(tmp_path), resuming=False)
    marker = read_marker(path)
    assert marker is not None and len(marker["run_id"]) == 32
    assert marker["working_dir"] == str(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    init_run_dir(_cfg(tmp_path), _data_dir(tmp_path), resuming=True)
    again = read_marker(path)
    assert again["run_id"] == marker["run_id"] and again["created"] == marker["created"]
    assert again["working_dir"] == str(elsewhere)


def test_init_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(LmforgeError, match="not an lmforge run directory.*thesis.tex"):
        init_run_dir(_cfg(tmp_path), _data_dir(tmp_path), resuming=True)
    assert sorted(os.listdir(folder)) == ["thesis.tex"]
    RunLock(tmp_path / "runs" / "fresh").acquire().release()  # only the lock file: still usable
    init_run_dir(_cfg(tmp_path, "fresh"), _data_dir(tmp_path), resuming=False)


INIT_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from lmforge.core.errors import LmforgeError
    from lmforge.train.config import RunConfig
    from lmforge.train.run_dir import init_run_dir
    tmp = Path(sys.argv[1])
    cfg = RunConfig.from_dict({"name": "r", "runs_dir": str(tmp / "runs")})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    try:
        init_run_dir(cfg, tmp / "data", resuming=False)
    except LmforgeError as exc:
        print("refused:", exc)
""")


def test_failed_write_at_creation_is_one_clear_line(tmp_path):
    _data_dir(tmp_path)
    result = subprocess.run([sys.executable, "-c", INIT_CHILD, str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("refused:") and "cannot write the run directory: File too large" in line
    assert "\n" not in line


def test_full_disk_at_creation_is_one_clear_line(tmp_path):
    with mounted_tmpfs(tmp_path / "tmpfs", "1m") as mount_point:
        with open(mount_point / "filler", "wb", buffering=0) as handle:
            try:
                while handle.write(bytes(1 << 16)):
                    pass
            except OSError:
                pass
        cfg = RunConfig.from_dict({"name": "r", "runs_dir": str(mount_point / "runs")})
        with pytest.raises(LmforgeError, match="cannot write the run directory: No space left on device"):
            init_run_dir(cfg, _data_dir(tmp_path), resuming=False)


# ---- deleting a run directory (--fresh) ---------------------------------------------------

def _run_dir(tmp_path: Path, name: str = "r") -> Path:
    return init_run_dir(_cfg(tmp_path, name), _data_dir(tmp_path), resuming=False)


def test_remove_deletes_a_marked_run_directory(tmp_path):
    path = _run_dir(tmp_path)
    (path / "checkpoints" / "step_0000004").mkdir(parents=True)
    assert remove_run_dir(path) is True
    assert not path.exists() and os.listdir(path.parent) == []  # nothing left aside either
    assert remove_run_dir(path) is False  # nothing to delete


def test_remove_accepts_a_run_from_before_markers(tmp_path):
    path = _run_dir(tmp_path)
    (path / MARKER).unlink()
    (path / "metrics.jsonl").write_text("{}\n")
    (path / "checkpoints" / "step_0000004").mkdir(parents=True)
    (path / "eval").mkdir()
    assert remove_run_dir(path) is True


def test_remove_refuses_an_unmarked_folder_that_holds_anything_else(tmp_path):
    path = _run_dir(tmp_path)
    (path / MARKER).unlink()
    (path / "metrics.jsonl").write_text("{}\n")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(LmforgeError, match=r"not an lmforge run directory \(unexpected 'notes.txt'\).*rm -r"):
        remove_run_dir(path)
    assert (path / "notes.txt").exists()


def test_remove_refuses_a_marked_run_that_holds_the_users_files(tmp_path):
    path = _run_dir(tmp_path)
    (path / "checkpoints" / "step_0000004").mkdir(parents=True)
    mine = ["notes.md", "analysis.ipynb", "plots", "a.txt", "b.txt", "c.txt", "checkpoints/best_by_hand"]
    for name in mine:
        (path / name).write_text("the user's")
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    with pytest.raises(LmforgeError) as refused:
        remove_run_dir(path)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path} holds files lmforge did not write (a.txt, analysis.ipynb, b.txt, c.txt, "
                              "notes.md and 2 more); not deleting it")
    assert "move them out" in message and f"rm -r {path}" in message
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before  # nothing touched
    assert read_marker(path) is not None
    for name in mine:
        (path / name).unlink()
    assert remove_run_dir(path) is True and not path.exists()


def test_remove_accepts_everything_lmforge_leaves_in_a_run(tmp_path):
    path = _run_dir(tmp_path)
    for folder in ("eval", "tensorboard", "query_encoder", "checkpoints/step_0000004", "checkpoints/.step_0000008.x1y2",
                   "checkpoints/abandoned/20250101T000000Z"):
        (path / folder).mkdir(parents=True)
    for name in ("metrics.jsonl", "report.html", "model_card.json", ".lock", "checkpoints/.write_probe.123",
                 ".config.yaml.k3j4h5.tmp", ".report.html.a1b2.tmp"):  # temporaries of writes cut short
        (path / name).write_text("")
    assert remove_run_dir(path) is True


def test_fresh_keeps_a_trained_run_holding_a_users_notebook(tmp_path, tiny_corpus):
    cfg = tiny_run_dict(tmp_path, tiny_corpus, model={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                                      "max_seq_len": 32, "moe": None},
                        train={"steps": 2, "batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 0,
                               "checkpoint_every": 2, "keep_checkpoints": 1, "tensorboard": True})
    cfg["eval"] = {"max_tokens_per_domain": 64, "sample_tokens": 2, "sample_prompts": ["the "]}
    config = write_config(tmp_path / "run.yaml", cfg)
    trained = run_cli("train", str(config))  # with the report and TensorBoard: all a run writes
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "runs" / "tiny"
    assert (run / "report.html").is_file() and (run / "tensorboard").is_dir()
    (run / "analysis.ipynb").write_text("{}")
    fresh = run_cli("quickstart", "--config", str(config), "--fresh")
    assert fresh.returncode == 2
    (error,) = fresh.stderr.strip().splitlines()
    assert error == (f"lmforge: error: {run} holds files lmforge did not write (analysis.ipynb); not deleting it — "
                     f"move them out of the run directory, or delete it by hand (rm -r {run})")
    assert (run / "analysis.ipynb").read_text() == "{}" and (run / "checkpoints" / "step_0000002").is_dir()
    (run / "analysis.ipynb").unlink()
    assert remove_run_dir(run) is True and not run.exists()


def test_name_dotdot_never_deletes_the_parent(tmp_path):
    # The reported accident: runs_dir=X/runs, name=.. pointed --fresh at X.
    x = tmp_path / "X"
    (x / "runs").mkdir(parents=True)
    (x / "precious.txt").write_text("keep me")
    with pytest.raises(LmforgeError, match="not an lmforge run directory"):
        remove_run_dir(x / "runs" / "..")
    result = run_cli("quickstart", "--fresh", "--set", f"runs_dir={x / 'runs'}", "--set", "name=..")
    assert result.returncode == 2
    assert "name: '..' cannot name a run" in result.stderr and "Traceback" not in result.stderr
    assert (x / "precious.txt").read_text() == "keep me"


def test_remove_refuses_links_and_protected_folders(tmp_path, monkeypatch):
    path = _run_dir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(LmforgeError, match="symbolic link"):
        remove_run_dir(link)
    monkeypatch.chdir(path)
    with pytest.raises(LmforgeError, match="the working directory"):
        remove_run_dir(Path("."))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(path))
    with pytest.raises(LmforgeError, match="the home folder"):
        remove_run_dir(path)
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    (path / ".git").mkdir()
    with pytest.raises(LmforgeError, match="a git repository"):
        remove_run_dir(path)
    (path / ".git").rmdir()
    with pytest.raises(LmforgeError, match="filesystem root"):
        remove_run_dir(Path("/"))
    assert path.is_dir() and read_marker(path) is not None


def test_remove_refuses_a_run_that_is_training(tmp_path):
    path = _run_dir(tmp_path)
    with RunLock(path, purpose="lmforge train"):
        with pytest.raises(LmforgeError, match=f"in use by process {os.getpid()}"):
            remove_run_dir(path)
    assert path.is_dir()
    assert remove_run_dir(path)


# ---- the data directory, from anywhere -----------------------------------------------------

def test_relative_data_dir_resolves_against_the_recorded_working_dir(tmp_path, monkeypatch):
    trained_in = tmp_path / "project"
    trained_in.mkdir()
    monkeypatch.chdir(trained_in)
    cfg = RunConfig.from_dict({"name": "r", "runs_dir": "runs"})
    path = init_run_dir(cfg, _data_dir(trained_in), resuming=False).absolute()
    checkpoint = path / "checkpoints" / "step_0000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 4, "files": {}, "working_dir": str(trained_in)}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_data_dir(path, "data") == trained_in / "data"
    assert resolve_data_dir(checkpoint, "data") == trained_in / "data"
    assert resolve_data_dir(checkpoint, tmp_path / "abs") == tmp_path / "abs"  # absolute: as given
    with pytest.raises(DataError, match=r"'missing' .* \(tried .*project/missing: not found; .*elsewhere/missing: "
                                        r"not found\)"):
        resolve_data_dir(checkpoint, "missing")


# ---- resumes and abandoned branches in metrics.jsonl -----------------------------------------

def test_records_of_an_abandoned_branch_are_dropped(tmp_path, records):
    metrics = tmp_path / "metrics.jsonl"
    for step in range(1, 31):
        append_metrics(metrics, {"kind": "train", "step": step, "loss": 1.0})
    append_metrics(metrics, {"kind": "checkpoint", "step": 30})
    record_resume(tmp_path, 10, tmp_path / "checkpoints" / "step_0000010", [tmp_path / "abandoned" / "x"],
                  [("optim.lr", 0.003, 0.001)])
    for step in range(11, 16):
        append_metrics(metrics, {"kind": "train", "step": step, "loss": 2.0})
    append_metrics(metrics, {"kind": "note"})  # no step: always kept
    kept = current_branch(read_metrics(metrics))
    train = [r for r in kept if r.get("kind") == "train"]
    assert [r["step"] for r in train] == list(range(1, 16))
    assert all(r["loss"] == (1.0 if r["step"] <= 10 else 2.0) for r in train)
    assert not any(r.get("kind") == "checkpoint" for r in kept)
    resume = next(r for r in kept if r.get("kind") == "resume")
    assert resume["config_changes"] == [{"field": "optim.lr", "old": 0.003, "new": 0.001}]
    assert kept[-1] == {"kind": "note"}
    assert any("resuming with optim.lr = 0.001 (the checkpoint had 0.003)" in r.getMessage() for r in records)
