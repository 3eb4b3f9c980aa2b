"""Does retrieval raise held-out bits-per-byte? A paired comparison per document, and a plain verdict.

The same held-out tokens are scored twice, without and with neighbours. Comparing the two
bits-per-byte values with their separate bootstrap intervals would drown a real difference in
the spread between documents, which is common to both conditions. The paired comparison
resamples documents (their summed loss under both conditions and their bytes, together) and
recomputes the *difference* each time:

    diff = (sum nll_with - sum nll_without) / (ln 2 * sum bytes)

Its 2.5th and 97.5th percentiles are the 95% interval. Retrieval **hurts** a domain when the
whole interval lies above zero, **helps** when it lies below, and otherwise the difference is
within noise. With fewer than :data:`~lmforge.eval.bootstrap.MIN_DOCUMENTS` documents, windows
are resampled instead (as for the bpb intervals).

numpy only, seeded: the same losses always give the same verdict.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmforge.eval.bootstrap import MIN_DOCUMENTS, ratio_interval


def paired_difference_interval(nll_without: np.ndarray, nll_with: np.ndarray, n_bytes: np.ndarray,
                               level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high) of bits-per-byte with minus without, resampling units (documents or windows).

    ``nll_without[i]``, ``nll_with[i]`` and ``n_bytes[i]`` are unit i's summed loss (nats) under
    each condition and its byte count.
    """
    a, b, size = (np.asarray(x, dtype=np.float64) for x in (nll_without, nll_with, n_bytes))
    if not (a.shape == b.shape == size.shape) or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need three equal-length, non-empty 1-d arrays, got {a.shape}, {b.shape}, {size.shape}")
    # The difference of two ratios over the same bytes is one ratio: summed loss difference over
    # summed bytes, so the bpb bootstrap resamples it as it is.
    delta = b - a
    point = float(delta.sum() / (math.log(2) * max(size.sum(), 1.0)))
    low, high = ratio_interval(delta, size, level, samples, seed)
    return point, low, high


def retrieval_guard(per_domain: dict[str, dict[str, np.ndarray]], level: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """The verdict per domain and overall.

    ``per_domain[domain]`` holds ``doc_without``, ``doc_with``, ``doc_bytes`` (per scored
    document) and ``window_without``, ``window_with``, ``window_bytes`` (per scored window).
    Returns ``{"domains": {domain: {"difference", "interval", "unit", "units", "retrieval_hurts",
    "retrieval_helps"}}, "retrieval_hurts": [domains], "level", "message"}``.
    """
    domains: dict[str, Any] = {}
    for domain, sums in per_domain.items():
        unit = "document" if len(sums["doc_bytes"]) >= MIN_DOCUMENTS else "window"
        key = "doc" if unit == "document" else "window"
        diff, low, high = paired_difference_interval(sums[f"{key}_without"], sums[f"{key}_with"], sums[f"{key}_bytes"],
                                                     level, seed=seed)
        domains[domain] = {"difference": diff, "interval": [low, high], "unit": unit,
                           "units": int(len(sums[f"{key}_bytes"])), "retrieval_hurts": low > 0,
                           "retrieval_helps": high < 0}
    hurts = [d for d, v in domains.items() if v["retrieval_hurts"]]
    return {"domains": domains, "retrieval_hurts": hurts, "level": level, "message": guard_message(domains, level)}


def guard_message(domains: dict[str, Any], level: float = 0.95) -> str:
    """One plain sentence per domain, the warning first."""
    pct = f"{100 * level:.0f}%"
    lines = []
    for domain, v in sorted(domains.items(), key=lambda item: not item[1]["retrieval_hurts"]):
        span = f"{v['difference']:+.4f} bits/byte ({pct} paired interval {v['interval'][0]:+.4f} to {v['interval'][1]:+.4f})"
        if v["retrieval_hurts"]:
            lines.append(f"WARNING: retrieval makes held-out {domain} worse: {span}, beyond the noise; the model "
                         f"trusts its neighbours more than they deserve")
        elif v["retrieval_helps"]:
            lines.append(f"retrieval improves held-out {domain}: {span}")
        else:
            lines.append(f"retrieval changes held-out {domain} by {span}: within noise")
    return "\n".join(lines)
