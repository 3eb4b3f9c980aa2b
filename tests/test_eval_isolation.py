"""Held-out isolation by construction, and bits-per-byte that is tokenizer-independent."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import prepare_tiny_data
from lmforge.core.errors import DataError
from lmforge.eval.heldout import evaluate_heldout
from lmforge.eval.isolation import require_isolation
from lmforge.nn.config import ModelConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus):
    return prepare_tiny_data(tmp_path_factory.mktemp("evaldata"), tiny_corpus)


def test_prepared_split_is_isolated(data_dir):
    report = require_isolation(data_dir)
    assert report["overlap"] == 0 and report["heldout_docs"] > 0


def test_training_refuses_overlapping_heldout(data_dir, tmp_path):
    import shutil

    tampered = tmp_path / "data"
    shutil.copytree(data_dir, tampered)
    train_hashes = (tampered / "doc_hashes" / "train.txt").read_text().split()
    heldout = tampered / "doc_hashes" / "heldout.txt"
    heldout.write_text(heldout.read_text() + train_hashes[0] + "\n")
    with pytest.raises(DataError, match="1 of .* held-out documents also appear in the training split"):
        require_isolation(tampered)


def test_uniform_model_scores_log2_vocab_bits_per_token(data_dir):
    """A model with all-zero logits predicts uniformly: loss = ln(padded vocab) per token,
    and bpb = that loss / ln 2 scaled by tokens per byte."""
    from lmforge.data.tokenizer import Tokenizer

    vocab = Tokenizer.load(data_dir / "tokenizer.json").vocab_size
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    model = cfg.build()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = evaluate_heldout(model, data_dir, seq_len=32, max_tokens_per_domain=512, batch_size=4)
    assert set(result["bpb"]) == {"prose", "code"}
    padded = cfg.padded_vocab_size  # padding rows get zero logits too, so they share the mass
    for domain in result["bpb"]:
        assert result["loss"][domain] == pytest.approx(math.log(padded), rel=1e-5)
        expected_bpb = result["loss"][domain] * result["tokens"][domain] / (math.log(2) * result["bytes"][domain])
        assert result["bpb"][domain] == pytest.approx(expected_bpb)
        assert result["bytes"][domain] > result["tokens"][domain]  # BPE tokens span several bytes
