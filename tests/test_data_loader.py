"""MixtureLoader determinism, exact resume, rank disjointness; held-out windows."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig
from lmforge.data.loader import MixtureLoader, heldout_windows
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("loader") / "data"
    prepare_data(DataConfig.from_dict({
        "out_dir": str(out), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1, "shard_tokens": 5000,
        "sources": [{"name": "prose", "kind": "files", "path": str(tiny_corpus / "prose")},
                    {"name": "code", "kind": "files", "path": str(tiny_corpus / "code")}],
    }))
    return out


def _batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_batches_are_shifted_windows_and_deterministic(data_dir):
    a = MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=3)
    b = MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=3)
    for (x, y), (x2, y2) in zip(_batches(a, 3), _batches(b, 3)):
        assert x.dtype == torch.long and x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=4).next_batch()[0]
    assert not torch.equal(other, MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=3).next_batch()[0])


def test_resume_continues_exactly(data_dir):
    full = MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=0)
    expected = _batches(full, 8)
    first = MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=0)
    _batches(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types only
    assert state["batch_index"] == 5
    resumed = MixtureLoader(data_dir, seq_len=16, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(_batches(resumed, 3), expected[5:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.epochs_consumed() == full.epochs_consumed()


def test_ranks_take_disjoint_slices_of_one_global_batch(data_dir):
    single = MixtureLoader(data_dir, seq_len=16, batch_size=6, seed=1).next_batch()[0]
    parts = [MixtureLoader(data_dir, seq_len=16, batch_size=2, seed=1, rank=r, world_size=3).next_batch()[0]
             for r in range(3)]
    assert torch.equal(torch.cat(parts), single)


def test_weights_select_sources_and_epochs_are_counted(data_dir):
    loader = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=0, weights={"prose": 1.0, "code": 0.0})
    assert loader.domains() == ["prose"]
    _batches(loader, 10)
    prose = ShardSet(data_dir, "train", "prose")
    assert loader.epochs_consumed() == {"prose": pytest.approx(10 * 8 * 16 / len(prose))}
    natural = MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=0)
    assert natural.domains() == ["code", "prose"] and sum(natural.weights().values()) == pytest.approx(1.0)
    with pytest.raises(DataError, match="unknown sources"):
        MixtureLoader(data_dir, seq_len=16, batch_size=8, seed=0, weights={"poetry": 1.0})


def test_warns_once_past_four_epochs(data_dir):
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("lmforge").addHandler(handler)
    try:
        loader = MixtureLoader(data_dir, seq_len=64, batch_size=64, seed=0, weights={"code": 1.0})
        while loader.epochs_consumed()["code"] < 6:
            loader.next_batch()
    finally:
        logging.getLogger("lmforge").removeHandler(handler)
    assert sum("has been repeated" in r.getMessage() for r in seen) == 1


def test_heldout_windows_cover_every_target_once(data_dir):
    tokens = ShardSet(data_dir, "heldout", "code")
    n = min(len(tokens), 300)
    batches = list(heldout_windows(data_dir, "code", seq_len=32, max_tokens=300, batch_size=4))
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(targets, torch.from_numpy(tokens.get(1, n - 1).astype("int64")))
    assert all(x.shape == y.shape for x, y in batches)
    assert batches[0][0].shape == (4, 32)
    assert batches[-1][0].shape == (1, (n - 1) % 32)  # the final partial window is kept
    assert [x.tolist() for x, _ in batches] == [x.tolist() for x, _ in
                                                  heldout_windows(data_dir, "code", 32, max_tokens=300, batch_size=4)]
