"""``lmforge scaling fit``, ``plan`` and ``ladder``: argument parsing and printing.

The work is done by library calls with typed arguments — ``scaling.workflows.fit_csv`` and
``plan_budget``, ``scaling.ladder.run_ladder`` — this module only turns options into those
arguments and prints what comes back. Wired into the main command line with::

    add_scaling_parser(verbs)                  # verbs = parser.add_subparsers(...)
    handler = {"scaling": run_scaling, ...}    # run_scaling(args) -> exit code
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from lmforge.cli.arguments import non_negative_int, positive_int
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.scaling.shape import DEFAULT_ASPECT_RATIO


def _positive_float(text: str) -> float:
    from lmforge.scaling.table import parse_number

    try:
        value = parse_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 1e21 or 70B, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level in (0, 1) such as 0.95, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a level in (0, 1) such as 0.95, got {text!r}")
    return value


def add_scaling_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``scaling fit``, ``plan`` and ``ladder`` to ``subparsers``; returns the ``scaling`` parser."""
    scaling = subparsers.add_parser(
        "scaling", help="fit scaling laws to runs and plan compute-optimal models",
        description="Fit L(N, D) and compute-optimal allocations to measured (parameters, tokens, loss) "
                    "points, and plan model size and data for a compute budget.")
    verbs = scaling.add_subparsers(dest="scaling_verb", required=True, metavar="ACTION")

    fit = verbs.add_parser(
        "fit", help="fit scaling laws to a CSV of runs (Hoffmann et al. Approaches 1-3, bootstrap intervals)",
        description="Read CSV (one row per run or training-curve point: parameters N, tokens D, loss; "
                    "optional compute C, unique_tokens U, run), fit the requested approaches with bootstrap "
                    "intervals, and write fit.json and plots to --out.")
    fit.add_argument("csv", metavar="CSV", help="CSV file with a header row (see docs/scaling.md)")
    fit.add_argument("--out", default=None, metavar="DIR",
                     help="output directory for fit.json and plots (default: runs/scaling/<CSV name>)")
    fit.add_argument("--bootstrap", type=non_negative_int, default=100, metavar="K",
                     help="bootstrap resamples per approach for the intervals; 0 for none (default 100)")
    fit.add_argument("--columns", default=None, metavar="KEY=NAME,...",
                     help="map logical columns to the CSV's header, e.g. params=n_active,loss=val_loss "
                          "(keys: params, tokens, loss, compute, unique_tokens, run; default: usual names)")
    fit.add_argument("--approach", default="auto", metavar="LIST",
                     help="comma-separated approaches to fit: 1 (min-loss envelope), 2 (IsoFLOP parabolas), "
                          "3 (parametric L(N, D)); 'auto' fits those the data supports (default auto)")
    fit.add_argument("--seed", type=non_negative_int, default=0, help="seed for the bootstrap resamples (default 0)")
    fit.add_argument("--level", type=_level, default=0.95, help="confidence level of the intervals (default 0.95)")
    fit.add_argument("--r-star", default="auto", metavar="auto|fit|none|VALUE",
                     help="data-constrained fit (Muennighoff et al. 2023): 'fit' fits R*, a number fixes it, "
                          "'none' ignores unique tokens; 'auto' fits R* when some row has tokens > unique_tokens "
                          "(default auto)")
    fit.add_argument("--huber-delta", type=_positive_float, default=1e-3,
                     help="Huber loss threshold on log-loss residuals for Approach 3 (default 1e-3)")
    fit.add_argument("--budget-tolerance", type=_positive_float, default=0.05, metavar="DECADES",
                     help="rows whose compute differs by at most this many decades form one IsoFLOP budget "
                          "(default 0.05)")
    fit.add_argument("--starts", type=positive_int, default=16,
                     help="L-BFGS-B runs from the best points of the initialisation grid (default 16)")
    fit.add_argument("--no-plots", action="store_true", help="write fit.json only, no PNG figures")

    plan = verbs.add_parser(
        "plan", help="compute-optimal (and inference-aware) model size, tokens and shape for a budget",
        description="From a fit (or a published law), the N and D minimising loss at C = 6·N·D, its "
                    "predicted loss, the smaller model that reaches the same loss at the lowest training "
                    "plus inference cost, and a concrete model shape near N.")
    plan.add_argument("--compute", type=_positive_float, required=True, metavar="C",
                      help="training compute in FLOPs, e.g. 1e21")
    plan.add_argument("--inference-tokens", type=_positive_float, default=None, metavar="I",
                      help="tokens the model will process in deployment; adds the inference-aware plan "
                           "minimising 6·N·D + 2·N·I")
    plan.add_argument("--fit", default=None, metavar="FIT_JSON",
                      help="fit.json from `scaling fit` (its Approach-3 law and bootstrap intervals)")
    plan.add_argument("--law", default="hoffmann2022", choices=["hoffmann2022", "besiroglu2024"],
                      help="published law to use when no --fit is given (default hoffmann2022)")
    plan.add_argument("--unique-tokens", type=_positive_float, default=None, metavar="U",
                      help="unique tokens available (a data-constrained fit then accounts for repetition)")
    plan.add_argument("--r-star-fit", default=None, metavar="FIT_JSON",
                      help="take R*_D (the half-life of repeated data, with its bootstrap values) from this fit: "
                           "an epochs sweep's fit/repetition_fit.json, or a `scaling fit --r-star fit` result; "
                           "needs --unique-tokens")
    plan.add_argument("--level", type=_level, default=None,
                      help="confidence level of the intervals (default: the fit's)")
    plan.add_argument("--aspect-ratio", type=_positive_float, default=DEFAULT_ASPECT_RATIO,
                      help="d_model / n_layers of the proposed shape, under the ladder's size rule "
                           f"(default {DEFAULT_ASPECT_RATIO:g})")
    plan.add_argument("--vocab-size", type=positive_int, default=None,
                      help="vocabulary size of the proposed shape (default: ModelConfig's)")
    plan.add_argument("--seq-len", type=positive_int, default=None,
                      help="sequence length for the shape's FLOPs per token (default: ModelConfig's)")
    plan.add_argument("--n-experts", type=positive_int, default=None,
                      help="propose a mixture of experts with this many experts (N is then active parameters)")
    plan.add_argument("--top-k", type=positive_int, default=2, help="experts per token for --n-experts (default 2)")
    plan.add_argument("--count", default="active", choices=["active", "active_non_embedding"],
                      help="which parameter count N means, as in the fitted data (default active)")
    plan.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON to PATH")
    add_ladder_parser(verbs)
    return scaling


def add_ladder_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ladder`` to ``subparsers`` (``lmforge scaling ladder``, or a top-level ``lmforge ladder``
    alias dispatched to :func:`run_scaling`, which reads ``scaling_verb``)."""
    ladder = subparsers.add_parser(
        "ladder", help="train a ladder of small runs (sizes x tokens, or IsoFLOP budgets), gather and fit them",
        description="Generate every rung's run config from a ladder config (base run config, size rule, token "
                    "or compute budgets, batch and LR rules, cosine or WSD schedules), train the rungs in "
                    "parallel worker processes (finished rungs skipped, unfinished ones resumed), gather "
                    "ladder.csv and curves.csv, and fit them. See docs/scaling.md.")
    ladder.set_defaults(scaling_verb="ladder")
    ladder.add_argument("config", metavar="CONFIG", help="ladder config YAML (see configs/ladder_*.yaml)")
    ladder.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ladder config value, e.g. --set fit.bootstrap=50 (repeatable)")
    ladder.add_argument("--workers", type=positive_int, default=1, metavar="K",
                        help="rungs trained at once, each a `python -m lmforge train` process with "
                             "cores/K threads (default 1)")
    ladder.add_argument("--threads-per-rung", type=positive_int, default=None, metavar="T",
                        help="CPU threads per rung process instead of cores/K")
    ladder.add_argument("--resume", choices=["auto"], default="auto",
                        help="rerun behaviour (the only one): finished rungs (eval/final.json) are skipped, "
                             "unfinished ones resume from their newest valid checkpoint")
    ladder.add_argument("--holdout-largest", action="store_true",
                        help="train the largest rungs last: fit the others, write prediction.json with a "
                             "bootstrap interval, then train the held-out rungs and report the relative error")
    ladder.add_argument("--print-commands", action="store_true",
                        help="write the rung configs, print one torchrun command per rung and write Slurm "
                             "array scripts into the ladder directory; train nothing")
    ladder.add_argument("--dry-run", action="store_true", help="write the rung configs and show the plan only")
    ladder.add_argument("--rung", default=None, metavar="NAME",
                        help="train only this rung, in this process (what the printed torchrun commands run)")
    ladder.add_argument("--predict", action="store_true",
                        help="with --holdout-largest: gather finished rungs and write prediction.json only")
    ladder.add_argument("--gather", action="store_true",
                        help="gather ladder.csv and curves.csv, fit and plot (and score the prediction) only")
    return ladder


def run_scaling(args: argparse.Namespace) -> int:
    """Run ``scaling fit``, ``plan`` or ``ladder``; 0 on success, 2 on bad input (message on stderr)."""
    if "scipy.linalg" not in sys.modules:
        # Before scipy's OpenBLAS loads: one thread (see fit.single_threaded_blas for why).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        if args.scaling_verb == "fit":
            return _run_fit(args)
        if args.scaling_verb == "ladder":
            return _run_ladder(args)
        return _run_plan(args)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- printing


def human(value: float | None) -> str:
    """3.2e10 -> '32.2B'; small numbers with 4 significant digits."""
    if value is None or not math.isfinite(value):
        return "-" if value is None else str(value)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale and abs(value) < 1e15:
            return f"{value / scale:.3g}{suffix}"
    if abs(value) >= 1e15:
        return f"{value:.3e}"
    return f"{value:.4g}"


def _console():
    from rich.console import Console

    # A fixed width: what is printed does not depend on the terminal (or COLUMNS); no wrapping of lines.
    return Console(file=sys.stdout, width=120, soft_wrap=True)


def _print_fit(fit: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    level = fit["settings"]["level"]
    table = Table(title=escape(f"Scaling fit of {fit['source']['path']} ({fit['source']['rows']} rows; "
                               f"{level:.0%} bootstrap intervals)"))
    for column in ("approach", "quantity", "value", "low", "high"):
        table.add_column(column, justify="left" if column in ("approach", "quantity") else "right")
    names = {"approach1": "1 envelope", "approach2": "2 IsoFLOP", "approach3": "3 L(N,D)"}
    for key, title in names.items():
        if key not in fit:
            continue
        for i, (name, q) in enumerate(fit[key]["quantities"].items()):
            table.add_row(title if i == 0 else "", name, f"{q['value']:.4g}",
                          f"{q['low']:.4g}" if "low" in q else "-", f"{q['high']:.4g}" if "high" in q else "-")
        table.add_section()
    console = _console()
    console.print(table)
    for key, reason in fit.get("skipped", {}).items():
        console.print(f"{key} skipped: {reason}", markup=False)
    for warning in fit.get("warnings", []):
        print(f"lmforge: warning: {warning}", file=sys.stderr)


def _parse_approaches(text: str) -> tuple[tuple[int, ...], bool]:
    if text.strip() == "auto":
        return (1, 2, 3), False
    try:
        chosen = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(f"--approach: expected 'auto' or a list like 1,2,3, got {text!r}") from None
    if not chosen or any(a not in (1, 2, 3) for a in chosen):
        raise ConfigError(f"--approach: approaches are 1, 2 and 3, got {text!r}")
    return chosen, True


def _parse_r_star(text: str) -> float | str | None:
    """``--r-star``: auto, fit, none or a positive number (``scaling.workflows.resolve_r_star``)."""
    text = text.strip().lower()
    if text in ("auto", "fit"):
        return text
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--r-star: expected auto, fit, none or a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--r-star: must be positive, got {text!r}")
    return value


def _run_fit(args: argparse.Namespace) -> int:
    from lmforge.scaling.table import parse_columns
    from lmforge.scaling.workflows import fit_csv

    approaches, strict = _parse_approaches(args.approach)
    command = ["lmforge", "scaling", "fit", *sys.argv[3:]] if sys.argv[1:3] == ["scaling", "fit"] else None
    fit, written = fit_csv(args.csv, args.out, columns=parse_columns(args.columns), approaches=approaches,
                           strict=strict, n_bootstrap=args.bootstrap, seed=args.seed, level=args.level,
                           huber_delta=args.huber_delta, r_star=_parse_r_star(args.r_star),
                           budget_tolerance=args.budget_tolerance, n_starts=args.starts,
                           plots=not args.no_plots, command=command)
    _print_fit(fit)
    for path in written:
        print(f"written: {path}")
    return 0


def _run_ladder(args: argparse.Namespace) -> int:
    from lmforge.scaling.ladder import run_ladder

    modes = [name for name, on in (("--print-commands", args.print_commands), ("--dry-run", args.dry_run),
                                   ("--rung", args.rung is not None), ("--predict", args.predict),
                                   ("--gather", args.gather)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined")
    if args.predict and not args.holdout_largest:
        raise ConfigError("--predict writes the held-out prediction: it needs --holdout-largest")
    return run_ladder(args.config, args.overrides, workers=args.workers, threads_per_rung=args.threads_per_rung,
                      holdout=args.holdout_largest, print_commands=args.print_commands, dry_run=args.dry_run,
                      rung=args.rung, predict_only=args.predict, gather_only=args.gather)


def _run_plan(args: argparse.Namespace) -> int:
    from lmforge.core.io import atomic_write_json
    from lmforge.scaling.shape import ShapeRule
    from lmforge.scaling.workflows import plan_budget

    if args.n_experts is not None and args.top_k > args.n_experts:
        raise ConfigError(f"--top-k ({args.top_k}) must not exceed --n-experts ({args.n_experts})")
    planned = plan_budget(args.compute, fit=args.fit, law=args.law, inference_tokens=args.inference_tokens,
                          unique_tokens=args.unique_tokens, level=args.level,
                          rule=ShapeRule(aspect_ratio=args.aspect_ratio), vocab_size=args.vocab_size,
                          seq_len=args.seq_len, n_experts=args.n_experts, top_k=args.top_k, count=args.count,
                          r_star_fit=args.r_star_fit)
    _print_plan(planned.plan, planned.shapes, planned.source)
    if args.json:
        print(f"written: {atomic_write_json(args.json, planned.to_dict())}")
    return 0


def _print_plan(result, shapes: dict, source: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    pct = f"{result.level:.0%} interval" if result.level else "interval"
    table = Table(title=escape(f"Plan for C = {result.compute:.3g} FLOPs from {source}"))
    for column in ("", "value", f"{pct} low", "high"):
        table.add_column(column, justify="left" if not column else "right")

    def row(name: str, est, fmt=human) -> None:
        table.add_row(name, fmt(est.value), fmt(est.low) if est.low is not None else "-",
                      fmt(est.high) if est.high is not None else "-")

    row("compute-optimal parameters N", result.params)
    row("compute-optimal tokens D", result.tokens)
    row("tokens per parameter", result.tokens_per_param, lambda v: f"{v:.1f}")
    row("predicted loss", result.loss, lambda v: f"{v:.4f}")
    inf = result.inference
    if inf is not None:
        table.add_section()
        row(f"inference-aware N (I = {human(inf.inference_tokens)})", inf.params)
        row("inference-aware tokens D", inf.tokens)
        row("times smaller than compute-optimal", inf.params_ratio, lambda v: f"{v:.2f}x")
        row("times more training tokens", inf.tokens_ratio, lambda v: f"{v:.2f}x")
        row("training compute 6ND", inf.train_compute, lambda v: f"{v:.3g}")
        row("training + inference cost", inf.total_cost, lambda v: f"{v:.3g}")
        row("... of the compute-optimal model", inf.compute_optimal_total_cost, lambda v: f"{v:.3g}")
        row("cost saving", inf.cost_saving, lambda v: f"{v:.1%}")
    console = _console()
    console.print(table)
    shape_table = Table(title="Proposed shapes (d_model = aspect ratio x n_layers, head size 64, SwiGLU)")
    for column in ("model", "n_layers", "d_model", "n_heads", "d_ff", "experts", "N counted", "vs target",
                   "total params", "FLOPs/token vs 6N"):
        shape_table.add_column(column, justify="left" if column == "model" else "right")
    for name, shape in shapes.items():
        cfg = shape.config
        experts = f"{cfg.moe.n_experts} (top {cfg.moe.top_k})" if cfg.moe else "-"
        shape_table.add_row(name, str(cfg.n_layers), str(cfg.d_model), str(cfg.n_heads), str(cfg.resolved_d_ff),
                            experts, human(shape.params), f"{shape.relative_error:+.1%}", human(shape.total_params),
                            f"{shape.flops_per_token / (6 * shape.active_params):.3f}")
    console.print(shape_table)
