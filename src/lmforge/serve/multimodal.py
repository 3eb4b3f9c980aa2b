"""Inference for multimodal models of the discrete route: text after an image, an image after text.

The image tokenizer is the one the run's data was prepared with: ``image_tokenizer.json`` of the
data directory named in the checkpoint's config (relative paths resolved against the working
directory the checkpoint was written from), checked against the model's codebook size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import read_json
from lmforge.data.image_config import ImageSourceConfig
from lmforge.data.image_tokenizer import IMAGE_TOKENIZER_FILE, ImageTokenizer, ImageTokenLayout
from lmforge.data.images import decode_image
from lmforge.data.sources import InputProblems
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.multimodal import generate_in_range


def _multimodal_model_config(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model") or {}
    if model.get("family") != "multimodal":
        raise ConfigError(f"images need a model of family 'multimodal'; this checkpoint's is "
                          f"{model.get('family', 'transformer')!r}")
    return model


def load_image_tokenizer(checkpoint: Path, config: dict[str, Any]) -> tuple[ImageTokenizer, ImageTokenLayout]:
    """The image tokenizer of a multimodal checkpoint and its place in the model's vocabulary."""
    model = _multimodal_model_config(config)
    out_dir = Path(str((config.get("data") or {}).get("out_dir", "")))
    candidates = [checkpoint / IMAGE_TOKENIZER_FILE, out_dir / IMAGE_TOKENIZER_FILE]
    manifest = checkpoint / "manifest.json"
    if not out_dir.is_absolute() and manifest.is_file():
        working_dir = read_json(manifest).get("working_dir")  # recorded by the checkpoint writer
        if working_dir:
            candidates.append(Path(working_dir) / out_dir / IMAGE_TOKENIZER_FILE)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise DataError(f"{checkpoint}: no image tokenizer found (looked at {', '.join(map(str, candidates))}); "
                        "prepare the run's data again (lmforge data prepare CONFIG)")
    image_tokenizer = ImageTokenizer.load(found)
    codebook_size = int((model.get("multimodal") or {}).get("codebook_size", 0))
    if image_tokenizer.codebook_size != codebook_size:
        raise DataError(f"{found} has {image_tokenizer.codebook_size} codes, the model {codebook_size}: "
                        "not the image tokenizer this model was trained with")
    return image_tokenizer, ImageTokenLayout(int(model["vocab_size"]), codebook_size)


def image_settings(config: dict[str, Any], image_tokenizer: ImageTokenizer) -> ImageSourceConfig:
    """Decoding settings of the run's first image source, at the image tokenizer's size and mode."""
    for source in (config.get("data") or {}).get("sources", []):
        if isinstance(source, dict) and source.get("image"):
            settings = ImageSourceConfig.from_dict(source["image"])
            break
    else:
        settings = ImageSourceConfig()
    settings.size, settings.mode = [image_tokenizer.width, image_tokenizer.height], image_tokenizer.mode
    return settings


def image_prompt_ids(path: str | Path, config: dict[str, Any], tokenizer: Tokenizer, image_tokenizer: ImageTokenizer,
                     layout: ImageTokenLayout) -> list[int]:
    """``eos <begin-image> codes <end-image>`` for the image file at ``path`` (decoded as in training)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"--image {path}: cannot be read ({exc.strerror or exc})") from None
    problems = InputProblems()
    pixels = decode_image(raw, str(path), image_settings(config, image_tokenizer), problems)
    if pixels is None:
        raise DataError(f"--image {path}: {problems.describe()}")
    codes = image_tokenizer.encode(pixels)[0]
    return [tokenizer.eos_id, layout.begin_image, *layout.image_ids(codes).tolist(), layout.end_image]


@torch.no_grad()
def generate_image(model: torch.nn.Module, tokenizer: Tokenizer, image_tokenizer: ImageTokenizer,
                   layout: ImageTokenLayout, prompt: str, temperature: float = 1.0, top_k: int | None = None,
                   generator: torch.Generator | None = None, count: int = 1) -> np.ndarray:
    """uint8 images [count, H, W(, 3)] sampled after ``eos prompt <begin-image>``."""
    device = next(model.parameters()).device
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt) + [layout.begin_image]
    out = generate_in_range(model, torch.tensor([ids] * count, device=device),  # type: ignore[arg-type]
                            image_tokenizer.tokens_per_image, layout.image_offset, layout.total, temperature,
                            top_k, generator)
    return image_tokenizer.decode(out.cpu().numpy() - layout.image_offset)


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    from PIL import Image

    from lmforge.core.io import atomic_write

    picture = Image.fromarray(image, mode="RGB" if image.ndim == 3 else "L")
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return atomic_write(Path(path), lambda tmp: picture.save(tmp, format="PNG"))
