"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained on the training split only.

Byte-level means every string is encodable (no unknown token) and every token id stands
for an exact byte string, which is what makes bits-per-byte comparable across tokenizers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_text

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # in a prepared data directory
# Where a text can be cut without changing its tokens: after a newline that follows a
# non-space and before a non-space. The byte-level pre-tokenizer (GPT-2's regex) always
# ends a pre-token there (the newline is a piece of its own either way), and BPE never
# merges across pre-tokens, so encoding the pieces and joining the ids is exactly
# encoding the whole. It is much faster: the Rust side handles a megabyte-long string
# far more slowly than the same text as many lines (1.7x on the demo corpus).
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet ByteLevel BPE tokens are spelled in.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to
    code points 256+ so no token contains whitespace or control characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


class Tokenizer:
    """A thin wrapper: train, save/load, encode/decode, and per-token byte lengths."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        self._tok = hf_tokenizer
        # Text that happens to contain "<|endoftext|>" is encoded as plain bytes, so a
        # document can never inject an end-of-document marker into the token stream.
        self._tok.encode_special_tokens = True
        eos_id = self._tok.token_to_id(EOS)
        if eos_id is None:
            raise DataError(f"tokenizer has no {EOS} token")
        self._eos_id = eos_id
        pre = json.loads(self._tok.to_str()).get("pre_tokenizer") or {}
        # Cutting at _SAFE_CUT is exact only for the byte-level regex without a prefix space.
        self._cuttable = (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
                          and pre.get("use_regex", True))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: int | None = None) -> "Tokenizer":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
            # All 256 bytes from the start, so any text is encodable even if unseen.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the Rust side raises plain Exception on bad JSON
            raise DataError(f"{path}: not a valid tokenizer file ({exc})") from exc

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    def to_json(self) -> str:
        return self._tok.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self._cuttable:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            cut = _SAFE_CUT.split(text)
            pieces += cut
            counts.append(len(cut))
        encoded = self._tok.encode_batch(pieces, add_special_tokens=False)
        out, start = [], 0
        for count in counts:
            ids: list[int] = []
            for e in encoded[start:start + count]:
                ids += e.ids
            out.append(ids)
            start += count
        return out

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens (eos) stand for no bytes, so they decode to nothing.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """:meth:`decode` of many id sequences in one call (the tokenizers library's batch decode)."""
        return self._tok.decode_batch([[int(i) for i in row] for row in rows], skip_special_tokens=True)

    def token_byte_lengths(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes each token id stands for (0 for special tokens)."""
        char_to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tok.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if any(ch not in char_to_byte for ch in token):
                raise DataError(f"token {index} ({token!r}) is not in the byte-level alphabet")
            lengths[index] = len(token)  # one alphabet character per byte
        return lengths


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer a path names: a prepared data directory's tokenizer.json, or the file itself."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def require_same_tokenizer(*paths: str | Path) -> str:
    """The sha256 the tokenizers at ``paths`` (files or prepared data directories) share; a
    DataError naming the first that differs from the first path's, with both sha256s.

    For training on several data directories at once (replay of a parent's data next to new
    data): token ids mean the same thing only under one tokenizer. The sha256 is
    :attr:`Tokenizer.sha256`, the one a manifest records.
    """
    if not paths:
        raise ValueError("require_same_tokenizer needs at least one path")
    first = tokenizer_file(paths[0])
    expected = Tokenizer.load(first).sha256
    for path in paths[1:]:
        other = tokenizer_file(path)
        found = Tokenizer.load(other).sha256
        if found != expected:
            raise DataError(f"{other} (sha256 {found}) is another tokenizer than {first} (sha256 {expected}); "
                            "data tokenized with different tokenizers cannot be mixed (prepare the new data "
                            "with data.tokenizer_from)")
    return expected


def same_tokenizer(a: str | Path, b: str | Path) -> bool:
    """True when the tokenizers at ``a`` and ``b`` (files or prepared data directories) are the same."""
    return Tokenizer.load(tokenizer_file(a)).sha256 == Tokenizer.load(tokenizer_file(b)).sha256
