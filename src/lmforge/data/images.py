"""Source kinds for image-text data: a folder of images with a captions file, Parquet with image
bytes, a Hugging Face dataset with an image column, and the bundled scikit-learn digits.

Each reader decodes images with Pillow, converts them to the source's ``image.mode``, resizes them
to ``image.size`` (and optionally stretches their contrast), and yields one document per image:
an image record (data/image_records.py) holding the pixels and its captions. An image that cannot
be used — not an image, truncated, of a pixel mode that has no faithful grey/colour reading (16-bit
or float) — is skipped and counted in the manifest's ``input_problems``, like a bad text file.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.logging import get_logger
from lmforge.data.config import SourceConfig
from lmforge.data.documents import Document
from lmforge.data.image_config import ImageSourceConfig
from lmforge.data.image_records import ImageRecord, encode_record
from lmforge.data.sources import (InputProblems, _existing, _files_signature, _hashed, _hf_signature, _load_hf,
                                  register_source_kind)

log = get_logger(__name__)
# Pillow modes read as grey levels or colour; others (I, I;16, F: 16/32-bit and float) have no
# single faithful 8-bit reading, so those images are skipped as "unsupported_image_mode".
READABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The demo's captions: several phrasings of each label; the first is the prompt of the evaluation.
DIGIT_CAPTIONS = ("a handwritten digit {word}", "the number {number} written by hand",
                  "a picture of the digit {word}", "handwritten {number}")


def settings_of(source: SourceConfig) -> ImageSourceConfig:
    return source.image if source.image is not None else ImageSourceConfig()


def normalise(image: Any, settings: ImageSourceConfig) -> np.ndarray:
    """A Pillow image converted, resized and (optionally) contrast-stretched as ``settings`` say."""
    from PIL import Image, ImageOps

    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[settings.resample]
    image = image.convert(settings.mode)
    width, height = settings.size
    if image.size != (width, height):
        image = image.resize((width, height), resample)
    if settings.autocontrast:
        image = ImageOps.autocontrast(image)
    return np.asarray(image, dtype=np.uint8)


def decode_image(raw: bytes, where: str, settings: ImageSourceConfig, problems: InputProblems) -> np.ndarray | None:
    """The normalised pixels of an encoded image, or None (counted, with a warning) when unusable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # decodes now: a truncated file fails here, not later
            if image.mode not in READABLE_MODES:
                log.warning("%s: pixel mode %s cannot be read as %s; skipped", where, image.mode, settings.mode)
                problems.add(where, "unsupported_image_mode", image.mode)
                return None
            return normalise(image, settings)
    except UnidentifiedImageError:
        log.warning("%s: not an image Pillow can read; skipped", where)
        problems.add(where, "not_an_image")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("%s: damaged image (%s); skipped", where, exc)
        problems.add(where, "damaged_image", str(exc)[:200])
    return None


def _captions(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _label(record: dict, settings: ImageSourceConfig) -> str | None:
    if settings.label_field is None or record.get(settings.label_field) is None:
        return None
    return "_".join(str(record[settings.label_field]).split()) or None


def _record_document(pixels: np.ndarray, captions: list[str], label: str | None, source: SourceConfig,
                     doc_id: str) -> Document:
    return Document(text=encode_record(ImageRecord(pixels, captions, label)), source=source.name, doc_id=doc_id)


def _folder_signature(source: SourceConfig) -> str:
    root = _existing(source)
    return _hashed([f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                    for p in sorted(root.rglob("*")) if p.is_file()])


@register_source_kind("image_folder", signature=_folder_signature)
def _iter_image_folder(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    """A folder of image files and a JSONL captions file: one line per image,
    ``{"image": "cats/1.png", "text": "a cat" or ["a cat", ...], "label": ...}`` (keys set by
    ``image.image_field``, ``text_field`` and ``image.label_field``)."""
    settings, root = settings_of(source), _existing(source)
    captions_path = root / settings.captions_file
    if not captions_path.is_file():
        raise DataError(f"source {source.name!r}: no captions file {captions_path} (image.captions_file)")
    for line_no, raw in enumerate(captions_path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{captions_path}:{line_no}"
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.add(captions_path, "malformed_json_line", f"line {line_no}")
            continue
        name = record.get(settings.image_field) if isinstance(record, dict) else None
        captions = _captions(record.get(source.text_field)) if isinstance(record, dict) else None
        if not isinstance(name, str) or captions is None:
            problems.add(captions_path, "missing_image_or_caption",
                         f"line {line_no}: needs a string {settings.image_field!r} and caption(s) {source.text_field!r}")
            continue
        path = (root / name).resolve()
        if root.resolve() not in path.parents:
            problems.add(captions_path, "image_outside_folder", f"line {line_no}: {name}")
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.add(path, "unreadable_file", str(exc.strerror or exc))
            log.warning("%s: image %s cannot be read (%s); skipped", where, name, exc.strerror or exc)
            continue
        pixels = decode_image(data, str(path), settings, problems)
        if pixels is not None:
            yield _record_document(pixels, captions, _label(record, settings), source, name)


def _image_bytes(value: Any) -> bytes | None:
    """Encoded image bytes from a column value: bytes, or a {"bytes": ...} struct (as datasets writes)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return bytes(value["bytes"])
    return None


@register_source_kind("image_parquet", signature=_files_signature(lambda source: ("**/*.parquet",)))
def _iter_image_parquet(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    """Parquet files with encoded image bytes in ``image.image_field`` and caption(s) in ``text_field``."""
    import pyarrow.parquet as pq

    settings = settings_of(source)
    root = _existing(source)
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise DataError(f"source {source.name!r}: no .parquet files in {root}")
    columns = [settings.image_field, source.text_field] + ([settings.label_field] if settings.label_field else [])
    for path in files:
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
        for row, record in enumerate(pq.read_table(path, columns=columns).to_pylist()):
            where = f"{path}:{row}"
            data, captions = _image_bytes(record[settings.image_field]), _captions(record[source.text_field])
            if data is None or captions is None:
                problems.add(path, "missing_image_or_caption", f"row {row}")
                continue
            pixels = decode_image(data, where, settings, problems)
            if pixels is not None:
                yield _record_document(pixels, captions, _label(record, settings), source, f"{path.name}:{row}")


@register_source_kind("image_hf", signature=_hf_signature)
def _iter_image_hf(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    """A Hugging Face dataset (hub name or saved folder) with an image column and a caption column.
    The image column is read undecoded, so every image goes through the same decoding and checks."""
    import datasets

    settings = settings_of(source)
    dataset = _load_hf(source)
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        for column in (settings.image_field, source.text_field):
            if column not in columns:
                raise DataError(f"dataset {source.path!r}: no column {column!r} (columns: {', '.join(columns)})")
    features = getattr(dataset, "features", None) or {}
    if isinstance(features.get(settings.image_field), datasets.Image):
        dataset = dataset.cast_column(settings.image_field, datasets.Image(decode=False))
    for index, record in enumerate(dataset):
        where = f"{source.path}:{source.split}:{index}"
        value = record.get(settings.image_field)
        data = _image_bytes(value)
        if data is None and isinstance(value, dict) and isinstance(value.get("path"), str):
            try:
                data = Path(value["path"]).read_bytes()
            except OSError:
                data = None
        captions = _captions(record.get(source.text_field))
        if data is None or captions is None:
            problems.add(f"{source.path}:{source.split}", "missing_image_or_caption", f"record {index}")
            continue
        pixels = decode_image(data, where, settings, problems)
        if pixels is not None:
            yield _record_document(pixels, captions, _label(record, settings), source, f"{source.split}:{index}")


def digit_captions(label: int) -> list[str]:
    return [template.format(word=DIGIT_WORDS[label], number=label) for template in DIGIT_CAPTIONS]


def _digits_signature(source: SourceConfig) -> str:
    import sklearn

    return _hashed(["demo_digits", sklearn.__version__, sys.version.split()[0],
                    hashlib.sha256(json.dumps(DIGIT_CAPTIONS).encode()).hexdigest()])


@register_source_kind("demo_digits", signature=_digits_signature, needs_path=False)
def _iter_demo_digits(source: SourceConfig, problems: InputProblems) -> Iterator[Document]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, grey levels 0-16; no download),
    scaled to 0-255, with captions from their labels in several phrasings (DIGIT_CAPTIONS)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    settings = settings_of(source)
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray(np.clip(np.rint(image * 255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        pixels = normalise(grey, settings)
        yield _record_document(pixels, digit_captions(int(label)), DIGIT_WORDS[int(label)], source, f"digits:{index}")
