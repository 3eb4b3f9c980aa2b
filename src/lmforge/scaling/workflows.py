"""``scaling fit`` and ``scaling plan`` as library calls with typed arguments.

:func:`fit_csv` reads a CSV of runs, fits the requested approaches with bootstrap
intervals and writes ``fit.json`` (and plots) into a directory; :func:`plan_budget` turns a
fit (or a published law) into a compute-optimal and inference-aware plan with a proposed
shape per planned size. The command line (``lmforge.cli.scaling``) parses options into
these arguments and prints the results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

from lmforge.core.errors import ConfigError, DataError
from lmforge.scaling.fit import HUBER_DELTA, PUBLISHED_LAWS, LossLaw, fit_scaling, law_from_fit, load_fit, save_fit
from lmforge.scaling.plan import Plan, ShapeProposal, plan, propose_shape
from lmforge.scaling.shape import ShapeRule
from lmforge.scaling.table import ScalingTable, read_table

FIT_FILE = "fit.json"
RStar = float | Literal["auto", "fit"] | None


def resolve_r_star(r_star: RStar, table: ScalingTable) -> float | str | None:
    """``"auto"``: fit R* when some row saw repeated data (tokens > unique_tokens), else the
    plain law; ``"fit"``, a positive number (R* fixed) or None pass through."""
    if r_star == "auto":
        repeats = table.unique_tokens is not None and bool((table.tokens > table.unique_tokens).any())
        return "fit" if repeats else None
    if r_star is None or r_star == "fit":
        return r_star
    if isinstance(r_star, str) or not (math.isfinite(r_star) and r_star > 0):
        raise ConfigError(f"r_star: expected 'auto', 'fit', None or a positive number, got {r_star!r}")
    return float(r_star)


def default_fit_dir(csv: str | Path) -> Path:
    return Path("runs") / "scaling" / Path(csv).stem


def fit_csv(csv: str | Path, out: str | Path | None = None, columns: Mapping[str, str] | None = None,
            approaches: Iterable[int] = (1, 2, 3), strict: bool = False, n_bootstrap: int = 100, seed: int = 0,
            level: float = 0.95, huber_delta: float = HUBER_DELTA, r_star: RStar = "auto",
            budget_tolerance: float = 0.05, n_starts: int = 16, plots: bool = True,
            command: list[str] | None = None) -> tuple[dict, list[Path]]:
    """Fit the runs in ``csv`` and write ``fit.json`` (plus PNG figures with ``plots``) to ``out``
    (default ``runs/scaling/<CSV name>``). ``strict``: an approach the data cannot support is an
    error instead of an entry under ``skipped``. ``command`` is recorded in ``fit.json``.
    Returns the fit and the written paths; nothing is written when the input is bad."""
    from lmforge.core.code_version import code_version

    if n_bootstrap < 0:
        raise ConfigError(f"bootstrap resamples must be >= 0, got {n_bootstrap}")
    if n_starts < 1:
        raise ConfigError(f"starts must be >= 1, got {n_starts}")
    approaches = tuple(sorted(set(approaches)))
    table = read_table(csv, columns)
    out = Path(out) if out is not None else default_fit_dir(csv)
    fit = fit_scaling(table, approaches=approaches, n_bootstrap=n_bootstrap, seed=seed, level=level,
                      huber_delta=huber_delta, r_star=resolve_r_star(r_star, table),
                      budget_tolerance=budget_tolerance, n_starts=n_starts, strict=strict)
    if not any(f"approach{a}" in fit for a in approaches):
        raise DataError(f"{csv}: no approach could be fitted: "
                        + "; ".join(f"{k}: {v}" for k, v in fit["skipped"].items()))
    # What produced these numbers: the command line (when given) and the code.
    fit["command"] = command
    version = code_version()
    fit["code_version"] = {key: version[key] for key in ("version", "commit", "dirty")}
    written = [save_fit(out / FIT_FILE, fit)]
    if plots:
        from lmforge.scaling import plots as figures

        if "approach2" in fit:
            written.append(figures.plot_isoflops(table, fit["approach2"], out / "isoflops.png", budget_tolerance))
        if "approach3" in fit:
            law, _ = law_from_fit(fit)
            written.append(figures.plot_loss_surface(law, table, out / "loss_surface.png"))
            written.append(figures.plot_residuals(law, table, out / "residuals.png"))
    return fit, written


@dataclass
class BudgetPlan:
    """A plan for one compute budget, the shapes proposed for its sizes, and where its law came from."""

    plan: Plan
    shapes: dict[str, ShapeProposal]     # "optimal" and, with inference tokens, "inference"
    source: str

    def to_dict(self) -> dict:
        data = self.plan.to_dict()
        data["source"] = self.source
        data["shapes"] = {name: {"config": shape.config.to_dict(), "params": shape.params,
                                 "total_params": shape.total_params, "active_params": shape.active_params,
                                 "flops_per_token": shape.flops_per_token, "count": shape.count}
                          for name, shape in self.shapes.items()}
        return data


def with_r_star(loss_law: LossLaw, samples: list[LossLaw], r_star: float,
                r_star_samples: list[float]) -> tuple[LossLaw, list[LossLaw]]:
    """The law with R*_D set to ``r_star``, and bootstrap laws that carry the R*_D bootstrap values:
    sample i pairs law sample i and R* sample i (cycling the shorter list), so the plan's
    intervals include the uncertainty of both fits."""
    law = dataclasses.replace(loss_law, r_star=r_star)
    if not r_star_samples:
        return law, [dataclasses.replace(s, r_star=r_star) for s in samples]
    count = max(len(samples), len(r_star_samples))
    return law, [dataclasses.replace(samples[i % len(samples)] if samples else loss_law,
                                     r_star=r_star_samples[i % len(r_star_samples)]) for i in range(count)]


def plan_budget(compute: float, fit: str | Path | None = None, law: str = "hoffmann2022",
                inference_tokens: float | None = None, unique_tokens: float | None = None,
                level: float | None = None, rule: ShapeRule | None = None, vocab_size: int | None = None,
                seq_len: int | None = None, n_experts: int | None = None, top_k: int = 2,
                count: Literal["active", "active_non_embedding"] = "active",
                r_star_fit: str | Path | None = None) -> BudgetPlan:
    """Plan ``compute`` FLOPs with the Approach-3 law of the fit file ``fit`` (intervals from its
    bootstrap laws, at ``level`` or the fit's own) or the published ``law`` (no intervals), and
    propose a shape under ``rule`` (the ladder's size rule) for each planned size.

    ``r_star_fit``: a fit of R*_D (an epochs sweep's ``repetition_fit.json``, or a ``scaling fit``
    with a fitted R*) whose R*_D, with its bootstrap values, replaces the law's; repetition of the
    ``unique_tokens`` then costs what that fit measured."""
    if fit is not None:
        fitted = load_fit(fit)
        loss_law, samples = law_from_fit(fitted)
        level = level or fitted["settings"].get("level", 0.95)
        source = f"fit {fit}"
    else:
        if law not in PUBLISHED_LAWS:
            raise ConfigError(f"unknown published law {law!r} (choose from {', '.join(PUBLISHED_LAWS)})")
        loss_law, samples, source = PUBLISHED_LAWS[law], [], f"published law {law}"
    if r_star_fit is not None:
        from lmforge.scaling.fit_repetition import load_r_star

        if unique_tokens is None:
            raise ConfigError(f"--r-star-fit {r_star_fit}: R*_D only matters with a limit on unique data; "
                              "give --unique-tokens")
        r_star, r_star_samples = load_r_star(r_star_fit)
        loss_law, samples = with_r_star(loss_law, samples, r_star, r_star_samples)
        source += f", R*_D = {r_star:.3g} from {r_star_fit}"
    if not samples:
        source += " (no intervals)"
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("n_experts", n_experts),
                        ("top_k", top_k)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if n_experts is not None and top_k > n_experts:
        raise ConfigError(f"top_k ({top_k}) must not exceed n_experts ({n_experts})")
    result = plan(loss_law, compute, inference_tokens=inference_tokens, unique_tokens=unique_tokens,
                  samples=samples, level=level or 0.95)
    targets = {"optimal": result.params.value}
    if result.inference is not None:
        targets["inference"] = result.inference.params.value
    shapes = {name: propose_shape(n, rule, vocab_size=vocab_size, seq_len=seq_len, n_experts=n_experts,
                                  top_k=top_k, count=count) for name, n in targets.items()}
    return BudgetPlan(plan=result, shapes=shapes, source=source)
