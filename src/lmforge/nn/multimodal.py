"""The multimodal model family's network: a decoder over text and images, by one of three routes.

``model.multimodal.route``:

- ``discrete`` (early fusion, Chameleon-style; below): images are tokens of a learned codebook.
- ``continuous`` (early fusion, Fuyu-style): each image patch is linearly projected straight into
  the decoder, with image-row separator tokens; loss on text tokens only (nn/patch_input.py).
- ``encoder`` (late fusion, the baseline): the patches first pass a small bidirectional
  Transformer encoder whose outputs are projected into the decoder at the same positions
  (nn/patch_input.py). Early and late fusion are compared at matched FLOPs in docs/multimodal.md.

Discrete route: images are tokens of a learned codebook
(data/image_tokenizer.py), appended to the text vocabulary after begin-image and end-image, so the
network is the plain Transformer (dense or mixture-of-experts) over the extended vocabulary —
``vocab_size`` stays the text tokenizer's, and ``multimodal.codebook_size`` (copied from
``data.image_tokenizer.codebook_size`` by the run) adds ``codebook_size + 2`` rows. The same
model reads images (captioning) and writes them (generation).

Id layout: text ids [0, vocab_size), begin-image = vocab_size, end-image = vocab_size + 1, image
code k = vocab_size + 2 + k (``lmforge.data.image_tokenizer.ImageTokenLayout``, which the layers
above use; this module, below the data layer, only needs the count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.core.config import Config, FieldValueError
from lmforge.nn.config import ModelConfig
from lmforge.nn.generation import sample_next
from lmforge.nn.transformer import KVCache, Transformer

ROUTES = ("discrete", "continuous", "encoder")
# Continuous / encoder routes: begin-image, end-image, row separator, patch placeholder, after the
# text ids (the same order as lmforge.data.patch_sequences.PatchTokenLayout).
PATCH_ROUTE_EXTRA_TOKENS = 4


@dataclass
class ImageEncoderSettings(Config):
    """The late-fusion route's image encoder: a bidirectional Transformer over one image's patches
    (learned patch positions), its outputs projected to the decoder's width."""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None     # SwiGLU hidden size; None -> 8/3 d_model rounded up to a multiple of 64

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "n_heads"):
            if getattr(self, key) < 1:
                raise FieldValueError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise FieldValueError("d_model", f"({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_ff is not None and self.d_ff < 1:
            raise FieldValueError("d_ff", f"must be >= 1, got {self.d_ff}")

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else math.ceil(8 * self.d_model / 3 / 64) * 64


@dataclass
class MultimodalSettings(Config):
    # discrete: codebook tokens (early fusion); continuous: patches linearly projected into the
    # decoder (early fusion); encoder: patches through a small image encoder first (late fusion)
    route: Literal["discrete", "continuous", "encoder"] = "discrete"
    codebook_size: int = 0                    # discrete: image codes; set by the run from data.image_tokenizer
    # continuous / encoder routes (nn/patch_input.py, data/patch_sequences.py):
    patch_size: int = 2                       # pixels per patch side; a patch is one decoder position
    image_size: list[int] = field(default_factory=list)  # [width, height]; set by the run from the image sources
    image_channels: int = 0                   # 1 (L) or 3 (RGB); set by the run from the image sources
    examples_per_row: int = 4                 # whole image-caption examples packed per training row (rest padded)
    encoder: ImageEncoderSettings = field(default_factory=ImageEncoderSettings)  # the encoder route's encoder
    # Training sequences: the share with the caption first (text -> image); the rest image first.
    text_first_fraction: float = 0.5
    # Training options (data/interleaved.py): shift each drawn training image by up to this many
    # pixels in each direction before tokenization (0: off); score each image-token target with
    # this probability, so image tokens weigh this much against text tokens in the expected loss.
    augment_shift: int = 0
    image_loss_weight: float = 1.0
    # Evaluation of the family (train/multimodal_family.py, eval/captions.py). Held-out images with a
    # label are captioned by likelihood among the labels' captions, and images are generated from them.
    caption_template: str = "a handwritten digit {label}"   # the prompt / candidate caption of a label
    eval_max_images: int = 1000          # held-out images scored in each periodic evaluation
    images_per_label: int = 100          # generated per label at the end of the run
    generation_temperature: float = 1.0
    generation_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise FieldValueError("route", f"must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if self.route != "discrete" and self.image_loss_weight != 1.0:
            raise FieldValueError("image_loss_weight", f"weighs image-token targets of the discrete route; route "
                                  f"{self.route!r} has no image loss (loss on text tokens only)")
        if self.patch_size < 1 or self.examples_per_row < 1:
            raise FieldValueError("patch_size" if self.patch_size < 1 else "examples_per_row",
                                  f"must be >= 1, got {self.patch_size if self.patch_size < 1 else self.examples_per_row}")
        if self.image_size:
            if len(self.image_size) != 2 or any(side % self.patch_size for side in self.image_size):
                raise FieldValueError("patch_size", f"({self.patch_size}) must divide the image size "
                                      f"[width, height] = {self.image_size}")
        if self.image_channels not in (0, 1, 3):
            raise FieldValueError("image_channels", f"must be 1 (L) or 3 (RGB), got {self.image_channels}")
        if self.codebook_size < 0:
            raise FieldValueError("codebook_size", f"must be >= 0, got {self.codebook_size}")
        if not 0.0 <= self.text_first_fraction <= 1.0:
            raise FieldValueError("text_first_fraction", f"must be in [0, 1], got {self.text_first_fraction}")
        if self.augment_shift < 0:
            raise FieldValueError("augment_shift", f"must be >= 0 pixels, got {self.augment_shift}")
        if not 0.0 < self.image_loss_weight <= 1.0:
            raise FieldValueError("image_loss_weight", f"must be in (0, 1], got {self.image_loss_weight}")
        if "{label}" not in self.caption_template:
            raise FieldValueError("caption_template", f"must contain '{{label}}', got {self.caption_template!r}")
        for key in ("eval_max_images", "images_per_label"):
            if getattr(self, key) < 0:
                raise FieldValueError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.generation_temperature < 0:
            raise FieldValueError("generation_temperature", f"must be >= 0, got {self.generation_temperature}")


@dataclass
class MultimodalModelConfig(ModelConfig):
    family: str = "multimodal"
    multimodal: MultimodalSettings = field(default_factory=MultimodalSettings)

    @property
    def total_vocab_size(self) -> int:
        """Discrete route: text tokens + begin/end-image + image codes, the ids the model reads and
        predicts. Continuous / encoder routes: text tokens + begin-image, end-image, row separator and
        the patch placeholder (``lmforge.data.patch_sequences.PatchTokenLayout``)."""
        if self.multimodal.route == "discrete":
            return self.vocab_size + 2 + self.multimodal.codebook_size
        return self.vocab_size + PATCH_ROUTE_EXTRA_TOKENS

    @property
    def patch_token_id(self) -> int:
        """The placeholder id whose embedding the projected patch is added to (continuous / encoder)."""
        return self.vocab_size + PATCH_ROUTE_EXTRA_TOKENS - 1

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches of one image (continuous / encoder routes)."""
        if not self.multimodal.image_size or not self.multimodal.image_channels:
            raise ValueError("model.multimodal.image_size / image_channels are unset: the run sets them from the "
                             "data's image sources")
        width, height = self.multimodal.image_size
        return height // self.multimodal.patch_size, width // self.multimodal.patch_size

    @property
    def patch_dim(self) -> int:
        return self.multimodal.patch_size ** 2 * self.multimodal.image_channels

    def build(self) -> Transformer:  # type: ignore[override]
        if self.multimodal.route == "discrete":
            return Transformer(self)
        from lmforge.nn.patch_input import PatchInputTransformer

        return PatchInputTransformer(self)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.total_vocab_size / self.pad_vocab_to_multiple) * self.pad_vocab_to_multiple


@torch.no_grad()
def generate_in_range(model: Transformer, prompt_ids: torch.Tensor, n_tokens: int, low: int, high: int,
                      temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, n_tokens] ids sampled after ``prompt_ids``, each restricted to [low, high) (e.g. the
    image codes, so an image is always ``tokens_per_image`` codes). The prompt plus the tokens must
    fit the model's context."""
    if prompt_ids.shape[1] + n_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {prompt_ids.shape[1]} tokens + {n_tokens} new ones exceed max_seq_len "
                         f"{model.cfg.max_seq_len}")
    cache = KVCache(model, batch=prompt_ids.shape[0], max_len=model.cfg.max_seq_len)
    logits = model(prompt_ids, kv_cache=cache).logits[:, -1]
    out = []
    for step in range(n_tokens):
        next_id = sample_next(logits[:, low:high], temperature, top_k, generator) + low
        out.append(next_id)
        if step < n_tokens - 1:
            logits = model(next_id, kv_cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
