"""Neighbour alignment: a repeated passage at any offset lines up with the query that retrieved it."""

import numpy as np
import pytest

from lmforge.retrieval.alignment import aligned_windows, best_shifts, stream_segments

M, EOS = 8, 0


def _database(rng: np.random.Generator, passage: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Two streams of 5 chunks each; stream B holds ``passage`` starting ``offset`` tokens into its chunk 1."""
    a = rng.integers(10, 500, size=5 * M)
    b = rng.integers(10, 500, size=5 * M)
    a[M:M + len(passage)] = passage  # A's chunks 1.. hold the passage on the grid
    b[M + offset:M + offset + len(passage)] = passage
    tokens = np.concatenate([a, b]).reshape(10, M)
    nxt = np.array([1, 2, 3, 4, -1, 6, 7, 8, 9, -1])
    return tokens, nxt


@pytest.mark.parametrize("offset", [-5, -1, 0, 3, 7])
def test_a_repeated_passage_lines_up_with_its_query(offset):
    rng = np.random.default_rng(offset + 10)
    passage = rng.integers(500, 900, size=3 * M)
    tokens, nxt = _database(rng, passage, offset)
    query = tokens[1:2]  # A's chunk 1 = passage[:M]; its next chunk is passage[M:2M]
    windows, shifts = aligned_windows(tokens, nxt, np.array([[6]]), query, EOS)
    assert shifts[0, 0] == offset
    assert (windows[0, 0, :M] == passage[:M]).all()       # aligned chunk = the query
    assert (windows[0, 0, M:] == passage[M:2 * M]).all()  # aligned continuation = what comes next


def test_no_agreement_keeps_the_neighbour_as_retrieved():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 500, size=(6, M))
    nxt = np.array([1, 2, -1, 4, 5, -1])
    query = rng.integers(600, 900, size=(1, M))  # shares no token with the database
    windows, shifts = aligned_windows(tokens, nxt, np.array([[4, -1]]), query, EOS)
    assert shifts.tolist() == [[0, 0]]
    assert (windows[0, 0] == np.concatenate([tokens[4], tokens[5]])).all()
    assert (windows[0, 1] == EOS).all()  # no neighbour reads as padding


def test_unusable_segments_read_as_padding_and_never_align():
    rng = np.random.default_rng(3)
    passage = rng.integers(500, 900, size=3 * M)
    tokens, nxt = _database(rng, passage, -5)  # the passage starts in B's chunk 0 (= row 5)
    query = tokens[1:2]
    assert aligned_windows(tokens, nxt, np.array([[6]]), query, EOS)[1][0, 0] == -5  # all usable: moves back
    windows, shifts = aligned_windows(tokens, nxt, np.array([[6]]), query, EOS,
                                      usable=lambda q, rows: rows != 5)
    # Row 5 reads as padding, so only 3 tokens would agree at shift -5: below min_matches, no move.
    assert shifts[0, 0] == 0
    assert (windows[0, 0] == np.concatenate([tokens[6], tokens[7]])).all()


def test_stream_segments_follow_the_continuation_links():
    nxt = np.array([1, 2, -1, 4, -1])
    assert stream_segments(nxt, np.array([1, 0, 3, -1])).tolist() == [
        [0, 1, 2, -1], [-1, 0, 1, 2], [-1, 3, 4, -1], [-1, -1, -1, -1]]


def test_small_agreement_is_not_worth_a_shift():
    queries = np.arange(1, M + 1)[None]
    streams = np.zeros((1, 1, 4 * M), dtype=np.int64)
    streams[0, 0, M + 2 + M - 3:M + 2 + M] = queries[0, -3:]  # three matching tokens at shift 2
    assert best_shifts(queries, streams, M, min_matches=4)[0, 0] == 0
    assert best_shifts(queries, streams, M, min_matches=3)[0, 0] == 2
