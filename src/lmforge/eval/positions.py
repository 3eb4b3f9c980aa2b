"""Held-out loss by position in the window: does a later token gain from the context before it?

The held-out evaluation (:mod:`lmforge.eval.heldout`) scores windows of ``seq_len`` tokens and
keeps, for every position j of a window, the summed loss, bytes and count of the targets read
after j + 1 tokens of context. Here those sums are grouped into buckets of ``width`` positions
(0-63, 64-127, ...: the last bucket may be shorter), each with its mean loss (nats/token) and
bits-per-byte. The buckets partition the scored tokens, so their token-weighted mean loss is the
domain's held-out loss and their byte-weighted bits-per-byte its bits-per-byte.

A model that uses its context has a falling curve: the first bucket, whose targets see at most
``width`` tokens, is the hardest. A model that ignores its context (a unigram model) has a flat
one. After context extension, the buckets beyond the trained length show whether the new
positions help or hurt.
"""

from __future__ import annotations

import math
from typing import Any


def position_buckets(sums: dict[str, list[float]], width: int) -> dict[str, Any]:
    """Group per-position sums (``{"nll", "bytes", "tokens"}``, one entry per position) into
    buckets of ``width`` positions: ``{"width", "start": [...], "end": [...] (exclusive), "loss":
    [...], "bpb": [...], "tokens": [...], "bytes": [...]}``; buckets without a target are left out."""
    if width < 1:
        raise ValueError(f"position bucket width must be >= 1, got {width}")
    out: dict[str, Any] = {"width": width, "start": [], "end": [], "loss": [], "bpb": [], "tokens": [], "bytes": []}
    n_positions = len(sums["tokens"])
    for start in range(0, n_positions, width):
        end = min(start + width, n_positions)
        tokens = int(sum(sums["tokens"][start:end]))
        if tokens == 0:
            continue
        nll, nbytes = float(sum(sums["nll"][start:end])), float(sum(sums["bytes"][start:end]))
        out["start"].append(start)
        out["end"].append(end)
        out["loss"].append(nll / tokens)
        out["bpb"].append(nll / (math.log(2) * nbytes) if nbytes > 0 else math.nan)
        out["tokens"].append(tokens)
        out["bytes"].append(int(round(nbytes)))
    return out


def buckets_by_domain(positions: dict[str, dict[str, list[float]]], width: int) -> dict[str, dict[str, Any]]:
    return {domain: position_buckets(sums, width) for domain, sums in positions.items()}


def describe_buckets(by_domain: dict[str, dict[str, Any]], per_line: int = 8) -> list[str]:
    """The mean loss of each bucket, ``per_line`` buckets a line: ``code  0-63: 2.910  64-127: 2.400``."""
    lines = []
    for domain, buckets in by_domain.items():
        cells = [f"{s}-{e - 1}: {loss:.3f}" for s, e, loss in zip(buckets["start"], buckets["end"], buckets["loss"])]
        for first in range(0, len(cells), per_line):
            lines.append(f"  {domain if first == 0 else '':<12} {'  '.join(cells[first:first + per_line])}")
    return lines
