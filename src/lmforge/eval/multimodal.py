"""Held-out evaluation of a multimodal model of any route, from its config and prepared data.

Used by the family's evaluator during training (train/multimodal_family.py) and by
``lmforge eval RUN`` on a finished run: loss by modality (and of the caption after the image) and
caption accuracy on the held-out images (eval/captions.py). Image generation belongs to the
discrete route only and is run by the trainer's end-of-run evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.data.image_tokenizer import IMAGE_TOKENIZER_FILE, ImageTokenizer, ImageTokenLayout
from lmforge.data.interleaved import ImageTextExamples
from lmforge.data.patch_sequences import PatchExamples
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.captions import caption_accuracy, confusion_lines, modality_losses
from lmforge.nn.multimodal import MultimodalModelConfig, MultimodalSettings


def split_examples(cfg: MultimodalModelConfig, data_dir: Path, split: str, tokenizer: Tokenizer,
                   image_tokenizer: ImageTokenizer | None = None) -> ImageTextExamples | PatchExamples:
    """One split's images as the model's route reads them: codebook tokens (discrete) or patches."""
    if cfg.multimodal.route != "discrete":
        return PatchExamples(data_dir, split, tokenizer, cfg.multimodal.patch_size)
    if image_tokenizer is None:
        image_tokenizer = load_image_tokenizer_for(cfg, data_dir)
    return ImageTextExamples(data_dir, split, tokenizer, ImageTokenLayout(tokenizer.vocab_size,
                                                                          image_tokenizer.codebook_size))


def load_image_tokenizer_for(cfg: MultimodalModelConfig, data_dir: Path) -> ImageTokenizer:
    """The discrete route's codebook from the prepared data, checked against the model."""
    image_tokenizer = ImageTokenizer.load(data_dir / IMAGE_TOKENIZER_FILE)
    if image_tokenizer.codebook_size != cfg.multimodal.codebook_size:
        raise ConfigError(f"model.multimodal.codebook_size ({cfg.multimodal.codebook_size}) differs from "
                          f"{data_dir / IMAGE_TOKENIZER_FILE} ({image_tokenizer.codebook_size} entries)")
    return image_tokenizer


def multimodal_evaluation(model: nn.Module, heldout: ImageTextExamples | PatchExamples, tokenizer: Tokenizer,
                          settings: MultimodalSettings, device: torch.device, max_images: int | None) -> dict[str, Any]:
    """Held-out loss by modality (and MoE load by modality) and caption accuracy."""
    result = modality_losses(model, heldout, device, max_images)
    result["route"] = settings.route
    captions = caption_accuracy(model, heldout, tokenizer, settings.caption_template, device, max_images)
    if captions is not None:
        result["caption_accuracy"] = captions["accuracy"]
        result["captions"] = captions
    return result


def evaluate_run_multimodal(model: nn.Module, cfg: MultimodalModelConfig, data_dir: Path, tokenizer: Tokenizer,
                            device: torch.device, max_images: int | None = None) -> dict[str, Any]:
    """``lmforge eval``'s multimodal record: every held-out image unless ``max_images``."""
    heldout = split_examples(cfg, data_dir, "heldout", tokenizer)
    if len(heldout) == 0:
        raise ConfigError(f"{data_dir}: no held-out images to evaluate the multimodal model on")
    return multimodal_evaluation(model, heldout, tokenizer, cfg.multimodal, device, max_images)


def describe_multimodal(record: dict[str, Any]) -> list[str]:
    """Human-readable lines of a multimodal record (``lmforge eval``)."""
    image = record.get("bits_per_token_image")
    lines = [f"multimodal ({record.get('route', 'discrete')} route), {record['images']} held-out images: bits/token "
             f"text {record['bits_per_token_text']:.3f}, caption after image {record['bits_per_token_caption']:.3f}, "
             f"image {'n/a (not predicted on this route)' if image is None else f'{image:.3f}'}"]
    if "captions" in record:
        lines.append(f"caption accuracy {record['caption_accuracy']:.3f} on {record['captions']['images']} images "
                     f"(chance {record['captions']['chance']:.2f}); confusion (rows true, columns predicted):")
        lines += ["  " + line for line in confusion_lines(record["captions"])]
    return lines
