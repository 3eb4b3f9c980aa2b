"""Read a run directory into one structure for the report (missing parts become None)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from lmforge.core.errors import LmforgeError
from lmforge.core.metrics_file import read_metrics
from lmforge.optim.config import OptimConfig
from lmforge.optim.schedules import describe, lr_curve


@dataclass
class RunData:
    path: Path
    config_yaml: str | None
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    model_card: dict[str, Any] | None
    manifest: dict[str, Any] | None
    final: dict[str, Any] | None
    code_version: dict[str, Any] | None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # one record per save (or failed save)
    notes: list[str] = field(default_factory=list)
    planned_lr: list[float] | None = None  # the config's LR (optim.lr x schedule) at steps 1..train.steps
    lr_schedule: str | None = None         # the schedule in words
    lineage: dict[str, Any] | None = None  # lineage.json of a run started from another (--init-from)
    # (file name, record) of the evaluations with loss by position or a passkey grid: eval/final.json
    # and those of `lmforge eval` (eval/step_N.json, eval/step_N.seqM.json), oldest first.
    long_context: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    time_budget: dict[str, Any] | None = None  # time_budget.json: the length a train.time_budget_s run fixed


def _planned_lr(config: Any, notes: list[str], steps: int | None = None) -> tuple[list[float] | None, str | None]:
    """The LR the config plans for every step, as its train records log it (record ``k`` holds
    the LR of 0-based step ``k - 1``), from the ``optim`` section and ``train.steps`` (or
    ``steps``: the length a time-budgeted run fixed)."""
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict) or "steps" not in train:
        return None, None
    try:
        optim = cast(OptimConfig, OptimConfig.from_dict(config.get("optim"), path="optim"))
        curve = lr_curve(int(train["steps"] if steps is None else steps), optim)
    except (LmforgeError, TypeError, ValueError) as exc:
        notes.append(f"planned learning-rate curve not drawn: {exc}")
        return None, None
    return [optim.lr * multiplier for multiplier in curve], f"{describe(optim)}; peak lr {optim.lr:g}"


def _last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A resumed run re-logs the steps it redoes; the later record is the one that counts.
    by_step = {r["step"]: r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        notes.append(f"{path.name} not found")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        notes.append(f"{path.name} unreadable ({exc})")
        return None


def _long_context_records(eval_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The evaluation files of the run (not of averaged weights) with ``loss_by_position`` or ``passkey``."""
    if not eval_dir.is_dir():
        return []
    found = []
    files = sorted(eval_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    for file in files:
        if file.name.endswith(".lm_eval.json"):
            continue
        try:
            record = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and (record.get("loss_by_position") or record.get("passkey")):
            found.append((file.stem, record))
    return found


def load_run(path: Path) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"run directory not found: {path}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise LmforgeError(f"{path}: no metrics.jsonl (not a run directory, or the run never logged)")
    records = read_metrics(metrics)
    notes: list[str] = []
    config = path / "config.yaml"
    config_yaml = config.read_text() if config.is_file() else None
    planned_lr, lr_schedule = None, None
    budget = _json(path / "time_budget.json", notes) if (path / "time_budget.json").is_file() else None
    if config_yaml is not None:
        # (safe_load fails early on a corrupt config)
        planned_lr, lr_schedule = _planned_lr(yaml.safe_load(config_yaml), notes,
                                              budget.get("total_steps") if budget else None)
    return RunData(
        path=path,
        config_yaml=config_yaml,
        train=_last_per_step([r for r in records if r.get("kind") == "train"]),
        evals=_last_per_step([r for r in records if r.get("kind") == "eval"]),
        model_card=_json(path / "model_card.json", notes),
        manifest=_json(path / "data_manifest.json", notes),
        final=_json(path / "eval" / "final.json", notes),
        code_version=_json(path / "code_version.json", notes),
        checkpoints=[r for r in records if r.get("kind") == "checkpoint"],
        notes=notes,
        planned_lr=planned_lr,
        lr_schedule=lr_schedule,
        lineage=_json(path / "lineage.json", notes) if (path / "lineage.json").is_file() else None,
        long_context=_long_context_records(path / "eval"),
        time_budget=budget,
    )
