"""Held-out loss and bits-per-byte per domain, with a bootstrap interval.

Bits-per-byte divides the summed negative log-likelihood (in bits) by the number of UTF-8
bytes the scored tokens stand for, so models with different tokenizers can be compared:
bpb = sum(nll_nats) / (ln 2 * sum(bytes)). Per-token loss (nats) is reported alongside.

Which tokens are scored: windows of ``seq_len`` on a grid from each domain's first
held-out token. When the budget (``max_tokens`` per domain) covers the whole held-out
stream, every window is scored (every target once). When it does not, the affordable
number of windows is spread evenly over the stream rather than taken from its start, so
every held-out document is sampled in proportion to its length (the first 16k tokens of
the demo's literature would be one play). Each scored token is credited to its document,
and the 95% interval resamples documents (see :mod:`lmforge.eval.bootstrap`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.device import autocast_context
from lmforge.core.logging import get_logger
from lmforge.data.heldout_check import heldout_warnings
from lmforge.data.shards import ShardSet, load_manifest
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.bootstrap import bpb_interval

log = get_logger(__name__)
_WARNED: set[str] = set()  # data directories already warned about (periodic evals repeat)


def heldout_domains(data_dir: Path) -> list[str]:
    manifest = load_manifest(data_dir)
    return sorted(
        name for name, splits in manifest["sources"].items()
        if splits.get("heldout", {}).get("tokens", 0) > 1
    )


def eval_windows(n_tokens: int, seq_len: int, max_tokens: int) -> list[tuple[int, int]]:
    """(first input position, number of targets) of each window scored in a stream of ``n_tokens``.

    With a budget for all of the grid (or for less than one window), the windows are
    contiguous over the first ``max_tokens`` tokens, the last one possibly partial; else
    ``(max_tokens - 1) // seq_len`` full grid windows spread evenly from the start to the end.
    """
    if n_tokens < 2 or max_tokens < 2:
        return []
    budget = min(n_tokens, max_tokens)
    grid, affordable = (n_tokens - 1) // seq_len, (budget - 1) // seq_len
    if affordable == 0 or affordable >= grid:
        windows = [(k * seq_len, seq_len) for k in range(affordable)]
        tail = budget - 1 - affordable * seq_len
        return windows + [(affordable * seq_len, tail)] if tail > 0 else windows
    picks = (np.arange(affordable, dtype=np.int64) * grid) // affordable
    return [(int(k) * seq_len, seq_len) for k in picks]


def _batches(stream: ShardSet, windows: list[tuple[int, int]],
             batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(window starts [B], tokens [B, length + 1]): windows of one length together, up to
    ``batch_size`` at a time (a final partial window alone)."""
    full = [w for w in windows if w[1] == windows[0][1]]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in windows[len(full):]]
    for group in groups:
        length = group[0][1]
        starts = np.array([start for start, _ in group], dtype=np.int64)
        yield starts, np.stack([stream.get(int(start), length + 1).astype(np.int64) for start in starts])


def heldout_eval_windows(data_dir: Path, domain: str, seq_len: int, max_tokens: int,
                         batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of the windows :func:`evaluate_heldout` scores (see
    :func:`eval_windows`): for other held-out measurements that must see the same tokens."""
    stream = ShardSet(data_dir, "heldout", domain)
    for _, rows in _batches(stream, eval_windows(len(stream), seq_len, max_tokens), batch_size):
        yield torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


def _warn_once(data_dir: Path) -> None:
    key = str(Path(data_dir).resolve())
    if key in _WARNED:
        return
    _WARNED.add(key)
    for line in heldout_warnings(load_manifest(data_dir)):
        log.warning("%s: %s", data_dir, line)


@torch.no_grad()
def _score_domain(model: nn.Module, stream: ShardSet, windows: list[tuple[int, int]], byte_lengths: np.ndarray,
                  batch_size: int, device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """Summed loss (nats) and bytes per scored window, per document and per position in the
    window (``position_*``: index j is the target read after j + 1 tokens) of one domain."""
    n_docs = len(stream.doc_offsets) + 1  # bin 0: before the first document (never used)
    width = max((n for _, n in windows), default=0)
    sums = {"window_nll": np.zeros(len(windows)), "window_bytes": np.zeros(len(windows)),
            "doc_nll": np.zeros(n_docs), "doc_bytes": np.zeros(n_docs), "doc_scored": np.zeros(n_docs, dtype=bool),
            "position_nll": np.zeros(width), "position_bytes": np.zeros(width),
            "position_tokens": np.zeros(width, dtype=np.int64)}
    done = 0
    for starts, rows in _batches(stream, windows, batch_size):
        inputs, targets = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
        with autocast_context(device, precision):
            logits = model(inputs.to(device)).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(),
                              reduction="none").view(targets.shape).double().cpu().numpy()
        # Special tokens (end-of-text) stand for zero bytes; their loss still counts, as the
        # model must predict document ends.
        nbytes = byte_lengths[rows[:, 1:]]
        sums["window_nll"][done:done + len(starts)] = nll.sum(1)
        sums["window_bytes"][done:done + len(starts)] = nbytes.sum(1)
        length = targets.shape[1]
        sums["position_nll"][:length] += nll.sum(0)
        sums["position_bytes"][:length] += nbytes.sum(0)
        sums["position_tokens"][:length] += len(starts)
        done += len(starts)
        # Each target token belongs to the document its stream position falls in.
        positions = starts[:, None] + 1 + np.arange(targets.shape[1])
        docs = np.searchsorted(stream.doc_offsets, positions, side="right").ravel()
        sums["doc_nll"] += np.bincount(docs, weights=nll.ravel(), minlength=n_docs)
        sums["doc_bytes"] += np.bincount(docs, weights=nbytes.ravel(), minlength=n_docs)
        sums["doc_scored"][docs] = True
    return sums


def evaluate_heldout(
    model: nn.Module,
    data_dir: Path,
    seq_len: int,
    max_tokens_per_domain: int,
    batch_size: int = 8,
    device: torch.device | None = None,
    precision: str = "auto",
    interval_level: float = 0.95,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Return ``{"loss": {domain: nats/token}, "bpb": {...}, "bpb_interval": {domain: [low, high]},
    "interval_unit": {domain: "document" | "window"}, "documents": {...}, "tokens": {...}, "bytes": {...}}``.

    ``documents`` counts the held-out documents with at least one scored token. ``positions``
    holds, per domain, the summed loss, bytes and token count of the targets at each position of
    the windows (``{"nll": [...], "bytes": [...], "tokens": [...]}``, index j: the target read after
    j + 1 tokens of its window), from the same forward passes; :mod:`lmforge.eval.positions`
    groups them into buckets.
    """
    device = device or next(model.parameters()).device
    data_dir = Path(data_dir)
    byte_lengths = Tokenizer.load(data_dir / "tokenizer.json").token_byte_lengths().astype(np.int64)
    _warn_once(data_dir)
    manifest = load_manifest(data_dir)
    was_training = model.training
    model.eval()
    keys = ("loss", "bpb", "bpb_interval", "interval_unit", "documents", "tokens", "bytes", "positions")
    result: dict[str, dict] = {key: {} for key in keys}
    for domain in heldout_domains(data_dir):
        stream = ShardSet(data_dir, "heldout", domain, manifest)
        windows = eval_windows(len(stream), seq_len, max_tokens_per_domain)
        token_count = sum(n for _, n in windows)
        if token_count == 0:
            continue
        sums = _score_domain(model, stream, windows, byte_lengths, batch_size, device, precision)
        scored = sums["doc_scored"]
        nll_sum, byte_count = float(sums["window_nll"].sum()), int(sums["window_bytes"].sum())
        interval, unit = bpb_interval(sums["doc_nll"][scored], sums["doc_bytes"][scored], sums["window_nll"],
                                      sums["window_bytes"], interval_level, bootstrap_samples, seed)
        result["loss"][domain] = nll_sum / token_count
        result["bpb"][domain] = nll_sum / (math.log(2) * max(byte_count, 1))
        result["bpb_interval"][domain] = [interval[0], interval[1]]
        result["interval_unit"][domain] = unit
        result["documents"][domain] = int(scored.sum())
        result["tokens"][domain] = token_count
        result["bytes"][domain] = byte_count
        result["positions"][domain] = {"nll": sums["position_nll"].tolist(), "bytes": sums["position_bytes"].tolist(),
                                       "tokens": sums["position_tokens"].tolist()}
    model.train(was_training)
    if not result["bpb"]:
        log.warning("%s: no held-out tokens in any domain, so no held-out bits-per-byte was measured "
                    "(raise data.heldout_fraction, or a source's heldout_fraction, and prepare again)", data_dir)
    return result
