"""The multimodal model family's network: a decoder over text and image tokens in one vocabulary.

Early fusion, discrete route (Chameleon-style): images are tokens of a learned codebook
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


@dataclass
class MultimodalSettings(Config):
    route: Literal["discrete"] = "discrete"   # images as codebook tokens (the only route built so far)
    codebook_size: int = 0                    # image codes; set by the run from data.image_tokenizer
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
        """Text tokens + begin/end-image + image codes: the ids the model reads and predicts."""
        return self.vocab_size + 2 + self.multimodal.codebook_size

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
