"""Settings of image data: how a source's images are decoded, and the image tokenizer's codebook.

``SourceConfig.image`` (:class:`ImageSourceConfig`) belongs to sources of the image kinds
(``image_folder``, ``image_parquet``, ``image_hf``, ``demo_digits``; data/images.py);
``DataConfig.image_tokenizer`` (:class:`ImageTokenizerConfig`) to a preparation whose steps
include ``image_tokenizer`` (data/image_steps.py). See docs/multimodal.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.core.config import Config, FieldValueError

IMAGE_SOURCE_KINDS = ("image_folder", "image_parquet", "image_hf", "demo_digits")


@dataclass
class ImageSourceConfig(Config):
    """How the images of one source are decoded (Pillow) and normalised before anything sees them."""

    size: list[int] = field(default_factory=lambda: [8, 8])   # [width, height] after resizing
    mode: Literal["L", "RGB"] = "L"                            # grey levels or colour
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    autocontrast: bool = False        # stretch each image's grey levels to 0..255 (PIL ImageOps.autocontrast)
    image_field: str = "image"        # image_folder: the captions file's key naming the image file;
                                      # image_parquet / image_hf: the column holding the image
    captions_file: str = "captions.jsonl"  # image_folder: the captions file, relative to the folder
    label_field: str | None = None    # optional class label per record (caption accuracy, generation eval)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or not all(1 <= s <= 4096 for s in self.size):
            raise FieldValueError("size", f"must be [width, height], each in 1..4096, got {self.size}")


@dataclass
class ImageTokenizerConfig(Config):
    """A k-means codebook over image patches (scikit-learn MiniBatchKMeans), trained on the
    training split only: each ``patch_size`` x ``patch_size`` patch becomes one of
    ``codebook_size`` tokens."""

    patch_size: int = 2
    codebook_size: int = 128
    max_patches: int = 200_000   # training patches sampled for k-means (all if fewer)
    n_init: int = 3              # k-means restarts; the best (lowest inertia) is kept
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise FieldValueError("patch_size", f"must be >= 1, got {self.patch_size}")
        if not 2 <= self.codebook_size <= 65536:
            raise FieldValueError("codebook_size", f"must be in 2..65536, got {self.codebook_size}")
        if self.max_patches < self.codebook_size:
            raise FieldValueError("max_patches", f"must be >= codebook_size ({self.codebook_size}), "
                                                 f"got {self.max_patches}")
        if self.n_init < 1:
            raise FieldValueError("n_init", f"must be >= 1, got {self.n_init}")
