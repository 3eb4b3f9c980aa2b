"""Training batches of interleaved image-text sequences for the multimodal family.

Each example is one image and one of its captions, in either order::

    caption  <begin-image> code code ... code <end-image> <eos>     (text -> image)
    <begin-image> code ... code <end-image>  caption  <eos>         (image -> text)

Rows of ``seq_len + 1`` tokens start with end-of-text and pack examples drawn at random (image,
caption and order), the last one cut at the row's end. Batch ``i`` is a pure function of
``(seed, i)``, so a resumed run continues the exact stream, and each rank keeps its slice of the
global batch.

Two training options (``model.multimodal``):

- ``augment_shift`` = s > 0: the image of each image -> text example is shifted by (dy, dx), each
  uniform in [-s, s], *before* tokenization: the shifted pixels (the uncovered border filled with
  the image's darkest value) are encoded by the same codebook. The shifted codes are computed once,
  for every image and shift, when the loader is built. Images the model learns to *write* (text ->
  image) stay unshifted: trained on shifted targets, the model generates shifted digits
  (docs/multimodal.md measures it).
- ``image_loss_weight`` = w < 1: each image-token target (begin/end-image included) is scored with
  probability w, otherwise ignored (-100), so image tokens weigh w in the expected summed loss
  against text tokens' 1. The trainer's loss is the mean over scored tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.core.errors import DataError
from lmforge.data.image_steps import load_split
from lmforge.data.image_tokenizer import ImageTokenLayout
from lmforge.data.loader import windows_to_batch
from lmforge.data.tokenizer import Tokenizer


def shift_image(pixels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """One image [H, W(, C)] moved down by ``dy`` and right by ``dx`` pixels (negative: up, left);
    the uncovered border takes the image's darkest value."""
    height, width = pixels.shape[:2]
    out = np.full_like(pixels, pixels.min())
    if abs(dy) >= height or abs(dx) >= width:
        return out
    source = pixels[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
    out[max(0, dy):max(0, dy) + source.shape[0], max(0, dx):max(0, dx) + source.shape[1]] = source
    return out


class ImageTextExamples:
    """One split's images (as codes) and tokenized captions."""

    def __init__(self, data_dir: str | Path, split: str, tokenizer: Tokenizer, layout: ImageTokenLayout):
        data = load_split(data_dir, split)
        self.codes: np.ndarray = data["codes"].astype(np.int64)
        self.pixels: np.ndarray = data["pixels"]
        self.labels: list[str | None] = data["labels"]
        self.caption_texts: list[list[str]] = data["captions"]
        self.captions = [[tokenizer.encode(c) for c in caps] for caps in self.caption_texts]
        self.layout, self.eos = layout, tokenizer.eos_id
        if len(self.codes) and int(self.codes.max()) >= layout.codebook_size:
            raise DataError(f"{data_dir}: image codes up to {int(self.codes.max())} exceed the codebook "
                            f"({layout.codebook_size} entries)")

    predicts_images = True  # image tokens are targets too (the discrete route writes images)

    def __len__(self) -> int:
        return len(self.codes)

    def model_inputs(self, images: list[int]) -> dict[str, Any]:
        """Extra model arguments for rows holding these images: none, the codes are in the ids."""
        return {}

    def image_ids(self, index: int) -> list[int]:
        """begin-image, the image's codes as vocabulary ids, end-image."""
        return [self.layout.begin_image, *self.layout.image_ids(self.codes[index]).tolist(), self.layout.end_image]

    def example(self, index: int, caption: int, text_first: bool, codes: np.ndarray | None = None) -> list[int]:
        """The example's ids; ``codes`` replaces the image's own (e.g. a shifted copy's)."""
        text = self.captions[index][caption] if self.captions[index] else []
        image = self.image_ids(index) if codes is None else [
            self.layout.begin_image, *self.layout.image_ids(codes).tolist(), self.layout.end_image]
        return (text + image if text_first else image + text) + [self.eos]

    def shifted_codes(self, image_tokenizer: Any, max_shift: int) -> np.ndarray:
        """int64 [(2*max_shift+1)**2, images, tokens_per_image]: every image shifted by every
        (dy, dx) in [-max_shift, max_shift]^2 (row-major; the centre entry is unshifted), encoded."""
        shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
        return np.stack([image_tokenizer.encode(np.stack([shift_image(p, dy, dx) for p in self.pixels]))
                         for dy, dx in shifts]).astype(np.int64)


class ImageExampleLoaderState:
    """What the trainer and the run's warnings read from an image-example loader, and its resumable
    position; shared by this module's loader and the patch routes' (data/patch_sequences.py).
    Subclasses set ``name``, ``examples``, ``tokens_available``, ``seed``, ``batch_index`` and
    ``examples_drawn``."""

    name: str
    examples: Any
    tokens_available: int
    seed: int
    batch_index: int
    examples_drawn: int

    def source_tokens(self) -> dict[str, int]:
        return {self.name: self.tokens_available}

    def weights(self) -> dict[str, float]:
        return {self.name: 1.0}

    def epochs_consumed(self) -> dict[str, float]:
        return {self.name: self.examples_drawn / len(self.examples)}

    def tokens_drawn(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "examples_drawn": self.examples_drawn, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_index = int(state["batch_index"])
        self.examples_drawn = int(state.get("examples_drawn", 0))


class InterleavedLoader(ImageExampleLoaderState):
    """``next_batch() -> (inputs, targets)``, LongTensors [batch_size, seq_len] (see the module doc)."""

    def __init__(self, examples: ImageTextExamples, seq_len: int, batch_size: int, seed: int,
                 text_first_fraction: float = 0.5, rank: int = 0, world_size: int = 1, name: str = "images",
                 augment_shift: int = 0, image_tokenizer: Any = None, image_loss_weight: float = 1.0):
        if len(examples) == 0:
            raise DataError("no training images to draw from")
        if augment_shift and image_tokenizer is None:
            raise ValueError("augment_shift needs the image tokenizer to encode the shifted images")
        self.augment_shift, self.image_loss_weight = augment_shift, image_loss_weight
        self.shifted = examples.shifted_codes(image_tokenizer, augment_shift) if augment_shift else None
        self.examples, self.seq_len, self.batch_size, self.seed = examples, seq_len, batch_size, seed
        self.text_first_fraction, self.rank, self.world_size, self.name = text_first_fraction, rank, world_size, name
        self.batch_index = 0
        self.examples_drawn = 0
        lengths = [len(examples.example(i, 0, True)) for i in range(len(examples))]
        self.tokens_available = int(sum(lengths))

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        row, drawn = [self.examples.eos], 0
        while len(row) < self.seq_len + 1:
            index = int(rng.integers(len(self.examples)))
            caption = int(rng.integers(max(1, len(self.examples.captions[index]))))
            text_first = bool(rng.random() < self.text_first_fraction)
            codes = None
            if self.shifted is not None and not text_first:  # only images that are read, never ones to write
                codes = self.shifted[int(rng.integers(len(self.shifted))), index]
            row += self.examples.example(index, caption, text_first, codes)
            drawn += 1
        return np.asarray(row[: self.seq_len + 1], dtype=np.int64), drawn

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.batch_index])
        rows = []
        for row_index in range(self.batch_size * self.world_size):  # every rank draws the global batch
            row, drawn = self._row(rng)
            self.examples_drawn += drawn
            if self.rank * self.batch_size <= row_index < (self.rank + 1) * self.batch_size:
                rows.append(row)
        self.batch_index += 1
        inputs, targets = windows_to_batch(rows)
        if self.image_loss_weight < 1.0:
            # one draw per global-batch token, so every rank masks its slice as a single rank would
            keep = rng.random((self.batch_size * self.world_size, self.seq_len))
            keep = torch.from_numpy(keep[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
            dropped = self.examples.layout.is_image_token(targets) & (keep >= self.image_loss_weight)
            targets = targets.masked_fill(dropped, -100)
        return inputs, targets
