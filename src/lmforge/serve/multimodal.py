"""Inference for multimodal models: text after an image (every route), an image after text (the
discrete route only: the continuous / encoder routes read images but never predict them).

The image tokenizer (discrete route) is the one the run's data was prepared with: ``image_tokenizer.json`` of the
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
from lmforge.data.patch_sequences import PatchTokenLayout, patchify
from lmforge.data.sources import InputProblems
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.generation import check_sampling_options, sample_next
from lmforge.nn.multimodal import generate_in_range
from lmforge.nn.transformer import KVCache


def _multimodal_model_config(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model") or {}
    if model.get("family") != "multimodal":
        raise ConfigError(f"images need a model of family 'multimodal'; this checkpoint's is "
                          f"{model.get('family', 'transformer')!r}")
    return model


def model_route(config: dict[str, Any]) -> str:
    """The multimodal route of a checkpoint's config (discrete, continuous or encoder)."""
    return str((_multimodal_model_config(config).get("multimodal") or {}).get("route", "discrete"))


def require_image_output(config: dict[str, Any]) -> None:
    """Image generation needs the discrete route: a clear error for the others."""
    route = model_route(config)
    if route != "discrete":
        raise ConfigError(f"--image-out: this model's route is {route!r} (model.multimodal.route), which reads images "
                          "as projected patches and never predicts them; image generation needs the discrete route "
                          "(images as codebook tokens)")


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


def image_settings(config: dict[str, Any], image_tokenizer: ImageTokenizer | None) -> ImageSourceConfig:
    """Decoding settings of the run's first image source, at the image tokenizer's size and mode
    (without one, the source's own)."""
    for source in (config.get("data") or {}).get("sources", []):
        if isinstance(source, dict) and source.get("image"):
            settings = ImageSourceConfig.from_dict(source["image"])
            break
    else:
        settings = ImageSourceConfig()
    if image_tokenizer is not None:
        settings.size, settings.mode = [image_tokenizer.width, image_tokenizer.height], image_tokenizer.mode
    return settings


def _read_image(path: str | Path, settings: ImageSourceConfig) -> np.ndarray:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"--image {path}: cannot be read ({exc.strerror or exc})") from None
    problems = InputProblems()
    pixels = decode_image(raw, str(path), settings, problems)
    if pixels is None:
        raise DataError(f"--image {path}: {problems.describe()}")
    return pixels


def patch_image_prompt(path: str | Path, config: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], torch.Tensor]:
    """Continuous / encoder routes: ``eos <begin-image> placeholders and row separators <end-image>``
    and the image's patches [1, 1, patches, patch_dim], for the image file at ``path`` (decoded at
    the model's image size and mode, as in training)."""
    settings = (_multimodal_model_config(config).get("multimodal") or {})
    size, channels, patch_size = settings.get("image_size"), settings.get("image_channels"), settings.get("patch_size", 2)
    if not size or not channels:
        raise ConfigError("model.multimodal.image_size / image_channels are missing from the checkpoint's config")
    decoding = image_settings(config, None)
    decoding.size, decoding.mode = list(size), "RGB" if int(channels) == 3 else "L"
    patches = patchify(_read_image(path, decoding)[None], int(patch_size))
    layout = PatchTokenLayout(tokenizer.vocab_size)
    columns, rows = int(size[0]) // int(patch_size), int(size[1]) // int(patch_size)
    row = [layout.patch] * columns + [layout.row_separator]
    ids = [tokenizer.eos_id, layout.begin_image, *(row * rows), layout.end_image]
    return ids, torch.from_numpy(patches[:, None])


@torch.no_grad()
def continue_after_image(model: torch.nn.Module, prompt_ids: torch.Tensor, images: torch.Tensor, max_new_tokens: int,
                         temperature: float = 1.0, top_k: int | None = None, eos_id: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, n] text ids sampled after a prompt holding an image's patches (continuous / encoder
    routes): the prompt (with ``images``) fills the KV cache, then text tokens follow one at a time."""
    check_sampling_options(max_new_tokens, temperature, top_k)
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ConfigError(f"the image prompt ({prompt_ids.shape[1]} positions) + --max-new-tokens {max_new_tokens} "
                          f"exceed the model's max_seq_len {model.cfg.max_seq_len}")
    cache = KVCache(model, batch=prompt_ids.shape[0], max_len=model.cfg.max_seq_len)
    logits = model(prompt_ids, kv_cache=cache, images=images).logits[:, -1]
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        next_id = sample_next(logits[:, :model.cfg.vocab_size], temperature, top_k, generator)  # text ids only
        generated.append(next_id)
        if step == max_new_tokens - 1 or (eos_id is not None and bool((next_id == eos_id).all())):
            break
        logits = model(next_id, kv_cache=cache).logits[:, -1]
    return torch.cat(generated, dim=1)


def image_prompt_ids(path: str | Path, config: dict[str, Any], tokenizer: Tokenizer, image_tokenizer: ImageTokenizer,
                     layout: ImageTokenLayout) -> list[int]:
    """``eos <begin-image> codes <end-image>`` for the image file at ``path`` (decoded as in training)."""
    pixels = _read_image(path, image_settings(config, image_tokenizer))
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
