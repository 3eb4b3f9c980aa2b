"""Checkpoint writes under real faults: a file-size limit (EFBIG) in a child process, a full
tmpfs (ENOSPC, where mounting is permitted), an unwritable checkpoints folder; file modes;
retiring the checkpoints of an abandoned branch."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import mounted_tmpfs
from lmforge.core.checkpoint_files import (
    check_writable,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    retire_later_checkpoints,
    step_dir_name,
    verify_checkpoint_dir,
    write_checkpoint_dir,
)
from lmforge.core.errors import CheckpointError
from lmforge.core.io import atomic_write_text, default_dir_mode, default_file_mode

# A child process: save step 1; then either lower RLIMIT_FSIZE so that writing a file past
# LIMIT bytes fails with EFBIG (SIGXFSZ ignored: the write fails rather than kills), or
# (LIMIT 0) fill the filesystem until FREE bytes are left so that a write fails with ENOSPC;
# then try step 2. Prints what happened as JSON.
CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from pathlib import Path
    import torch
    from lmforge.core.errors import CheckpointError
    from lmforge.nn.config import ModelConfig
    from lmforge.optim.config import OptimConfig
    from lmforge.optim.optimizers import build_optimizer
    from lmforge.train.checkpoint import save_training_checkpoint

    folder, limit, free = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = ModelConfig.from_dict({"d_model": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 256,
                                   "max_seq_len": 16}).build()
    optimizer = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))).loss.backward()
    optimizer.step()
    tokenizer = folder.parent / "tokenizer.json"
    tokenizer.write_text("{}")
    args = (model, optimizer, {"step": 1}, "name: x\\n", tokenizer, 3)
    first = save_training_checkpoint(folder, 1, *args)
    sizes = {p.name: p.stat().st_size for p in first.iterdir()}
    if limit < 0:  # just report the sizes
        print(json.dumps({"sizes": sizes}))
        sys.exit(0)
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    else:
        with open(folder.parent / "filler", "wb", buffering=0) as handle:
            try:
                while handle.write(bytes(1 << 16)):
                    pass
            except OSError:  # ENOSPC: the disk is full
                pass
            handle.truncate(max(os.fstat(handle.fileno()).st_size - free, 0))
    try:
        save_training_checkpoint(folder, 2, *args)
    except CheckpointError as exc:
        print(json.dumps({"error": str(exc), "sizes": sizes}))
    else:
        print(json.dumps({"saved": True, "sizes": sizes}))
""")


def _child(folder: Path, limit: int, free: int = 0) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(limit), str(free)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr  # no traceback, no SIGXFSZ death
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sizes(tmp_path_factory) -> dict[str, int]:
    return _child(tmp_path_factory.mktemp("sizes") / "checkpoints", -1)["sizes"]


def _assert_only_first_checkpoint(folder: Path) -> None:
    assert [p.name for p in folder.iterdir()] == [step_dir_name(1)]  # no temporary directory left
    verify_checkpoint_dir(folder / step_dir_name(1))


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_file_size_limit_fails_the_save_cleanly(tmp_path, sizes, failing):
    # safetensors raises SafetensorError and torch.save RuntimeError on a failed write
    # (not OSError); both must become a CheckpointError that names the file.
    weights, optimizer = sizes["model.safetensors"], sizes["optimizer.pt"]
    assert optimizer > weights  # two moments per weight: the limit below splits them
    limit = weights // 2 if failing == "model.safetensors" else (weights + optimizer) // 2
    folder = tmp_path / "checkpoints"
    outcome = _child(folder, limit)
    assert "error" in outcome, outcome
    assert f"saving step 2 failed while writing {failing}" in outcome["error"]
    assert "earlier checkpoints are intact" in outcome["error"]
    _assert_only_first_checkpoint(folder)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 12 MB tmpfs, if this process may mount one (root in a privileged container)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "12m") as mount_point:
        yield mount_point


def test_full_disk_fails_the_save_cleanly(small_tmpfs, sizes):
    # A real ENOSPC: after step 1 the filesystem is filled until half the weights still fit.
    folder = small_tmpfs / "checkpoints"
    outcome = _child(folder, 0, free=sizes["model.safetensors"] // 2)
    assert "error" in outcome, outcome
    assert "saving step 2 failed" in outcome["error"] and "No space left on device" in outcome["error"]
    _assert_only_first_checkpoint(folder)


def test_unwritable_checkpoints_folder_is_detected_at_start(tmp_path):
    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="checkpoints cannot be written there"):
        check_writable(blocked)
    # A file-size limit of 0 bytes: every write fails with EFBIG, in a child process.
    script = textwrap.dedent("""
        import resource, signal, sys
        from pathlib import Path
        from lmforge.core.checkpoint_files import check_writable
        from lmforge.core.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        try:
            check_writable(Path(sys.argv[1]))
        except CheckpointError as exc:
            print("refused:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ok")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "File too large" in result.stdout
    assert list((tmp_path / "ok").iterdir()) == []  # the probe is removed
    check_writable(tmp_path / "ok")  # without the limit it passes and leaves nothing behind
    assert list((tmp_path / "ok").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoints_folder_is_detected(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot be written"):
            check_writable(folder)
    finally:
        folder.chmod(0o755)


def test_checkpoint_files_and_folder_get_the_usual_modes(tmp_path):
    from safetensors.torch import save_file
    import torch

    writers = {
        "model.safetensors": lambda p: save_file({"w": torch.zeros(4)}, str(p)),  # writes 0600 itself
        "notes.txt": lambda p: p.write_text("x"),
    }
    path = write_checkpoint_dir(tmp_path / "checkpoints", 3, writers, {})
    assert stat.S_IMODE(path.stat().st_mode) == default_dir_mode()
    for name in ("model.safetensors", "notes.txt", "manifest.json"):
        assert stat.S_IMODE((path / name).stat().st_mode) == default_file_mode(), name
    atomic_write_text(tmp_path / "plain.txt", "x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == default_file_mode()


def test_default_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640 and default_dir_mode() == 0o750
    finally:
        os.umask(previous)


# ---- retiring an abandoned branch ------------------------------------------------------

def _fake_checkpoints(folder: Path, steps: list[int]) -> None:
    for step in steps:
        write_checkpoint_dir(folder, step, {"weights.bin": lambda p, s=step: p.write_bytes(bytes([s]))}, {})


def test_resuming_from_an_older_checkpoint_moves_later_ones_aside(tmp_path, records):
    folder = tmp_path / "checkpoints"
    _fake_checkpoints(folder, [10, 20, 30])
    moved = retire_later_checkpoints(folder, folder / step_dir_name(10))
    assert [p.name for p in moved] == [step_dir_name(20), step_dir_name(30)]
    assert [p.name for p in list_checkpoints(folder)] == [step_dir_name(10)]
    assert latest_valid_checkpoint(folder) == folder / step_dir_name(10)  # auto follows this branch
    for path in moved:  # moved intact, nothing deleted
        assert path.parent.parent == folder / "abandoned"
        verify_checkpoint_dir(path)
    note = json.loads((moved[0].parent / "retired.json").read_text())
    assert note["resumed_step"] == 10 and note["retired"] == [step_dir_name(20), step_dir_name(30)]
    assert any("abandoned branch" in r.getMessage() for r in records)
    # The new branch goes on; pruning never reaches into abandoned/.
    _fake_checkpoints(folder, [12, 14, 16])
    prune_checkpoints(folder, keep=1)
    assert [p.name for p in list_checkpoints(folder)] == [step_dir_name(16)]
    assert sorted(p.name for p in moved[0].parent.iterdir()) == ["retired.json", step_dir_name(20),
                                                                 step_dir_name(30)]
    # A second resume from an older step retires into its own folder.
    assert retire_later_checkpoints(folder, folder / step_dir_name(16)) == []
    again = retire_later_checkpoints(folder, moved[0])  # back to the abandoned step 20
    assert [p.name for p in again] == [step_dir_name(16)]  # not on the branch being resumed
    assert len(list((folder / "abandoned").iterdir())) == 2


def test_resuming_from_another_folders_checkpoint_retires_every_local_one(tmp_path):
    other, folder = tmp_path / "other", tmp_path / "checkpoints"
    _fake_checkpoints(other, [8])
    _fake_checkpoints(folder, [4, 8, 12])
    moved = retire_later_checkpoints(folder, other / step_dir_name(8))
    assert sorted(p.name for p in moved) == [step_dir_name(4), step_dir_name(8), step_dir_name(12)]
    assert list_checkpoints(folder) == []


def test_saving_the_same_step_again_replaces_it_in_one_step(tmp_path):
    """The final save right after a periodic one writes step N twice: the new folder takes the name
    by an atomic exchange, so step N exists at every moment, and nothing is left beside it."""
    folder = tmp_path / "checkpoints"

    def writer(text: str):
        return {"weights.txt": lambda path: path.write_text(text)}

    first = write_checkpoint_dir(folder, 5, writer("first"), {})
    second = write_checkpoint_dir(folder, 5, writer("second"), {})
    assert first == second and (second / "weights.txt").read_text() == "second"
    verify_checkpoint_dir(second)
    assert sorted(p.name for p in folder.iterdir()) == [step_dir_name(5)]
