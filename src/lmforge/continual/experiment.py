"""The continual-pretraining experiment in one command: ``lmforge continual CONFIG``.

CONFIG is a run config (data with at least two sources, model, optimizer, training, evaluation)
plus a ``continual:`` section. For each direction (old domain A → new domain B) it trains:

- a parent on A alone (``parent_steps``);
- continuations of the parent on B, one per replay share (``replay_shares``; replay draws from A,
  the parent's mixture), with their own schedule (``continue_optim``: re-warm to a new peak, then
  decay) for ``continue_steps``;
- once for all directions, a union baseline from scratch on every domain (the config's mixture)
  for ``parent_steps + continue_steps``: the same total tokens.

Each continuation is evaluated before its first step (the parent's numbers, on the same held-out
windows) and at the end; forgetting is the rise of the old domain's bits-per-byte, adaptation
the fall of the new one's. The table (``continual.csv``, ``continual.md``) and plot
(``continual.png``) go to ``runs/<name>_continual/``. Runs that finished are reused, runs that
were interrupted are resumed, so the command can be rerun after a crash.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.config import Config, apply_overrides, read_yaml
from lmforge.core.errors import ConfigError
from lmforge.core.logging import get_logger
from lmforge.core.metrics_file import read_metrics

log = get_logger(__name__)


@dataclass
class ContinualConfig(Config):
    domains: list[str] = field(default_factory=lambda: ["literature", "code"])  # A, B: two source names
    directions: str = "both"          # forward (A → B) | both (also B → A)
    parent_steps: int = 400
    continue_steps: int = 200
    replay_shares: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.25])
    continue_optim: dict[str, Any] = field(default_factory=dict)  # optim keys for the continuations
    union_baseline: bool = True

    def __post_init__(self) -> None:
        if len(self.domains) != 2 or len(set(self.domains)) != 2:
            raise ValueError(f"domains: name two different sources, got {self.domains}")
        if self.directions not in ("forward", "both"):
            raise ValueError(f"directions must be 'forward' or 'both', got {self.directions!r}")
        if self.parent_steps < 1 or self.continue_steps < 1:
            raise ValueError("parent_steps and continue_steps must be >= 1")
        if not self.replay_shares or any(not 0.0 <= r < 1.0 for r in self.replay_shares):
            raise ValueError(f"replay_shares: values in [0, 1), got {self.replay_shares}")


@dataclass
class PlannedRun:
    role: str                 # parent | continued | union
    config: dict[str, Any]    # the full run config
    old: str | None = None    # the parent's domain
    new: str | None = None    # the continuation's domain
    replay: float | None = None

    @property
    def name(self) -> str:
        return self.config["name"]


def _only(base: dict[str, Any], domain: str | None) -> list[dict[str, Any]]:
    """The base config's sources with weight 1 for ``domain`` and 0 for the others (None: as given)."""
    sources = copy.deepcopy(base["data"]["sources"])
    if domain is not None:
        for source in sources:
            source["weight"] = 1.0 if source["name"] == domain else 0.0
    return sources


# Keys that belong to one schedule's layout: a continuation with a schedule of its own drops the parent's.
SCHEDULE_KEYS = ("schedule", "warmup_steps", "warmup_start_ratio", "decay_fraction", "decay_steps", "cooldown",
                 "constant_lr_ratio", "cooldown_steps", "wsd_periods", "min_lr_ratio")


def continuation_optim(base: dict[str, Any], continued: dict[str, Any]) -> dict[str, Any]:
    """The continuations' optimizer section: the base's, with ``continue_optim`` over it; when that
    names a schedule, the base's schedule layout is dropped (its keys may not fit the new one)."""
    if "schedule" in continued:
        base = {k: v for k, v in base.items() if k not in SCHEDULE_KEYS}
    return {**base, **continued}


def plan_runs(base: dict[str, Any], cfg: ContinualConfig) -> list[PlannedRun]:
    """Every run of the experiment, parents before their continuations."""
    name = base.get("name", "continual")
    names = [s.get("name") for s in base.get("data", {}).get("sources", [])]
    missing = [d for d in cfg.domains if d not in names]
    if missing:
        raise ConfigError(f"continual.domains: {missing} are not sources of the config's data (sources: {names})")
    runs_dir = Path(base.get("runs_dir", "runs"))
    pairs = [tuple(cfg.domains)] + ([tuple(reversed(cfg.domains))] if cfg.directions == "both" else [])
    plans: list[PlannedRun] = []
    for old, new in pairs:
        parent = copy.deepcopy(base)
        parent["name"] = f"{name}_{old}"
        parent["data"]["sources"] = _only(base, old)
        parent.setdefault("train", {})["steps"] = cfg.parent_steps
        plans.append(PlannedRun("parent", parent, old=old))
        for share in cfg.replay_shares:
            run = copy.deepcopy(base)
            run["name"] = f"{name}_{old}_to_{new}_replay{round(100 * share)}"
            run["data"]["sources"] = _only(base, new)
            run.setdefault("train", {})["steps"] = cfg.continue_steps
            run["optim"] = continuation_optim(base.get("optim", {}), cfg.continue_optim)
            run["init"] = {"path": str(runs_dir / parent["name"])}
            if share > 0:
                run["replay"] = {"share": share}  # from the parent's data and mixture
            plans.append(PlannedRun("continued", run, old=old, new=new, replay=share))
    if cfg.union_baseline:
        union = copy.deepcopy(base)
        union["name"] = f"{name}_union"
        union.setdefault("train", {})["steps"] = cfg.parent_steps + cfg.continue_steps
        plans.append(PlannedRun("union", union))
    return plans


def _train(plan: PlannedRun) -> Path:
    from lmforge.train.assembly import train_or_reuse
    from lmforge.train.config import RunConfig

    return train_or_reuse(RunConfig.from_dict(plan.config), f"continual experiment: {plan.role}")


def _evaluations(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]


def result_rows(plans: list[PlannedRun], run_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per continued run (and the union baseline per direction): old/new-domain bpb at
    the parent and at the end, forgetting and adaptation, and the final intervals."""
    union = next((p for p in plans if p.role == "union"), None)
    union_final = json.loads((run_dirs[union.name] / "eval" / "final.json").read_text()) if union else None
    rows = []
    for plan in plans:
        if plan.role != "continued":
            continue
        evals = _evaluations(run_dirs[plan.name])
        start, end = evals[0], evals[-1]
        old, new = plan.old, plan.new
        row = {
            "direction": f"{old} -> {new}", "run": plan.name, "replay": plan.replay,
            "old_bpb_parent": start["bpb"][old], "old_bpb": end["bpb"][old],
            "forgetting": end["bpb"][old] - start["bpb"][old],
            "new_bpb_parent": start["bpb"][new], "new_bpb": end["bpb"][new],
            "adaptation": end["bpb"][new] - start["bpb"][new],
            "mean_bpb": (end["bpb"][old] + end["bpb"][new]) / 2,
            "old_interval": end.get("bpb_interval", {}).get(old), "new_interval": end.get("bpb_interval", {}).get(new),
        }
        if union_final is not None:
            row.update({"union_old_bpb": union_final["bpb"][old], "union_new_bpb": union_final["bpb"][new],
                        "union_mean_bpb": (union_final["bpb"][old] + union_final["bpb"][new]) / 2})
        rows.append(row)
    return rows


def run_continual(config_path: str, overrides: list[str], out_dir: str | None = None) -> Path:
    """Train (or reuse) every run of the experiment; write the table and plot; return the folder."""
    from lmforge.continual.results import write_results

    raw = apply_overrides(read_yaml(config_path), overrides)
    if "continual" not in raw:
        raise ConfigError(f"{config_path}: no continual: section (see configs/continual_demo.yaml)")
    cfg = ContinualConfig.from_dict(raw.pop("continual"), path="continual")
    plans = plan_runs(raw, cfg)
    run_dirs = {plan.name: _train(plan) for plan in plans}
    out = Path(out_dir or Path(raw.get("runs_dir", "runs")) / f"{raw.get('name', 'continual')}_continual")
    write_results(out, plans, run_dirs, result_rows(plans, run_dirs))
    return out
