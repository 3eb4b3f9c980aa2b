"""Collect a ladder's finished runs into ``ladder.csv`` and its loss curves into ``curves.csv``.

``ladder.csv`` has one row per finished rung (``eval/final.json`` present). Its column
names are the ones ``lmforge scaling fit`` finds by default: ``N`` (the ladder's ``count``:
active parameters, or active without embedding/head), ``D`` (tokens trained), ``C``
(= 6·N_active·D), ``loss`` (final held-out loss, nats per token, averaged over every
held-out token of every domain) and ``U`` (unique training tokens: the run's
``data.unique_tokens`` budget when set, as in an epochs sweep, else those of the prepared
data; for data-constrained fits when D > U). The rung name is in ``rung`` — deliberately not
``run``: the fitter would read ``run`` as "one training curve per row", while rows with
equal N are one size's schedule-matched curve (Approach 1's envelope needs that).

``ladder.csv`` also has ``acc_<task>`` and ``acc_norm_<task>`` when the runs scored the held-out
tasks. ``curves.csv`` has the logged training loss and every held-out evaluation of every rung.
A WSD branch's curve is stitched: its parent's records up to the branch step, then its own.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from lmforge.core.config import read_yaml
from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_text
from lmforge.core.metrics_file import read_metrics
from lmforge.nn.counting import count_parameters
from lmforge.scaling.ladder.plan import LadderPlan, Rung, decay_start
from lmforge.train.config import RunConfig

LADDER_CSV = "ladder.csv"
CURVES_CSV = "curves.csv"
LADDER_COLUMNS = (
    "rung", "N", "D", "C", "loss", "bpb", "U",
    "n_total", "n_active", "n_active_non_embedding", "n_non_embedding", "n_embedding",
    "d_model", "n_layers", "n_experts", "steps", "batch_size", "seq_len", "tokens_per_step",
    "lr", "schedule", "warmup_steps", "decay_start_step", "min_lr_ratio",
    "branch_of", "branch_step", "budget", "holdout", "epochs", "final_train_loss",
)
CURVE_COLUMNS = ("rung", "source", "kind", "step", "tokens", "lr", "loss", "bpb")


def final_path(run_dir: Path) -> Path:
    return Path(run_dir) / "eval" / "final.json"


def overall(loss: dict[str, float], tokens: dict[str, int], nbytes: dict[str, int] | None) -> tuple[float, float]:
    """(held-out loss over every scored token of every domain, bits per byte over every byte)."""
    total_tokens = sum(tokens[d] for d in loss)
    nats = sum(loss[d] * tokens[d] for d in loss)
    bpb = float("nan")
    if nbytes:
        bpb = nats / math.log(2) / sum(nbytes[d] for d in loss)
    return nats / total_tokens, bpb


def _last_per_step(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    # A resumed run re-logs the steps it redoes; the later record is the one that counts.
    by_step = {r["step"]: r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _unique_tokens(run_dir: Path) -> int | None:
    path = run_dir / "data_manifest.json"
    if not path.is_file():
        return None
    try:
        sources = json.loads(path.read_text())["sources"]
        return int(sum(splits["train"]["tokens"] for splits in sources.values()))
    except (ValueError, KeyError, TypeError):
        return None


def read_rung(run_dir: Path, rung: Rung | None = None, count: str = "active") -> dict[str, Any] | None:
    """The ladder.csv row of a finished run directory (None while ``eval/final.json`` is missing).

    Parameter counts come from the run's own resolved ``config.yaml`` (the vocabulary the
    trainer really used); ``rung`` adds what only the plan knows (branch parent, budget,
    whether it is held out).
    """
    run_dir = Path(run_dir)
    if not final_path(run_dir).is_file():
        return None
    try:
        final = json.loads(final_path(run_dir).read_text())
        cfg = RunConfig.from_dict(read_yaml(run_dir / "config.yaml"))
    except (ValueError, OSError) as exc:
        raise DataError(f"{run_dir}: unreadable run ({exc})") from exc
    counts = count_parameters(cfg.model)
    active_non_embedding = counts.active - counts.embedding - counts.lm_head
    tokens = int(final["tokens"])
    loss, bpb = overall(final["loss"], final["eval_tokens"], final.get("eval_bytes"))
    optim, train = cfg.optim, cfg.train
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    last_train = next((r for r in reversed(records) if r.get("kind") == "train"), {})
    epochs = last_train.get("epochs")
    if isinstance(epochs, dict):  # per source: the most repeated one
        epochs = max(epochs.values(), default=None)
    row: dict[str, Any] = {
        "rung": cfg.name,
        "N": active_non_embedding if count == "active_non_embedding" else counts.active,
        "D": tokens,
        "C": 6.0 * counts.active * tokens,
        "loss": loss,
        "bpb": bpb,
        # A run restricted to a unique-token budget (an epochs sweep) saw only that many.
        "U": cfg.data.unique_tokens or _unique_tokens(run_dir),
        "n_total": counts.total,
        "n_active": counts.active,
        "n_active_non_embedding": active_non_embedding,
        "n_non_embedding": counts.non_embedding,
        "n_embedding": counts.embedding,
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "n_experts": cfg.model.moe.n_experts if cfg.model.moe else 0,
        "steps": train.steps,
        "batch_size": train.batch_size,
        "seq_len": train.seq_len,
        "tokens_per_step": train.tokens_per_step,
        "lr": optim.lr,
        "schedule": optim.schedule,
        "warmup_steps": optim.warmup_steps,
        "decay_start_step": decay_start(train.steps, optim) if optim.schedule == "wsd" else None,
        "min_lr_ratio": optim.min_lr_ratio,
        "branch_of": rung.parent if rung else None,
        "branch_step": rung.branch_step if rung else None,
        "budget": rung.budget if rung else None,
        "holdout": int(rung.holdout) if rung else 0,
        "epochs": epochs,
        "final_train_loss": last_train.get("loss"),
    }
    for domain in sorted(final["loss"]):
        row[f"loss_{domain}"] = final["loss"][domain]
        row[f"bpb_{domain}"] = final["bpb"][domain]
    for task, score in sorted(final.get("tasks", {}).items()):  # held-out multiple-choice tasks, if scored
        row[f"acc_{task}"] = score.get("acc")
        row[f"acc_norm_{task}"] = score.get("acc_norm")
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e18:  # counts and 6·N·D: exact
            return str(int(value))
        return format(value, ".10g")
    return str(value)


def _csv(rows: list[dict[str, Any]], leading: Iterable[str]) -> str:
    columns = list(leading)
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def gather_rows(plan: LadderPlan) -> list[dict[str, Any]]:
    """ladder.csv rows of every finished rung, in plan order (size, then D)."""
    rows = []
    for rung in plan.rungs:
        row = read_rung(plan.runs_dir / rung.name, rung, plan.cfg.count)
        if row is not None:
            rows.append(row)
    return rows


def rung_curve(plan: LadderPlan, rung: Rung) -> list[dict[str, Any]]:
    """Training and evaluation records of ``rung``, its WSD ancestors' up to the branch step first."""
    earlier: list[dict[str, Any]] = []
    if rung.parent is not None:
        earlier = [r for r in rung_curve(plan, plan.rung(rung.parent)) if r["step"] <= (rung.branch_step or 0)]
    metrics = plan.runs_dir / rung.name / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    own = []
    for kind in ("train", "eval"):
        for record in _last_per_step(r for r in records if r.get("kind") == kind):
            row: dict[str, Any] = {"rung": rung.name, "source": rung.name, "kind": kind, "step": record["step"],
                                   "tokens": record.get("tokens"), "lr": record.get("lr")}
            if kind == "train":
                row["loss"] = record.get("loss")
            else:
                row["loss"], row["bpb"] = overall(record["loss"], record["eval_tokens"], record.get("eval_bytes"))
                for domain in sorted(record["bpb"]):
                    row[f"bpb_{domain}"] = record["bpb"][domain]
            own.append(row)
    stitched = [{**r, "rung": rung.name} for r in earlier] + own
    return sorted(stitched, key=lambda r: (r["step"], r["kind"] == "eval"))


def write_results(plan: LadderPlan) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write ``ladder.csv`` and ``curves.csv`` into the ladder directory; returns (rows, paths)."""
    rows = gather_rows(plan)
    curves = [row for rung in plan.rungs for row in rung_curve(plan, rung)]
    paths = [atomic_write_text(plan.ladder_dir / LADDER_CSV, _csv(rows, LADDER_COLUMNS)),
             atomic_write_text(plan.ladder_dir / CURVES_CSV, _csv(curves, CURVE_COLUMNS))]
    return rows, paths


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """ladder.csv back as dicts (numbers as floats, empty cells as None)."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    row[key] = value
            rows.append(row)
    return rows
