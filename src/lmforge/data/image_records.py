"""An image and its captions as one document of text, so the pipeline's steps carry it unchanged.

The read step stores documents as text; an image record is::

    <|image|> 8x8 L label=seven
    <base64 of the pixels: uint8, row-major, height x width (x 3 for RGB)>
    <|/image|>
    a handwritten digit seven
    the number 7, written by hand

Its content hash (the identity the split and exact dedup use) covers pixels and captions; the
``image_tokenizer`` step also keeps any image whose pixels are held out out of the training split
(data/image_steps.py). The BPE tokenizer and the text shards see only the captions
(:func:`text_for_tokenizer`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

HEADER = "<|image|>"
FOOTER = "<|/image|>"
_HEADER_RE = re.compile(r"^<\|image\|> (\d+)x(\d+) (L|RGB)(?: label=(\S+))?$")


@dataclass
class ImageRecord:
    pixels: np.ndarray                      # uint8 [height, width] (L) or [height, width, 3] (RGB)
    captions: list[str] = field(default_factory=list)
    label: str | None = None

    @property
    def mode(self) -> str:
        return "RGB" if self.pixels.ndim == 3 else "L"

    def pixel_hash(self) -> str:
        """sha256 of the pixels and their shape: the image's identity, captions aside."""
        shape = "x".join(map(str, self.pixels.shape))
        return hashlib.sha256(shape.encode() + b"\n" + np.ascontiguousarray(self.pixels).tobytes()).hexdigest()


def encode_record(record: ImageRecord) -> str:
    pixels = np.ascontiguousarray(record.pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    header = f"{HEADER} {width}x{height} {record.mode}"
    if record.label is not None:
        if not record.label or any(ch.isspace() for ch in record.label):
            raise ValueError(f"image label {record.label!r} must be a non-empty word without spaces")
        header += f" label={record.label}"
    captions = [" ".join(c.split()) for c in record.captions if c and c.strip()]
    body = base64.b64encode(pixels.tobytes()).decode("ascii")
    return "\n".join([header, body, FOOTER, *captions]) + "\n"


def is_image_record(text: str) -> bool:
    return text.startswith(HEADER + " ")


def decode_record(text: str) -> ImageRecord:
    """The record a document's text holds; ValueError when it is not a well-formed one."""
    lines = text.split("\n")
    match = _HEADER_RE.match(lines[0]) if lines else None
    if match is None or len(lines) < 3 or lines[2] != FOOTER:
        raise ValueError("not an image record (expected '<|image|> WxH MODE', base64 pixels, '<|/image|>')")
    width, height, mode, label = int(match[1]), int(match[2]), match[3], match[4]
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    raw = base64.b64decode(lines[1].encode("ascii"), validate=True)
    if len(raw) != int(np.prod(shape)):
        raise ValueError(f"image record: {len(raw)} pixel bytes for a {width}x{height} {mode} image")
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()
    return ImageRecord(pixels, [line for line in lines[3:] if line.strip()], label)


def text_for_tokenizer(text: str) -> str:
    """What the BPE tokenizer and the text shards see of a document: an image record's captions
    (one per line); any other document unchanged."""
    if not is_image_record(text):
        return text
    lines = text.split("\n")
    if len(lines) < 3 or lines[2] != FOOTER or _HEADER_RE.match(lines[0]) is None:
        return text
    return "\n".join(lines[3:])
