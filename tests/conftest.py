"""Shared fixtures: a tiny two-domain corpus and a tiny run config, built offline."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("LMFORGE_PROGRESS", "0")

WORDS = (
    "the king queen sword castle river night morning love war peace crown ghost storm "
    "island letter garden honour shadow friend enemy ship sea fire stone bird song"
).split()


def _prose(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(20, 40)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return "\n".join(lines) + "\n"


def _code(rng: random.Random) -> str:
    lines = []
    for i in range(rng.randint(4, 8)):
        name = "_".join(rng.sample(WORDS, 2))
        lines += [f"def {name}(x, y={i}):", f"    return x * {rng.randint(1, 9)} + y", ""]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two domains of synthetic text (plus one exact duplicate file) in a temp folder."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for domain, make in (("prose", _prose), ("code", _code)):
        folder = root / domain
        folder.mkdir()
        for i in range(40):
            (folder / f"doc_{i:03d}.txt").write_text(make(rng))
    (root / "prose" / "doc_dup.txt").write_text((root / "prose" / "doc_000.txt").read_text())
    return root


def tiny_run_dict(tmp_path: Path, corpus: Path, **sections: dict) -> dict:
    cfg = {
        "name": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        "data": {
            "out_dir": str(tmp_path / "data"),
            "vocab_size": 320,
            "heldout_fraction": 0.2,
            "num_workers": 1,
            "sources": [
                {"name": "prose", "kind": "files", "path": str(corpus / "prose")},
                {"name": "code", "kind": "files", "path": str(corpus / "code")},
            ],
        },
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32,
                  "moe": {"n_experts": 4, "top_k": 2}},
        "optim": {"lr": 0.003, "warmup_steps": 2},
        "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 6,
                  "checkpoint_every": 4, "keep_checkpoints": 2, "tensorboard": False},
        "eval": {"max_tokens_per_domain": 256, "sample_tokens": 8, "sample_prompts": ["the "]},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def prepare_tiny_data(tmp_path: Path, corpus: Path) -> Path:
    """The tiny corpus prepared with :func:`tiny_run_dict`'s data section into ``tmp_path/data``."""
    from lmforge.data.config import DataConfig
    from lmforge.data.prepare import prepare_data

    cfg = DataConfig.from_dict(tiny_run_dict(tmp_path, corpus)["data"])
    prepare_data(cfg)
    return Path(cfg.out_dir)


def load_bench(name: str):
    """``bench/NAME.py`` as a module (the benches are scripts, not a package); registered in
    ``sys.modules`` first, as dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd, timeout=600,
    )


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def records():
    """Log records from lmforge loggers at INFO and above (they do not propagate to the root
    logger, so pytest's caplog misses them)."""
    import logging

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("lmforge")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def train_losses(run_dir: Path) -> dict[int, float]:
    """Last logged training loss per step (a resumed run re-logs the steps it redoes)."""
    from lmforge.core.metrics_file import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


def dense_reference_run(tmp: Path, corpus: Path, steps: int, name: str) -> Path:
    """Write a tiny dense run config (checkpoints every 4 steps, no mid-run eval) into ``tmp``,
    train it once as ``name`` for comparisons, and return the config path."""
    cfg = tiny_run_dict(tmp, corpus,
                        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32,
                               "moe": None},
                        train={"steps": steps, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 0,
                               "checkpoint_every": 4, "keep_checkpoints": 3, "tensorboard": False})
    config = write_config(tmp / "run.yaml", cfg)
    result = run_cli("train", str(config), "--set", f"name={name}", "--no-report")
    assert result.returncode == 0, result.stderr
    return config


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str):
    """A real small filesystem at ``mount_point`` for full-disk tests (skips the test where this
    process may not mount one); unmounted afterwards."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
