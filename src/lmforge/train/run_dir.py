"""The run directory: resolved config, code version, data manifest, metrics, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

from lmforge.core.code_version import code_version
from lmforge.core.errors import LmforgeError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.core.config import read_yaml
from lmforge.train.config import RunConfig


def run_path(cfg: RunConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.name


def init_run_dir(cfg: RunConfig, data_dir: Path, resuming: bool) -> Path:
    """Create ``runs/<name>/`` and record what this run is.

    A fresh run refuses a directory that already holds checkpoints or metrics of another
    run (pass ``--resume auto`` to continue it), so nothing already written is lost.
    """
    path = run_path(cfg)
    config_file = path / "config.yaml"
    if not resuming and (path / "metrics.jsonl").exists():
        raise LmforgeError(
            f"{path} already holds a run; use --resume auto to continue it, "
            "or choose another name (--set name=...)"
        )
    if resuming and config_file.exists():
        previous = read_yaml(config_file)
        if previous.get("model") != cfg.to_dict()["model"]:
            raise LmforgeError(f"{path}: the model config differs from the run being resumed")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, cfg.to_yaml())
    version = code_version()
    atomic_write_json(path / "code_version.json", version)
    if version["diff"]:
        atomic_write_text(path / "code.diff", str(version["diff"]))
    shutil.copyfile(data_dir / "manifest.json", path / "data_manifest.json")
    shutil.copyfile(data_dir / "tokenizer.json", path / "tokenizer.json")
    return path

