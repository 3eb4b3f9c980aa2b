"""Argument types and option groups shared by the verbs.

A count that makes no sense at zero or below is rejected by argparse itself, so the user
sees ``lmforge eval: error: argument --max-tokens: expected an integer >= 1, got '0'`` and
exit code 2 before anything runs or is written.
"""

from __future__ import annotations

import argparse
import math

SET_HELP = "override a config value with a dotted key, e.g. --set model.n_layers=8 (repeatable)"
CONFIG_HELP = ("YAML config file; a bare name without a folder (quickstart or quickstart.yaml) "
               "also finds the preset in configs/")


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (tokens, steps, neighbours)."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """A count where 0 means none (restarts, a radius) or a seed."""
    return _integer(text, 0)


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A rate or temperature that must be above 0."""
    value = _real(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction_list(text: str) -> tuple[float, ...]:
    """``0.1,0.3,1.0``: comma-separated fractions in (0, 1]."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1] such as 0.1,1.0, got {text!r}")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {item!r}") from None
        if not 0 < value <= 1:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {item!r}")
        values.append(value)
    return tuple(values)


def name_list(text: str) -> list[str]:
    """``a,b``: a non-empty comma-separated list of names."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=CONFIG_HELP)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``lmforge train`` (also those of its alias ``lmforge retrieval train``)."""
    add_config_args(parser)
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' picks the newest valid checkpoint of runs/<name>, "
                             "or give a checkpoint directory")
    parser.add_argument("--init-from", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="start this new run from another run's weights (its newest valid checkpoint, or "
                             "the checkpoint given): = --set init.path=...; see docs/continual.md")
    parser.add_argument("--init-optimizer", action="store_true",
                        help="with --init-from: also take the parent's optimizer state")
    parser.add_argument("--init-trainer-state", action="store_true",
                        help="with --init-from: also take its step, data position and RNG (a branch of the "
                             "parent, e.g. a WSD cooldown from a stable-phase checkpoint)")
    parser.add_argument("--no-report", action="store_true", help="skip writing report.html at the end")
    parser.add_argument("--max-restarts", type=non_negative_int, default=0, metavar="N",
                        help="supervise the run: after a crash, restart it from its newest valid checkpoint, "
                             "at most N times (default 0: no supervisor). Multi-process runs: use torchrun's "
                             "--max-restarts instead")



def train_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides of a parsed train command, with --init-* flags as the ``init.*`` keys they set."""
    overrides = list(args.overrides)
    if args.init_from is not None:
        overrides.append(f"init.path={args.init_from}")
    elif args.init_optimizer or args.init_trainer_state:
        from lmforge.core.errors import ConfigError

        raise ConfigError("--init-optimizer and --init-trainer-state need --init-from")
    if args.init_optimizer:
        overrides.append("init.optimizer=true")
    if args.init_trainer_state:
        overrides.append("init.trainer_state=true")
    return overrides
