"""The discrete image tokenizer: a k-means codebook over image patches, and the shared vocabulary.

An image of ``height x width`` pixels is cut into ``patch_size x patch_size`` patches (row by row);
each patch becomes the index of its nearest codebook vector, so an 8x8 digit with 2x2 patches is 16
tokens. The codebook is fitted with scikit-learn's MiniBatchKMeans on patches of the training split
only and saved beside the BPE tokenizer as ``image_tokenizer.json``. Decoding replaces each token
with its codebook vector, which is what makes the route generative in both directions.

In the model's vocabulary (:class:`ImageTokenLayout`) the text tokens come first, then
begin-image and end-image, then the codebook entries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_text
from lmforge.data.image_config import ImageTokenizerConfig

IMAGE_TOKENIZER_FILE = "image_tokenizer.json"   # in a prepared data directory, beside tokenizer.json
FORMAT = "lmforge-kmeans-patches-1"


@dataclass(frozen=True)
class ImageMarkerLayout:
    """Text ids [0, text_vocab), then begin-image and end-image: what every image route's
    vocabulary starts with (this module's codes, data/patch_sequences.py's patches)."""

    text_vocab: int

    @property
    def begin_image(self) -> int:
        return self.text_vocab

    @property
    def end_image(self) -> int:
        return self.text_vocab + 1


@dataclass(frozen=True)
class ImageTokenLayout(ImageMarkerLayout):
    """Where image tokens sit in the shared vocabulary: text ids [0, text_vocab), then
    begin-image, end-image, then ``codebook_size`` image codes."""

    codebook_size: int

    @property
    def image_offset(self) -> int:
        return self.text_vocab + 2

    @property
    def total(self) -> int:
        return self.text_vocab + 2 + self.codebook_size

    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(codes, dtype=np.int64) + self.image_offset

    def codes(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ((ids < self.image_offset) | (ids >= self.total)).any():
            raise ValueError("ids outside the image codes")
        return ids - self.image_offset

    def is_image_token(self, ids):  # numpy or torch
        """True for begin/end-image and image codes (the tokens scored as 'image')."""
        return ids >= self.text_vocab


class ImageTokenizer:
    """Patches <-> codebook indices for images of one size and mode."""

    def __init__(self, codebook: np.ndarray, patch_size: int, width: int, height: int, mode: str):
        if width % patch_size or height % patch_size:
            raise DataError(f"image size {width}x{height} is not a multiple of image_tokenizer.patch_size "
                            f"({patch_size})")
        channels = 3 if mode == "RGB" else 1
        if codebook.ndim != 2 or codebook.shape[1] != patch_size * patch_size * channels:
            raise DataError(f"codebook of shape {codebook.shape} does not fit {patch_size}x{patch_size} {mode} patches")
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.patch_size, self.width, self.height, self.mode = patch_size, width, height, mode
        self.channels = channels

    @property
    def codebook_size(self) -> int:
        return len(self.codebook)

    @property
    def tokens_per_image(self) -> int:
        return (self.width // self.patch_size) * (self.height // self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return self.height // self.patch_size, self.width // self.patch_size

    def patches(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W(, 3)] -> float32 [N, tokens_per_image, patch values] in [0, 1]."""
        images = np.asarray(images)
        if images.ndim == 2 + (self.channels == 3):
            images = images[None]
        expected = (self.height, self.width) + ((3,) if self.channels == 3 else ())
        if images.shape[1:] != expected:
            raise DataError(f"images of shape {images.shape[1:]} given to an image tokenizer for {expected}")
        n, p = len(images), self.patch_size
        rows, cols = self.grid
        x = images.reshape(n, rows, p, cols, p, self.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, rows * cols, p * p * self.channels).astype(np.float32) / 255.0

    def encode(self, images: np.ndarray) -> np.ndarray:
        """int64 [N, tokens_per_image]: the nearest codebook entry of each patch."""
        patches = self.patches(images)
        flat = patches.reshape(-1, patches.shape[-1])
        # squared distances ||x||^2 - 2 x.c + ||c||^2, in blocks to bound memory
        norms = (self.codebook ** 2).sum(axis=1)
        codes = np.empty(len(flat), dtype=np.int64)
        for start in range(0, len(flat), 65536):
            block = flat[start:start + 65536]
            codes[start:start + 65536] = (norms[None, :] - 2.0 * block @ self.codebook.T).argmin(axis=1)
        return codes.reshape(patches.shape[:2])

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W(, 3)] from codes [N, tokens_per_image] (or one image's codes)."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim == 1:
            codes = codes[None]
        if codes.shape[1] != self.tokens_per_image or (codes < 0).any() or (codes >= self.codebook_size).any():
            raise ValueError(f"expected codes [N, {self.tokens_per_image}] in [0, {self.codebook_size}), "
                             f"got shape {list(codes.shape)}")
        n, p = len(codes), self.patch_size
        rows, cols = self.grid
        x = self.codebook[codes].reshape(n, rows, cols, p, p, self.channels).transpose(0, 1, 3, 2, 4, 5)
        images = np.clip(np.rint(x.reshape(n, self.height, self.width, self.channels) * 255.0), 0, 255)
        images = images.astype(np.uint8)
        return images[..., 0] if self.channels == 1 else images

    def reconstruction_error(self, images: np.ndarray) -> float:
        """Mean squared error of encode + decode (before rounding to 8 bits) as a fraction of the
        pixel variance of ``images``: 0 is perfect, 1 is as bad as predicting the mean pixel."""
        patches = self.patches(images)
        rebuilt = self.codebook[self.encode(images)]
        variance = float(patches.var())
        return float(((rebuilt - patches) ** 2).mean() / variance) if variance > 0 else 0.0

    @classmethod
    def train(cls, images: np.ndarray, cfg: ImageTokenizerConfig) -> "ImageTokenizer":
        """Fit the codebook on patches of ``images`` (the training split) with MiniBatchKMeans."""
        from sklearn.cluster import MiniBatchKMeans

        images = np.asarray(images)
        mode = "RGB" if images.ndim == 4 else "L"
        height, width = images.shape[1:3]
        probe = cls(np.zeros((1, cfg.patch_size ** 2 * (3 if mode == "RGB" else 1)), np.float32),
                    cfg.patch_size, width, height, mode)
        patches = probe.patches(images).reshape(-1, probe.codebook.shape[1])
        if len(patches) > cfg.max_patches:
            rng = np.random.default_rng(cfg.seed)
            patches = patches[rng.choice(len(patches), cfg.max_patches, replace=False)]
        distinct = len(np.unique(patches, axis=0))
        if distinct < cfg.codebook_size:
            raise DataError(f"data.image_tokenizer.codebook_size ({cfg.codebook_size}) exceeds the {distinct} distinct "
                            "patches of the training images; lower it")
        kmeans = MiniBatchKMeans(n_clusters=cfg.codebook_size, batch_size=4096, n_init=cfg.n_init,
                                 random_state=cfg.seed).fit(patches)
        return cls(kmeans.cluster_centers_.astype(np.float32), cfg.patch_size, width, height, mode)

    # ---- files ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "patch_size": self.patch_size, "width": self.width,
                           "height": self.height, "mode": self.mode,
                           "codebook": [[round(float(v), 6) for v in row] for row in self.codebook]})

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "ImageTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / IMAGE_TOKENIZER_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: no image tokenizer (prepare the data with the image_tokenizer step)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable image tokenizer ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{path}: not an image tokenizer of format {FORMAT}")
        return cls(np.asarray(data["codebook"], dtype=np.float32), int(data["patch_size"]), int(data["width"]),
                   int(data["height"]), str(data["mode"]))
