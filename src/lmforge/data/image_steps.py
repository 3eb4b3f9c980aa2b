"""The ``image_tokenizer`` step: image records checked for isolation, the codebook trained on the
training split, every image encoded.

One global unit, after the read step (and any dedup) and before ``tokenizer``:

1. every image record of the documents kept so far is decoded; a malformed one is removed
   (``malformed_image_record``); other documents pass untouched;
2. the split of each record is the pipeline's (the content hash of the document); a training
   record whose *pixels* equal a held-out image's (the same image with other captions) is removed
   (``image_in_heldout``), so no held-out image is ever trained on;
3. the k-means codebook (data/image_tokenizer.py) is fitted on the training images' patches and
   saved as ``image_tokenizer.json``; its reconstruction error (a fraction of the pixel variance)
   is measured on both splits;
4. ``images/<split>.npz`` (pixels, codes) and ``images/<split>.json`` (captions, labels, sources,
   document ids, pixel hashes) are written for the multimodal loader and evaluation.

Its settings are ``data.image_tokenizer`` (:class:`~lmforge.data.image_config.ImageTokenizerConfig`).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write, atomic_write_json, read_json
from lmforge.core.logging import get_logger
from lmforge.data.image_records import ImageRecord, decode_record, is_image_record
from lmforge.data.image_tokenizer import IMAGE_TOKENIZER_FILE, ImageTokenizer
from lmforge.data.pipeline import SPLITS
from lmforge.data.stages import Context, Stage, key_of, read_chunk, register_step

log = get_logger(__name__)
IMAGES_DIR = "images"


def images_path(data_dir: str | Path, split: str, suffix: str = ".npz") -> Path:
    return Path(data_dir) / IMAGES_DIR / f"{split}{suffix}"


def load_split(data_dir: str | Path, split: str) -> dict[str, Any]:
    """One split's images as the step wrote them: pixels, codes (arrays) and captions, labels,
    sources, doc_ids, pixel_hashes (lists)."""
    path = images_path(data_dir, split)
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the data with the image_tokenizer step")
    with np.load(path) as arrays:
        out: dict[str, Any] = {"pixels": arrays["pixels"], "codes": arrays["codes"]}
    out.update(read_json(images_path(data_dir, split, ".json")))
    return out


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


@register_step
class ImageTokenizerStage(Stage):
    name = "image_tokenizer"
    single = True
    removes_documents = True

    def key(self, ctx: Context, unit: str) -> str | None:
        settings = ctx.cfg.image_tokenizer.to_dict() if ctx.cfg.image_tokenizer else None
        return key_of(self.name, ctx.upstream(self, unit), settings, ctx.split_settings())

    def outputs_exist(self, ctx: Context, unit: str) -> bool:
        return (ctx.out / IMAGE_TOKENIZER_FILE).is_file() and all(
            images_path(ctx.out, s).is_file() and images_path(ctx.out, s, ".json").is_file() for s in SPLITS)

    def compute(self, ctx: Context, unit: str) -> dict:
        cfg = ctx.cfg.image_tokenizer
        assert cfg is not None  # DataConfig fills in the defaults when the step is listed
        removed: dict[str, dict[str, str]] = {}
        kept: dict[str, list[tuple[ImageRecord, str, str]]] = {split: [] for split in SPLITS}
        where: list[tuple[str, str]] = []   # (chunk unit, document index) of each training record
        text_documents = 0
        for source, index in ctx.chunks():
            gone = ctx.removed(source, index, before=self.name)
            chunk = read_chunk(ctx.chunk_path(source, index))
            for i, (doc_id, text, digest) in enumerate(zip(chunk["doc_id"], chunk["text"], chunk["sha256"])):
                if i in gone:
                    continue
                if not is_image_record(text):
                    text_documents += 1
                    continue
                try:
                    record = decode_record(text)
                except ValueError:
                    removed.setdefault(f"{source}/{index:05d}", {})[str(i)] = "malformed_image_record"
                    continue
                split = ctx.split_of(source, doc_id, text, digest)
                kept[split].append((record, source, doc_id))
                if split == "train":
                    where.append((f"{source}/{index:05d}", str(i)))
        heldout_hashes = {r.pixel_hash() for r, _, _ in kept["heldout"]}
        train = []
        for (record, source, doc_id), (chunk_unit, i) in zip(kept["train"], where, strict=True):
            if record.pixel_hash() in heldout_hashes:
                removed.setdefault(chunk_unit, {})[i] = "image_in_heldout"
            else:
                train.append((record, source, doc_id))
        kept["train"] = train
        if not kept["train"]:
            raise DataError("image_tokenizer: no training images (the sources yielded no usable image records)")
        shapes = {(r.pixels.shape, s) for split in SPLITS for r, s, _ in kept[split]}
        if len({shape for shape, _ in shapes}) > 1:
            raise DataError("image_tokenizer: one codebook needs images of one size and mode, but the sources give "
                            + ", ".join(f"{s}: {'x'.join(map(str, shape))}" for shape, s in sorted(shapes)))
        train_pixels = np.stack([r.pixels for r, _, _ in kept["train"]])
        tokenizer = ImageTokenizer.train(train_pixels, cfg)
        tokenizer.save(ctx.out / IMAGE_TOKENIZER_FILE)
        tokenizer = ImageTokenizer.load(ctx.out / IMAGE_TOKENIZER_FILE)  # encode with exactly what was saved
        errors: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for split in SPLITS:
            records = kept[split]
            shape = train_pixels.shape[1:]
            pixels = np.stack([r.pixels for r, _, _ in records]) if records else np.zeros((0, *shape), np.uint8)
            codes = tokenizer.encode(pixels) if len(pixels) else np.zeros((0, tokenizer.tokens_per_image), np.int64)
            _save_npz(images_path(ctx.out, split), pixels=pixels, codes=codes.astype(np.int32))
            atomic_write_json(images_path(ctx.out, split, ".json"), {
                "captions": [r.captions for r, _, _ in records], "labels": [r.label for r, _, _ in records],
                "sources": [s for _, s, _ in records], "doc_ids": [d for _, _, d in records],
                "pixel_hashes": [r.pixel_hash() for r, _, _ in records]})
            errors[split] = round(tokenizer.reconstruction_error(pixels), 5) if len(pixels) else None
            counts[split] = len(records)
        used = int(len(np.unique(tokenizer.encode(train_pixels))))
        reasons = Counter(why for chunk in removed.values() for why in chunk.values())
        log.info("image tokenizer: %d-entry codebook over %dx%d patches (%d tokens per image, %d codes used), "
                 "reconstruction error %.2f%% (train) / %s (held-out) of the pixel variance; %d train / %d held-out "
                 "images%s", tokenizer.codebook_size, cfg.patch_size, cfg.patch_size, tokenizer.tokens_per_image, used,
                 100 * (errors["train"] or 0.0),
                 "n/a" if errors["heldout"] is None else f"{100 * errors['heldout']:.2f}%", counts["train"],
                 counts["heldout"], "".join(f"; removed {n} {why.replace('_', ' ')}" for why, n in reasons.items()))
        return {"removed": removed, "images": counts, "text_documents": text_documents,
                "reconstruction_error": errors, "codes_used": used, "sha256": tokenizer.sha256,
                "codebook_size": tokenizer.codebook_size, "tokens_per_image": tokenizer.tokens_per_image,
                "image_size": [tokenizer.width, tokenizer.height], "mode": tokenizer.mode,
                "patch_size": tokenizer.patch_size}

    def removals(self, ctx: Context, source: str, index: int) -> dict[int, str]:
        found = ctx.record(self, "all")["removed"].get(f"{source}/{index:05d}", {})
        return {int(i): why for i, why in found.items()}

    def pipeline_fields(self, ctx: Context, source: str) -> dict[str, Any]:
        reasons: Counter = Counter()
        for unit, chunk in ctx.record(self, "all")["removed"].items():
            if unit.rsplit("/", 1)[0] == source:
                reasons.update(chunk.values())
        return {f"removed_{self.name}": dict(sorted(reasons.items()))}

    def report(self, ctx: Context, manifest: dict) -> None:
        record = ctx.record(self, "all")
        manifest["images"] = {"image_tokenizer": {"path": IMAGE_TOKENIZER_FILE, "sha256": record["sha256"],
                                                  "codebook_size": record["codebook_size"],
                                                  "patch_size": record["patch_size"],
                                                  "tokens_per_image": record["tokens_per_image"],
                                                  "image_size": record["image_size"], "mode": record["mode"],
                                                  "codes_used": record["codes_used"]},
                              "reconstruction_error": record["reconstruction_error"],
                              "splits": {split: {"images": record["images"][split],
                                                 "path": f"{IMAGES_DIR}/{split}.npz"} for split in SPLITS}}
