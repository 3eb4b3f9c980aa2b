"""``lmforge scaling ladder``: plan, train, gather, fit and (optionally) predict a held-out rung.

    lmforge scaling ladder CONFIG [--workers K] [--holdout-largest]   # train locally
    lmforge scaling ladder CONFIG --print-commands [--holdout-largest] # torchrun lines + Slurm scripts
    lmforge scaling ladder CONFIG --rung NAME                          # one rung, in-process (torchrun)
    lmforge scaling ladder CONFIG --dry-run                            # the plan only

The ladder directory (``out_dir/name``) holds ``configs/<rung>.yaml`` (every rung's full
resolved run config), ``ladder_plan.json``, ``runs/<rung>/`` (the run directories),
``logs/``, ``ladder_events.jsonl``, ``ladder.csv``, ``curves.csv``, ``fit/`` (``scaling
fit`` of every finished rung, with plots), ``curves.png`` and, with ``--holdout-largest``,
``prediction.json``, ``prediction_before_training.json`` and ``prediction.png``.

With ``--holdout-largest`` the largest rungs (grid: the largest model size; IsoFLOP: the
largest budget) are trained last: first every other rung, then the fit and
``prediction.json`` (timestamped), then the held-out rungs, then the score. A prediction
is never refreshed once a held-out rung has started; a prediction made after a held-out
rung started is marked ``post_hoc``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmforge.core.code_version import code_version
from lmforge.core.config import read_yaml
from lmforge.core.errors import ConfigError, DataError, LmforgeError
from lmforge.core.io import atomic_write_json, read_json, sha256_file
from lmforge.scaling.ladder.config import LadderConfig, load_ladder_config
from lmforge.scaling.ladder.gather import LADDER_CSV, write_results
from lmforge.scaling.ladder.plan import PLAN_FILE, LadderPlan, build_plan, short_number, write_plan
from lmforge.scaling.ladder.predict import make_prediction, score_prediction
from lmforge.scaling.ladder.runner import (
    LocalRunner,
    event_times,
    has_started,
    is_finished,
    is_ready,
    resume_argument,
)

PREDICTION = "prediction.json"
PREDICTION_BEFORE = "prediction_before_training.json"


def _console():
    from rich.console import Console

    # A fixed width: what is printed does not depend on the terminal (or COLUMNS); no wrapping of lines.
    return Console(file=sys.stdout, width=140, soft_wrap=True)


def prepared_vocab_size(base: dict[str, Any], prepare: bool) -> int | None:
    """The tokenizer's vocabulary (preparing the data first when ``prepare``), else None."""
    from lmforge.train.config import RunConfig

    data = RunConfig.from_dict(base).data
    tokenizer = Path(data.out_dir) / "tokenizer.json"
    if prepare:
        from lmforge.data.prepare import prepare_data

        prepare_data(data)
    if not tokenizer.is_file():
        return None
    from lmforge.data.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer).vocab_size


# --------------------------------------------------------------------------- printing


def print_plan(plan: LadderPlan, console) -> None:
    from rich.table import Table

    cfg = plan.cfg
    mode = "grid" if cfg.grid is not None else "IsoFLOP" if cfg.isoflop is not None else "epochs sweep"
    table = Table(title=f"Ladder {cfg.name}: {len(plan.rungs)} rungs ({mode}, {cfg.schedule.kind}), "
                        f"N = {cfg.count}, C = 6·N_active·D")
    for column in ("rung", "N active", "N non-emb", "D", "U", "C", "steps", "batch", "lr", "warmup", "decay from",
                   "resumes at", "held out"):
        table.add_column(column, justify="left" if column == "rung" else "right", no_wrap=column == "rung")
    for r in plan.rungs:
        table.add_row(r.name, short_number(r.counts.active), short_number(r.n_active_non_embedding),
                      short_number(r.tokens), "all" if r.unique_tokens is None else short_number(r.unique_tokens),
                      f"{r.compute:.3g}", str(r.steps), str(r.batch_size), f"{r.lr:.3g}",
                      str(r.warmup_steps), "-" if r.decay_start is None else str(r.decay_start),
                      f"step {r.branch_step}" if r.parent else "-", "yes" if r.holdout else "")
    console.print(table)
    total = sum(r.own_compute for r in plan.rungs)
    console.print(f"training compute of the ladder: {total:.3g} FLOPs (6·N_active·D over the steps each rung "
                  f"trains itself)", highlight=False)


def print_results(rows: list[dict], console) -> None:
    from rich.table import Table

    if not rows:
        return
    domains = [k for k in rows[0] if k.startswith("bpb_")]
    table = Table(title="ladder.csv")
    for column in ("rung", "N", "D", "C", "loss", "bpb", *domains):
        table.add_column(column, justify="left" if column == "rung" else "right")
    def number(value) -> str:
        return "-" if value is None or value != value else f"{value:.4f}"

    for row in rows:
        table.add_row(row["rung"], short_number(row["N"]), short_number(row["D"]), f"{row['C']:.3g}",
                      number(row["loss"]), number(row["bpb"]), *(number(row.get(d)) for d in domains))
    console.print(table)


def print_prediction(prediction: dict, console) -> None:
    from rich.table import Table

    law = prediction["law"]
    pct = f"{prediction['level']:.0%}"
    title = (f"Held-out prediction ({law['kind']}, fitted on {len(prediction['fitted_rungs'])} rungs, "
             f"written {prediction['written_at']}{', POST HOC' if prediction.get('post_hoc') else ''})")
    table = Table(title=title)
    for column in ("rung", "quantity", "predicted", f"{pct} low", "high", "actual", "rel. error", "inside"):
        table.add_column(column, justify="left" if column in ("rung", "quantity") else "right")
    for entry in prediction["predictions"]:
        items = [("loss", entry["loss"]), *entry["downstream"].items()]
        for i, (name, est) in enumerate(items):
            actual = entry.get("actual", {}).get(name)
            error = entry.get("relative_error", {}).get(name)
            inside = entry.get("inside_interval", {}).get(name)
            table.add_row(entry["rung"] if i == 0 else "", name, f"{est['value']:.4f}",
                          f"{est['low']:.4f}" if "low" in est else "-", f"{est['high']:.4f}" if "high" in est else "-",
                          "-" if actual is None else f"{actual:.4f}", "-" if error is None else f"{error:+.2%}",
                          "-" if inside is None else ("yes" if inside else "no"))
        table.add_section()
    console.print(table)
    for warning in prediction.get("warnings", []):
        console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
    summary = prediction.get("summary")
    if summary and summary.get("loss_relative_error") is not None:
        console.print(f"held-out rung {summary['headline_rung']}: predicted loss is off by "
                      f"{summary['loss_relative_error']:+.2%} of the measured value "
                      f"(mean |error| over {summary['scored_rungs']} held-out rungs: "
                      f"{summary['mean_abs_loss_relative_error']:.2%})", highlight=False)


# --------------------------------------------------------------------------- steps


def holdout_targets(plan: LadderPlan) -> list[dict[str, Any]]:
    return [{"rung": r.name, "N": r.params(plan.cfg.count), "D": r.tokens, "C": r.compute}
            for r in plan.rungs if r.holdout]


def write_prediction(plan: LadderPlan, rows: list[dict], console) -> dict:
    """Fit the non-held-out rows and write ``prediction.json`` — unless a held-out rung has
    started, in which case an existing prediction is kept (and a new one marked post hoc)."""
    path = plan.ladder_dir / PREDICTION
    held = [r for r in plan.rungs if r.holdout]
    started = [r.name for r in held if has_started(plan, r)]
    if started and path.is_file():
        console.print(f"held-out rung(s) {', '.join(started)} already started: keeping the prediction written "
                      f"at {read_json(path)['written_at']}", highlight=False)
        return read_json(path)
    fit_rows = [row for row in rows if not row["holdout"]]
    missing = [r.name for r in plan.rungs if not r.holdout and not is_finished(plan, r)]
    if missing:
        console.print(f"[yellow]warning[/yellow]: predicting without unfinished rung(s) {', '.join(missing)}")
    rule = plan.cfg.fit
    prediction = make_prediction(plan.cfg.name, fit_rows, holdout_targets(plan), law=rule.law,
                                 n_bootstrap=rule.bootstrap, seed=rule.seed, level=rule.level, count=plan.cfg.count)
    version = code_version()
    prediction["code_version"] = {key: version[key] for key in ("version", "commit", "dirty")}
    if started:
        prediction["post_hoc"] = True
        console.print(f"[yellow]warning[/yellow]: held-out rung(s) {', '.join(started)} started before any "
                      "prediction was written: this prediction is marked post_hoc")
    atomic_write_json(plan.ladder_dir / PREDICTION_BEFORE, prediction)
    prediction["before_training_sha256"] = sha256_file(plan.ladder_dir / PREDICTION_BEFORE)
    atomic_write_json(path, prediction)
    console.print(f"written: {path} (before training the held-out rungs)", highlight=False)
    return prediction


def finish(plan: LadderPlan, console, holdout: bool) -> tuple[list[dict], dict | None]:
    """Gather ladder.csv / curves.csv, fit every finished rung, score the prediction, plot."""
    rows, paths = write_results(plan)
    for path in paths:
        console.print(f"written: {path} ({len(rows)} finished rungs)" if path.name == LADDER_CSV
                      else f"written: {path}", highlight=False)
    print_results(rows, console)
    prediction = None
    path = plan.ladder_dir / PREDICTION
    if holdout and path.is_file():
        held = {r.name for r in plan.rungs if r.holdout}
        prediction = score_prediction(read_json(path), rows,
                                      {k: v for k, v in event_times(plan).items() if k in held})
        atomic_write_json(path, prediction)
        console.print(f"written: {path}", highlight=False)
    from lmforge.scaling.ladder import plots as ladder_plots

    for written in ladder_plots.fit_and_plot(plan, rows, prediction):
        console.print(f"written: {written}", highlight=False)
    if prediction is not None:
        print_prediction(prediction, console)
    if plan.cfg.epochs is not None:
        from lmforge.scaling.ladder.epochs import print_epochs

        print_epochs(plan, rows, console)
    return rows, prediction


def train_rung(plan: LadderPlan, name: str, holdout: bool, console) -> int:
    """Train one rung in this process (under torchrun on every rank), resuming as a rerun would."""
    rung = plan.rung(name)
    config = plan.config_path(rung)
    if not config.is_file():
        raise LmforgeError(f"{config} not found: generate the ladder first (--print-commands or --dry-run)")
    if is_finished(plan, rung):
        console.print(f"{name} is finished (eval/final.json exists): nothing to do", highlight=False)
        return 0
    if holdout and rung.holdout and not (plan.ladder_dir / PREDICTION).is_file():
        raise LmforgeError(f"{name} is held out: write the prediction first (--holdout-largest --predict)")
    if not is_ready(plan, rung):
        raise LmforgeError(f"{name} branches from {rung.parent} at step {rung.branch_step}, and that checkpoint "
                           f"does not exist yet: train {rung.parent} first")
    from lmforge.train.assembly import train_run
    from lmforge.train.config import RunConfig

    train_run(RunConfig.from_dict(read_yaml(config)), resume=resume_argument(plan, rung))
    return 0


def run_ladder(config: str | Path, overrides: list[str] | None = None, workers: int = 1,
               threads_per_rung: int | None = None, holdout: bool = False, print_commands: bool = False,
               dry_run: bool = False, rung: str | None = None, predict_only: bool = False,
               gather_only: bool = False, launcher=None, console=None, poll_seconds: float = 2.0) -> int:
    """The whole verb; returns the exit code (1 when a rung failed or was blocked)."""
    overrides = list(overrides or [])
    console = console or _console()
    cfg, base = load_ladder_config(config, overrides)
    prepare = not (print_commands or dry_run or rung or predict_only or gather_only)
    vocab = prepared_vocab_size(base, prepare)
    if rung is not None or predict_only or gather_only:
        # Rebuild exactly the plan the rung configs were generated with (counts, and through
        # them batch sizes and WSD branch points, depend on the vocabulary).
        vocab = _recorded_vocab_size(cfg) or vocab
    plan = build_plan(cfg, base, vocab)
    if rung is not None:
        return train_rung(plan, rung, holdout, console)
    if not (predict_only or gather_only):  # those read results; the plan that made them stays as written
        command = ["lmforge", *sys.argv[1:]] if sys.argv[1:2] in (["scaling"], ["ladder"]) else None
        _warn_changed(plan, console)
        write_plan(plan, command)
        print_plan(plan, console)
        console.print(f"written: {plan.configs_dir}/ ({len(plan.rungs)} run configs), "
                      f"{plan.ladder_dir / PLAN_FILE}", highlight=False)
    if dry_run:
        return 0
    if print_commands:
        from lmforge.scaling.ladder.launch import print_commands as show

        show(plan, config, overrides, holdout, console)
        return 0
    if holdout and plan.cfg.epochs is not None:
        raise ConfigError("--holdout-largest predicts held-out rungs from a fit of L(N, D); an epochs sweep fits "
                          "R*_D at each size and has none")
    if holdout and all(r.holdout for r in plan.rungs):
        raise DataError("--holdout-largest: every rung would be held out (one model size or one compute "
                        "budget); the ladder needs more sizes or budgets")
    if gather_only:
        finish(plan, console, holdout)
        return 0
    if predict_only:
        rows, _ = write_results(plan)
        print_prediction(write_prediction(plan, rows, console), console)
        return 0
    runner = LocalRunner(plan, workers, threads_per_rung, launcher=launcher, poll_seconds=poll_seconds,
                         console=console)
    first = [r for r in plan.rungs if not (holdout and r.holdout)]
    outcomes = runner.run(first)
    if holdout:
        rows, _ = write_results(plan)
        print_prediction(write_prediction(plan, rows, console), console)
        outcomes.update(runner.run([r for r in plan.rungs if r.holdout]))
    finish(plan, console, holdout)
    bad = {name: o.status for name, o in outcomes.items() if o.status in ("failed", "blocked")}
    if bad:
        console.print(f"[red]{len(bad)} rung(s) did not finish[/red]: "
                      + ", ".join(f"{n} ({s})" for n, s in bad.items()))
        return 1
    return 0


def _recorded_vocab_size(cfg: LadderConfig) -> int | None:
    path = cfg.ladder_dir / PLAN_FILE
    try:
        return int(read_json(path)["vocab_size"]) if path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def _warn_changed(plan: LadderPlan, console) -> None:
    """A rung that has started keeps its run directory: say so if its generated config changes."""
    for rung in plan.rungs:
        path = plan.config_path(rung)
        if path.is_file() and has_started(plan, rung):
            if read_yaml(path) != plan.run_configs[rung.name]:
                console.print(f"[yellow]warning[/yellow]: the config of {rung.name} changed since it started; "
                              "its run continues with the new config (the trainer refuses a changed model)")


def load(config: str | Path, overrides: list[str] | None = None) -> tuple[LadderConfig, LadderPlan]:
    """The ladder config and its plan, without preparing data (for scripts and notebooks)."""
    cfg, base = load_ladder_config(config, overrides or [])
    return cfg, build_plan(cfg, base, prepared_vocab_size(base, prepare=False))
