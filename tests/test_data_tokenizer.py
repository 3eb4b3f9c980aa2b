"""Byte-level BPE tokenizer: round trips, byte lengths per token, save/load identity."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from lmforge.core.errors import DataError
from lmforge.data.tokenizer import EOS, Tokenizer, bytes_to_unicode

TEXTS = ["The quick brown fox jumps over the lazy dog.\n", "naïve café — déjà vu, 東京 🙂\n",
         "def f(x):\n    return x * 2\n"] * 30


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(iter(TEXTS), vocab_size=320)


def test_byte_table_matches_bytelevel_alphabet():
    assert sorted(bytes_to_unicode().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", ["naïve café — déjà vu", "unseen: Ωμέγα ßtraße 😀 ąę", "plain ascii", "\t\n  x"])
def test_byte_lengths_sum_to_utf8_length(tok, text):
    ids = tok.encode(text)
    lengths = tok.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (tok.vocab_size,)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_eos_is_special_and_zero_bytes(tok):
    assert tok.token_byte_lengths()[tok.eos_id] == 0
    assert tok.decode(tok.encode("a") + [tok.eos_id]) == "a"
    # A document containing the marker's text cannot inject an eos token.
    assert tok.eos_id not in tok.encode(f"x {EOS} y")


def test_save_load_same_sha_and_encoding(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == tok.vocab_size == 320
    assert loaded.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")


def test_batch_encoding_cuts_texts_without_changing_tokens(tok):
    """encode_batch cuts long texts at line starts (for speed); the ids must equal encoding whole."""
    import random

    rng = random.Random(0)
    pieces = ["word", " ", "\n", "\n\n", "  ", "\t", "x=1;", "naïve", "東京", EOS, "\r\n", "  indented", "'s", "42"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    texts += ["a\nb", "a\n b", "a \nb", "a\n\nb", "\nb", "a\n", "", EOS + "\n" + EOS]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
