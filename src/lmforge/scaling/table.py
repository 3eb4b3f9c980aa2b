"""Read scaling-law measurements from a CSV file: one row per (parameters, tokens, loss) point.

A row is one measurement: a model of N parameters (active parameters for a mixture of
experts) trained on D tokens reached loss L. Optional columns:

- ``compute`` C, training FLOPs; when absent it is taken as C = 6·N·D.
- ``unique_tokens`` U, for data-constrained fits: D tokens were drawn from U unique ones,
  so the data was repeated R = D/U − 1 times (see :func:`lmforge.scaling.fit.effective_data`).
- ``run``, a curve identifier: rows sharing it are points on one training curve
  (Approach 1's envelope). When absent, rows with the same N form one curve.

Column names are found by a list of usual spellings (``N``/``params``/``parameters``, ...)
unless given explicitly, e.g. ``{"params": "n_active", "loss": "val_loss"}``. Values may
carry a magnitude suffix (``70M``, ``1.4B``, ``300B``, ``2T``). Every error names the file,
the column and the line that was wrong.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from lmforge.core.errors import ConfigError, DataError

# Logical column -> spellings tried in order (compared case-insensitively).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "params": ("N", "params", "parameters", "n_params", "num_params", "active_params", "model_size"),
    "tokens": ("D", "tokens", "n_tokens", "num_tokens", "train_tokens", "data"),
    "loss": ("loss", "L", "final_loss", "eval_loss", "val_loss"),
    "compute": ("C", "compute", "flops", "train_flops"),
    "unique_tokens": ("U", "unique_tokens", "unique", "n_unique_tokens"),
    "run": ("run", "run_id", "run_name", "name", "curve"),
}
REQUIRED = ("params", "tokens", "loss")
_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


@dataclass
class ScalingTable:
    """Columns of a scaling-law data set as float arrays (``run`` as strings).

    ``compute`` is always filled: read from the file or computed as 6·N·D.
    """

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    compute: np.ndarray
    unique_tokens: np.ndarray | None = None
    run: np.ndarray | None = None
    source: str = "<arrays>"
    compute_given: bool = False
    columns: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> "ScalingTable":
        """Rows ``index`` (with repeats, as a bootstrap resample needs)."""
        return ScalingTable(
            params=self.params[index], tokens=self.tokens[index], loss=self.loss[index],
            compute=self.compute[index],
            unique_tokens=None if self.unique_tokens is None else self.unique_tokens[index],
            run=None if self.run is None else self.run[index],
            source=self.source, compute_given=self.compute_given, columns=self.columns,
        )

    def point_ids(self, with_unique_tokens: bool = True) -> np.ndarray:
        """One label per row naming its distinct (N, D) point — (N, D, U) with unique tokens —
        numbered in order of first appearance. Repeated measurements of one point (seeds,
        duplicated rows) share a label: they say nothing about how loss changes with N and D."""
        columns = [self.params, self.tokens]
        if with_unique_tokens and self.unique_tokens is not None:
            columns.append(self.unique_tokens)
        _, first, inverse = np.unique(np.stack(columns, axis=1), axis=0, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=int)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        return rank[np.asarray(inverse).reshape(-1)]

    def distinct_points(self, with_unique_tokens: bool = True) -> int:
        """How many distinct (N, D[, U]) points the rows hold (see :meth:`point_ids`)."""
        return int(self.point_ids(with_unique_tokens).max()) + 1 if len(self) else 0

    def curve_ids(self) -> np.ndarray:
        """One label per row naming its training curve: ``run`` if given, else N."""
        if self.run is not None:
            return self.run
        return np.array([repr(float(n)) for n in self.params])


def make_table(params, tokens, loss, compute=None, unique_tokens=None, run=None,
               source: str = "<arrays>") -> ScalingTable:
    """Build a :class:`ScalingTable` from arrays, checking every value is finite and positive."""
    arrays = {"params": params, "tokens": tokens, "loss": loss}
    if compute is not None:
        arrays["compute"] = compute
    if unique_tokens is not None:
        arrays["unique_tokens"] = unique_tokens
    checked: dict[str, np.ndarray] = {}
    n = len(np.asarray(loss))
    for name, values in arrays.items():
        values = np.asarray(values, dtype=float).reshape(-1)
        if len(values) != n:
            raise DataError(f"{source}: column {name} has {len(values)} values, loss has {n}")
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if len(bad):
            raise DataError(f"{source}: column {name}, row {bad[0]}: expected a positive finite number, "
                            f"got {values[bad[0]]!r}")
        checked[name] = values
    if n < 1:
        raise DataError(f"{source}: no data rows")
    given = "compute" in checked
    return ScalingTable(
        params=checked["params"], tokens=checked["tokens"], loss=checked["loss"],
        compute=checked["compute"] if given else 6.0 * checked["params"] * checked["tokens"],
        unique_tokens=checked.get("unique_tokens"),
        run=None if run is None else np.asarray(run).astype(str),
        source=source, compute_given=given,
    )


def parse_columns(text: str | None) -> dict[str, str]:
    """Parse ``"params=n_active,loss=val_loss"`` into ``{"params": "n_active", "loss": "val_loss"}``.

    Keys are the logical columns (params, tokens, loss, compute, unique_tokens, run).
    """
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ConfigError(f"--columns: expected KEY=COLUMN, got {item!r}")
        if key not in COLUMN_ALIASES:
            raise ConfigError(f"--columns: unknown key {key!r} (known keys: {', '.join(COLUMN_ALIASES)})")
        mapping[key] = value
    return mapping


def parse_number(text: str) -> float:
    """A float, optionally with a magnitude suffix K, M, B/G or T (``1.4B`` -> 1.4e9)."""
    text = text.strip().replace("_", "")
    scale = 1.0
    if text and text[-1].upper() in _SUFFIX and not text[-1].isdigit():
        scale = _SUFFIX[text[-1].upper()]
        text = text[:-1]
    return float(text) * scale


def _resolve_columns(header: list[str], wanted: Mapping[str, str], path: Path) -> dict[str, str]:
    by_lower = {}
    for name in header:
        by_lower.setdefault(name.strip().lower(), name)
    resolved: dict[str, str] = {}
    for key, aliases in COLUMN_ALIASES.items():
        if key in wanted:
            column = by_lower.get(wanted[key].strip().lower())
            if column is None:
                raise DataError(f"{path}: column {wanted[key]!r} (for {key}) not found; "
                                f"the header has: {', '.join(header)}")
            resolved[key] = column
            continue
        for alias in aliases:
            if alias.lower() in by_lower:
                resolved[key] = by_lower[alias.lower()]
                break
        else:
            if key in REQUIRED:
                raise DataError(f"{path}: no {key} column (looked for {', '.join(aliases)}); "
                                f"the header has: {', '.join(header)}. Name it with --columns {key}=NAME")
    used = list(resolved.values())
    for column in used:
        if used.count(column) > 1:
            keys = [k for k, v in resolved.items() if v == column]
            raise DataError(f"{path}: column {column!r} is used for both {keys[0]} and {keys[1]}")
    return resolved


def read_table(path: str | Path, columns: Mapping[str, str] | None = None) -> ScalingTable:
    """Read a CSV of scaling measurements into a :class:`ScalingTable`.

    ``columns`` maps logical names (params, tokens, loss, compute, unique_tokens, run) to
    the file's header names; unmapped ones are found by :data:`COLUMN_ALIASES`. Blank lines
    and lines starting with ``#`` are skipped. Raises :class:`DataError` naming the file,
    column and line of the first bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines())
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"{path}: empty file (expected a header line and data rows)")
    rows = list(csv.reader([line for _, line in lines]))
    header = [h.strip() for h in rows[0]]
    if len(rows) < 2:
        raise DataError(f"{path}: header only, no data rows")
    resolved = _resolve_columns(header, columns or {}, path)
    index = {key: header.index(column) for key, column in resolved.items()}

    values: dict[str, list] = {key: [] for key in resolved}
    for (line_no, _), row in zip(lines[1:], rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line_no} has {len(row)} fields, the header has {len(header)}")
        for key, col in index.items():
            cell = row[col].strip()
            if key == "run":
                values[key].append(cell)
                continue
            try:
                number = parse_number(cell)
            except ValueError:
                raise DataError(f"{path}: line {line_no}, column {resolved[key]!r}: "
                                f"expected a number, got {cell!r}") from None
            if not math.isfinite(number) or number <= 0:
                raise DataError(f"{path}: line {line_no}, column {resolved[key]!r}: "
                                f"expected a positive finite number, got {cell!r}")
            values[key].append(number)
    table = make_table(
        values["params"], values["tokens"], values["loss"], compute=values.get("compute"),
        unique_tokens=values.get("unique_tokens"), run=values.get("run"), source=str(path),
    )
    table.columns = resolved
    return table
