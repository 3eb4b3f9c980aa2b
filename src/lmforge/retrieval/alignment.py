"""Aligning a retrieved neighbour with the chunk that retrieved it.

A database chunk is cut at a fixed grid of ``chunk_len`` tokens, so when the database holds
a passage that the query chunk repeats (boilerplate, a quotation, another edition of the
same text, a fact document that the question paraphrases), the passage sits at an arbitrary
offset inside the neighbour: its continuation does not start where the query's next chunk
starts. A small model learns position-aligned copying through chunked cross-attention
quickly, but offset-free (content-addressed) copying only after far more training than a
laptop run gives it.

Alignment therefore moves each neighbour's window along the database's token stream (the
chunk before it, the chunk, its continuation and the chunk after) by the shift ``s`` in
[-(m-1), m-1] whose tokens agree best with the query chunk, weighting agreement near the
query's end most, because that end is where the continuation must line up. The window is
then the 2m tokens from ``c·m + s``: an aligned chunk followed by its aligned continuation.
A shift is taken only if it agrees with the query on at least ``min_matches`` more tokens
than the unshifted window does; otherwise the neighbour stays as retrieved (plain RETRO).

Alignment reads only the query chunk and database tokens, so it keeps the causal shift of
RETRO intact: the neighbours of chunk u still depend on chunk u's tokens and nothing later.
Segments that the caller marks unusable (a removed chunk, or during training a chunk of the
query's own document or within the exclusion radius) read as end-of-text and never align.

Written by hand: this is a few vectorised numpy comparisons, nothing a library offers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from lmforge.retrieval.database import ChunkDatabase

SegmentFilter = Callable[[np.ndarray, np.ndarray], np.ndarray]


def stream_segments(next_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Chunk ids [..., 4]: the chunk before each id, the id, its continuation, the one after (-1 = none)."""
    ids = np.asarray(ids, dtype=np.int64)
    next_ids = np.asarray(next_ids)
    out = np.full((*ids.shape, 4), -1, dtype=np.int64)
    have = ids >= 0
    c = ids[have]
    prev = c - 1
    ok_prev = prev >= 0
    ok_prev[ok_prev] = next_ids[prev[ok_prev]] == c[ok_prev]
    first = np.where(ok_prev, prev, -1)
    second = np.asarray(next_ids[c])
    third = np.full_like(c, -1)
    has2 = second >= 0
    third[has2] = next_ids[second[has2]]
    out[have] = np.stack([first, c, second, third], axis=-1)
    return out


def best_shifts(queries: np.ndarray, streams: np.ndarray, chunk_len: int, min_matches: int = 4) -> np.ndarray:
    """Shift per neighbour: ``queries`` [N, m], ``streams`` [N, k, 4m] -> int64 [N, k] in [-(m-1), m-1]."""
    m = chunk_len
    windows = np.lib.stride_tricks.sliding_window_view(streams, m, axis=-1)[..., 1:2 * m, :]  # [N, k, 2m-1, m]
    agree = windows == queries[:, None, None, :]
    weights = np.linspace(1.0 / m, 1.0, m, dtype=np.float32)  # the query's end counts most
    score = agree.astype(np.float32) @ weights  # [N, k, 2m-1]; index m-1 is shift 0
    counts = agree.sum(-1)
    best = score.argmax(-1)
    take = np.take_along_axis(counts, best[..., None], -1)[..., 0] >= counts[..., m - 1] + min_matches
    return np.where(take, best - (m - 1), 0).astype(np.int64)


def aligned_windows(tokens: np.ndarray, next_ids: np.ndarray, ids: np.ndarray, queries: np.ndarray, eos_id: int,
                    usable: SegmentFilter | None = None, min_matches: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Aligned neighbour tokens [N, k, 2m] and the shifts used [N, k].

    ``tokens`` [n_chunks, m] and ``next_ids`` [n_chunks] are the database's arrays, ``ids``
    [N, k] neighbour chunk ids (-1 = none), ``queries`` [N, m] the chunks that retrieved
    them. ``usable(query_index [N*k*4], segment_ids [N*k*4]) -> bool`` marks segments the
    query may read (ids are >= 0 when it is called).
    """
    ids = np.asarray(ids, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    n, k = ids.shape
    m = queries.shape[1]
    segments = stream_segments(next_ids, ids)  # [N, k, 4]
    flat = segments.reshape(-1)
    keep = flat >= 0
    if usable is not None and keep.any():
        query_index = np.repeat(np.arange(n), k * 4)
        keep[keep] = usable(query_index[keep], flat[keep])
    streams = np.full((len(flat), m), eos_id, dtype=np.int64)
    rows = flat[keep]
    if len(rows):
        order = np.argsort(rows, kind="stable")  # sorted reads are kinder to memory maps
        read = np.empty((len(rows), m), dtype=np.int64)
        read[order] = tokens[rows[order]]
        streams[keep] = read
    streams = streams.reshape(n, k, 4 * m)
    # The retrieved chunk itself is always usable; a neighbour with no id reads as padding.
    shifts = best_shifts(queries, streams, m, min_matches)
    shifts[ids < 0] = 0
    start = m + shifts  # position of the aligned window in the 4m stream
    offsets = start[..., None] + np.arange(2 * m)
    return np.take_along_axis(streams, offsets, -1), shifts


def window_neighbour_tokens(db: "ChunkDatabase", inputs: np.ndarray, ids: np.ndarray, align: bool,
                            usable: SegmentFilter | None = None) -> np.ndarray:
    """Neighbour tokens [b, l, k, 2m] for the complete chunks of ``inputs`` [b, n] (ids [b, l, k]),
    aligned with their chunks when ``align`` (a RETRO model's ``retro.align_neighbours``).

    ``usable`` (query index over the b * l flattened chunks, chunk ids) -> bool forbids more
    segments to an aligned window, as in :meth:`ChunkDatabase.neighbour_tokens`.
    """
    if not align:
        return db.neighbour_tokens(ids)
    b, n_chunks = ids.shape[:2]
    m = db.chunk_len
    return db.neighbour_tokens(ids, np.asarray(inputs)[:, : n_chunks * m].reshape(b, n_chunks, m), usable)
