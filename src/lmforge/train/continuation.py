"""Where a continued run's old data is: the data it replays and the domains it is evaluated on.

A run that continues a parent (``init.path``) on new data is evaluated on its own held-out
domains and on the parent's, so forgetting (a rise of bits-per-byte on the old domains) and
adaptation (a fall on the new ones) are measured in every evaluation. The parent's data directory
is found as evaluation finds a run's data (:func:`lmforge.core.run_marker.resolve_data_dir`: the
recorded working directory, then this one; a folder with another tokenizer is skipped).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.core.errors import DataError, LmforgeError
from lmforge.core.run_marker import resolve_data_dir
from lmforge.data.shards import read_doc_hashes
from lmforge.data.tokenizer import require_same_tokenizer
from lmforge.nn.loading import checkpoint_config, resolve_checkpoint

PARENT_PREFIX = "parent/"


def parent_data_dir(init_path: str) -> Path:
    """The prepared data directory the parent checkpoint (or run) ``init_path`` was trained on."""
    checkpoint = resolve_checkpoint(init_path)
    config = checkpoint_config(checkpoint)
    out_dir = (config.get("data") or {}).get("out_dir")
    if not out_dir:
        raise DataError(f"init.path {init_path!r}: its config names no data directory (data.out_dir)")
    return resolve_data_dir(checkpoint, out_dir)


def with_parent_replay_sources(cfg: Any) -> Any:
    """``cfg`` with ``replay.sources`` filled in when it replays its parent's data without naming
    sources: the parent's own mixture weights (the resolved config then records what is replayed)."""
    if cfg.replay is None or cfg.replay.sources is not None or cfg.replay.data_dir is not None or cfg.init.path is None:
        return cfg
    config = checkpoint_config(resolve_checkpoint(cfg.init.path))
    sources = {s["name"]: float(s.get("weight", 1.0)) for s in (config.get("data") or {}).get("sources", [])
               if isinstance(s, dict) and "name" in s}
    sources = {name: weight for name, weight in sources.items() if weight > 0}
    if not sources:
        return cfg  # nothing recorded: every source of the parent's data, by token count
    return dataclasses.replace(cfg, replay=dataclasses.replace(cfg.replay, sources=sources))


def replay_data_dir(cfg: Any) -> Path | None:
    """The data directory ``cfg.replay`` draws from (None without replay): ``replay.data_dir``, else
    the parent's, else the run's own (``replay.sources`` then names which of its sources). Its
    tokenizer must be the run's: the same token ids must mean the same text."""
    if cfg.replay is None:
        return None
    if cfg.replay.data_dir is not None:
        where, path = "replay.data_dir", Path(cfg.replay.data_dir)
    elif cfg.init.path is not None:
        where, path = f"the parent's data (init.path {cfg.init.path!r})", parent_data_dir(cfg.init.path)
    else:
        where, path = "data.out_dir", Path(cfg.data.out_dir)
    if not (path / "manifest.json").is_file():
        raise DataError(f"{where}: {path} is not a prepared data directory (no manifest.json); "
                        "prepare it with `lmforge data prepare`")
    try:
        require_same_tokenizer(cfg.data.out_dir, path)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    return path


def evaluation_data_dirs(cfg: Any, data_dir: Path, replay_dir: Path | None) -> dict[str, Path]:
    """Prefix → prepared data directory evaluated at each held-out evaluation: the run's own
    (prefix ``""``) and, for a continued run whose parent's data lies elsewhere, the parent's
    (``"parent/"``: its domains are logged as ``parent/<domain>``)."""
    dirs = {"": data_dir}
    old = replay_dir
    if old is None and cfg.init.path is not None:
        try:
            old = parent_data_dir(cfg.init.path)
        except (LmforgeError, OSError):
            old = None  # the parent's data is not here: only the run's own domains are evaluated
    if old is not None and old.resolve() != data_dir.resolve():
        dirs[PARENT_PREFIX] = old
    return dirs


def heldout_seen_by_parent(data_dir: Path, init_path: str) -> int | None:
    """How many of this run's held-out documents the parent trained on (by content hash), when the
    parent's data lies elsewhere: such documents make the new domain's bits-per-byte look better
    than it is. None when the parent's data is not found (or is this run's own: isolated already)."""
    try:
        old = parent_data_dir(init_path)
    except (LmforgeError, OSError):
        return None
    if old.resolve() == data_dir.resolve():
        return None
    heldout = set(read_doc_hashes(data_dir / "doc_hashes" / "heldout.txt"))
    return len(heldout & set(read_doc_hashes(old / "doc_hashes" / "train.txt")))
