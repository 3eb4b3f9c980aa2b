"""Bootstrap intervals for held-out bits-per-byte.

Bits-per-byte is a ratio of sums, sum(nll) / (ln 2 * sum(bytes)), and the tokens of one
document are not independent draws: a play or a module is easy or hard as a whole. So
the interval resamples whole documents (their summed loss and bytes) with replacement and
recomputes the ratio each time; the 2.5th and 97.5th percentiles of those ratios are the
95% interval (the percentile bootstrap, Efron & Tibshirani 1993, ch. 13). With too few
documents for that, the scored windows are resampled instead, and the interval then
shows only the noise within those documents, not the spread between documents.

numpy only, and seeded: the same losses always give the same interval.
"""

from __future__ import annotations

import math

import numpy as np

# Below this many documents, resampling documents says little about the spread between
# them (two documents give three distinct resamples): windows are resampled instead.
MIN_DOCUMENTS = 5
# Resamples drawn per block, bounded so that samples x units stays small in memory.
_BLOCK_CELLS = 1 << 22


def ratio_interval(nll_nats: np.ndarray, n_bytes: np.ndarray, level: float = 0.95, samples: int = 1000,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of bits-per-byte over units (documents or windows).

    ``nll_nats[i]`` and ``n_bytes[i]`` are unit i's summed loss and byte count. A single
    unit gives the point value twice.
    """
    nll = np.asarray(nll_nats, dtype=np.float64)
    size = np.asarray(n_bytes, dtype=np.float64)
    if nll.shape != size.shape or nll.ndim != 1 or len(nll) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d arrays, got shapes {nll.shape} and {size.shape}")
    if not 0.0 < level < 1.0 or samples < 1:
        raise ValueError(f"level must be in (0, 1) and samples >= 1, got {level} and {samples}")
    rng = np.random.default_rng(seed)
    units = len(nll)
    ratios = np.empty(samples)
    block = max(1, _BLOCK_CELLS // units)
    for first in range(0, samples, block):
        count = min(block, samples - first)
        picks = rng.integers(0, units, size=(count, units))
        # A resample of zero-byte units only (end-of-text tokens) has no bpb; count it as 1 byte.
        ratios[first:first + count] = nll[picks].sum(1) / (math.log(2) * np.maximum(size[picks].sum(1), 1.0))
    tail = (1.0 - level) / 2
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def bpb_interval(doc_nll: np.ndarray, doc_bytes: np.ndarray, window_nll: np.ndarray, window_bytes: np.ndarray,
                 level: float = 0.95, samples: int = 1000, seed: int = 0) -> tuple[tuple[float, float], str]:
    """(interval, unit): over documents when at least :data:`MIN_DOCUMENTS` were scored,
    else over windows; ``unit`` is "document" or "window"."""
    if len(doc_nll) >= MIN_DOCUMENTS:
        return ratio_interval(doc_nll, doc_bytes, level, samples, seed), "document"
    return ratio_interval(window_nll, window_bytes, level, samples, seed), "window"
