"""Image-text sequences of the multimodal family's continuous routes (``continuous``, ``encoder``).

An image is not tokens here: its ``patch_size`` x ``patch_size`` patches (pixels scaled to
[-1, 1]) are fed to the model beside the ids, and the ids hold one placeholder per patch::

    <begin-image> P P P P <row> P P P P <row> ... <end-image>      (a 4 x 4 grid of patches)

(:class:`PatchTokenLayout`: begin-image, end-image, row separator and patch placeholder follow the
text ids). Examples are one image and one of its captions, in either order::

    <begin-image> ... <end-image>  caption <eos>      (image -> text)
    caption  <begin-image> ... <end-image> <eos>      (text -> image: the caption as plain text)

Only text tokens (and end-of-text) are targets: image positions are never predicted.

Training rows (:class:`PatchSequenceLoader`) start with end-of-text and hold exactly
``examples_per_row`` whole examples, then padding (end-of-text ids, no targets), so every row
carries the same number of images — the batch's images are a dense float tensor [batch,
examples_per_row, patches, patch_dim] and the share of positions that are patches, hence the
FLOPs of the image side, is fixed by the config. Batch ``i`` is a pure function of ``(seed, i)``,
so a resumed run continues the exact stream. ``augment_shift`` shifts the images of image -> text
examples by up to s pixels, as on the discrete route (data/interleaved.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.image_steps import load_split
from lmforge.data.image_tokenizer import ImageMarkerLayout
from lmforge.data.interleaved import ImageExampleLoaderState, shift_image
from lmforge.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class PatchTokenLayout(ImageMarkerLayout):
    """Text ids [0, text_vocab), then begin-image, end-image, row separator, patch placeholder
    (the model side: ``MultimodalModelConfig.patch_token_id`` in nn/multimodal.py)."""

    @property
    def row_separator(self) -> int:
        return self.text_vocab + 2

    @property
    def patch(self) -> int:
        return self.text_vocab + 3

    @property
    def total(self) -> int:
        return self.text_vocab + 4

    def is_image_token(self, ids):  # numpy or torch
        """True for begin/end-image, row separators and patch placeholders (never targets)."""
        return ids >= self.text_vocab


def patchify(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 images [N, H, W(, C)] -> float32 [N, patches, patch_size * patch_size * C], patches row
    by row, pixels scaled to [-1, 1]."""
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    n, height, width, channels = pixels.shape
    if height % patch_size or width % patch_size:
        raise ConfigError(f"model.multimodal.patch_size ({patch_size}) must divide the image size {width}x{height}")
    grid = pixels.reshape(n, height // patch_size, patch_size, width // patch_size, patch_size, channels)
    patches = grid.transpose(0, 1, 3, 2, 4, 5).reshape(n, (height // patch_size) * (width // patch_size), -1)
    return patches.astype(np.float32) / 127.5 - 1.0


class PatchExamples:
    """One split's images (as patches) and tokenized captions."""

    def __init__(self, data_dir: str | Path, split: str, tokenizer: Tokenizer, patch_size: int):
        data = load_split(data_dir, split)
        self.pixels: np.ndarray = data["pixels"]
        self.labels: list[str | None] = data["labels"]
        self.caption_texts: list[list[str]] = data["captions"]
        self.captions = [[tokenizer.encode(c) for c in caps] for caps in self.caption_texts]
        self.layout, self.eos, self.patch_size = PatchTokenLayout(tokenizer.vocab_size), tokenizer.eos_id, patch_size
        height, width = self.pixels.shape[1:3]
        if height % patch_size or width % patch_size:
            raise ConfigError(f"model.multimodal.patch_size ({patch_size}) must divide the prepared images' size "
                              f"{width}x{height} ({data_dir})")
        self.grid = (height // patch_size, width // patch_size)
        self.patches = patchify(self.pixels, patch_size)
        row = [self.layout.patch] * self.grid[1] + [self.layout.row_separator]
        self._image_ids = [self.layout.begin_image, *(row * self.grid[0]), self.layout.end_image]

    predicts_images = False  # image positions are read, never targets

    def __len__(self) -> int:
        return len(self.pixels)

    def image_ids(self, index: int) -> list[int]:
        """begin-image, the placeholders row by row with a separator after each row, end-image
        (the same ids for every image: the pixels come in beside them)."""
        return list(self._image_ids)

    def example(self, index: int, caption: int, text_first: bool) -> list[int]:
        text = self.captions[index][caption] if self.captions[index] else []
        image = self.image_ids(index)
        return (text + image if text_first else image + text) + [self.eos]

    def model_inputs(self, images: list[int]) -> dict[str, torch.Tensor]:
        """The model's ``images`` argument for rows holding one image each (these indices)."""
        return {"images": torch.from_numpy(self.patches[images][:, None])}

    def shifted_patches(self, max_shift: int) -> np.ndarray:
        """float32 [(2*max_shift+1)**2, images, patches, patch_dim]: every image shifted by every
        (dy, dx) in [-max_shift, max_shift]^2 (row-major; the centre entry is unshifted)."""
        shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
        return np.stack([patchify(np.stack([shift_image(p, dy, dx) for p in self.pixels]), self.patch_size)
                         for dy, dx in shifts])


class PatchSequenceLoader(ImageExampleLoaderState):
    """``next_batch() -> (inputs, targets, images)`` (see the module doc)."""

    def __init__(self, examples: PatchExamples, seq_len: int, batch_size: int, seed: int, examples_per_row: int,
                 text_first_fraction: float = 0.0, rank: int = 0, world_size: int = 1, name: str = "images",
                 augment_shift: int = 0):
        if len(examples) == 0:
            raise DataError("no training images to draw from")
        longest = max(len(examples.example(i, c, False)) for i in range(len(examples))
                      for c in range(max(1, len(examples.captions[i]))))
        if 1 + examples_per_row * longest > seq_len + 1:
            raise ConfigError(f"model.multimodal.examples_per_row: {examples_per_row} examples of up to {longest} "
                              f"tokens do not fit a row of train.seq_len {seq_len} (+1): lower examples_per_row "
                              f"to {seq_len // longest} or raise train.seq_len to {examples_per_row * longest}")
        self.examples, self.seq_len, self.batch_size, self.seed = examples, seq_len, batch_size, seed
        self.examples_per_row, self.text_first_fraction = examples_per_row, text_first_fraction
        self.rank, self.world_size, self.name, self.augment_shift = rank, world_size, name, augment_shift
        self.shifted = examples.shifted_patches(augment_shift) if augment_shift else None
        self.batch_index = 0
        self.examples_drawn = 0
        self.tokens_available = int(sum(len(examples.example(i, 0, True)) for i in range(len(examples))))

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [seq_len + 1], scored [seq_len + 1] (whether the token is a target), patches [E, P, dim])."""
        ids, images = [self.examples.eos], []
        for _ in range(self.examples_per_row):
            index = int(rng.integers(len(self.examples)))
            caption = int(rng.integers(max(1, len(self.examples.captions[index]))))
            text_first = bool(rng.random() < self.text_first_fraction)
            patches = self.examples.patches[index]
            if self.shifted is not None and not text_first:
                patches = self.shifted[int(rng.integers(len(self.shifted))), index]
            ids += self.examples.example(index, caption, text_first)
            images.append(patches)
        used = len(ids)
        row = np.full(self.seq_len + 1, self.examples.eos, dtype=np.int64)
        row[:used] = ids
        scored = (np.arange(self.seq_len + 1) < used) & ~self.examples.layout.is_image_token(row)
        return row, scored, np.stack(images)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.batch_index])
        rows, scored, images = [], [], []
        for row_index in range(self.batch_size * self.world_size):  # every rank draws the global batch
            row, keep, patches = self._row(rng)
            self.examples_drawn += self.examples_per_row
            if self.rank * self.batch_size <= row_index < (self.rank + 1) * self.batch_size:
                rows.append(row)
                scored.append(keep)
                images.append(patches)
        self.batch_index += 1
        batch = torch.from_numpy(np.stack(rows))
        targets = batch[:, 1:].masked_fill(~torch.from_numpy(np.stack(scored))[:, 1:], -100)
        return batch[:, :-1].contiguous(), targets.contiguous(), torch.from_numpy(np.stack(images))
