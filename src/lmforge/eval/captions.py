"""Evaluation of image-text models, on the held-out images only.

- :func:`modality_losses`: held-out loss and bits per token, separately for text and image tokens
  (begin/end-image count as image), over sequences in both orders, and of the caption after the
  image; with MoE, the share of routed token-slots each expert gets from text tokens and from
  image tokens. (Every route; the continuous routes have no image loss.)
- :func:`caption_accuracy`: image -> text (every route). Each labelled held-out image is captioned with the
  most likely of the labels' captions (``caption_template``), by the model's log-likelihood of
  the caption after the image; accuracy and the confusion matrix.
- :func:`generate_images` + :func:`score_generated`: text -> image (the discrete route only). Images sampled after each
  label's caption, decoded by the codebook, and classified by a logistic regression fitted on the
  held-out split's pixels (never on training images); :func:`training_copies` counts the samples
  that reproduce a training image exactly (memorization).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.image_tokenizer import ImageTokenizer, ImageTokenLayout
from lmforge.data.images import DIGIT_WORDS
from lmforge.data.interleaved import ImageTextExamples
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.moe import MoE
from lmforge.nn.multimodal import generate_in_range


def _padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of equal-length rows; padded targets are -100 (not scored)."""
    width = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), width), pad, dtype=torch.long)
    targets = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, seq in enumerate(sequences):
        inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[row, : len(seq) - 1] = torch.tensor(seq[1:])
    return inputs, targets


def label_order(labels: list[str | None]) -> list[str]:
    """The distinct labels: digit words in numeric order, then others sorted."""
    found = {label for label in labels if label is not None}
    return sorted(found, key=lambda label: (DIGIT_WORDS.index(label) if label in DIGIT_WORDS else 99, label))


def _model_inputs(examples: Any, images: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The extra model arguments of rows holding these images (the continuous routes' patches)."""
    return {k: v.to(device) for k, v in examples.model_inputs(images).items()}


@torch.no_grad()
def modality_losses(model: nn.Module, examples: ImageTextExamples | Any, device: torch.device,
                    max_images: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Held-out loss by modality over sequences in both orders; ``caption`` is the text of the
    image -> text sequences only (the caption given the image, end-of-text included). On the
    continuous routes (``examples.predicts_images`` false) image positions are never targets, so
    there is no image loss (None)."""
    layout, eos = examples.layout, examples.eos
    count = len(examples) if max_images is None else min(max_images, len(examples))
    sequences = [[eos] + examples.example(i, 0, order) for i in range(count) for order in (True, False)]
    rows_images = [i for i in range(count) for _ in (True, False)]
    sums = {"text": 0.0, "image": 0.0, "caption": 0.0}
    tokens = {"text": 0, "image": 0, "caption": 0}
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    routed: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(sequences), batch_size):
            inputs, targets = _padded(sequences[first:first + batch_size], eos)
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs, **_model_inputs(examples, rows_images[first:first + batch_size], device)).logits.float()
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
            scored = targets.flatten() != -100
            image = layout.is_image_token(targets.flatten())
            image_first = torch.tensor([(first + row) % 2 == 1 for row in range(len(inputs))], device=device)
            image_first = image_first[:, None].expand_as(targets).flatten()
            for name, mask in (("text", scored & ~image), ("image", scored & image),
                               ("caption", scored & ~image & image_first)):
                sums[name] += float(losses[mask].sum())
                tokens[name] += int(mask.sum())
            valid_inputs = (targets != -100).flatten()
            input_is_image = layout.is_image_token(inputs.flatten())
            for module in moe_layers:
                experts = module.last_top_experts  # [tokens, k]: the experts each token of this batch went to
                for name, mask in (("text", valid_inputs & ~input_is_image), ("image", valid_inputs & input_is_image)):
                    counts = torch.bincount(experts[mask].flatten(), minlength=module.n_experts).cpu().numpy()
                    routed[name] = routed.get(name, 0) + counts
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"images": count}
    for name in ("text", "image", "caption"):
        if name == "image" and not getattr(examples, "predicts_images", True):
            out.update(loss_image=None, bits_per_token_image=None, tokens_image=0)
            continue
        loss = sums[name] / max(tokens[name], 1)
        out[f"loss_{name}"] = loss
        out[f"bits_per_token_{name}"] = loss / math.log(2)
        out[f"tokens_{name}"] = tokens[name]
    if moe_layers:
        out["moe_expert_load"] = {name: [round(float(v), 4) for v in counts / max(counts.sum(), 1)]
                                  for name, counts in routed.items()}
    return out


@torch.no_grad()
def caption_accuracy(model: nn.Module, examples: ImageTextExamples | Any, tokenizer: Tokenizer, template: str,
                     device: torch.device, max_images: int | None = None, batch_size: int = 256) -> dict[str, Any] | None:
    """Image -> the most likely label caption; None when fewer than two labels are known."""
    labels = label_order(examples.labels)
    if len(labels) < 2:
        return None
    eos = examples.eos
    candidates = [tokenizer.encode(template.format(label=label)) + [eos] for label in labels]
    images = [i for i, label in enumerate(examples.labels) if label is not None]
    if max_images is not None:
        images = images[:max_images]
    requests = [([eos] + examples.image_ids(i), candidate) for i in images for candidate in candidates]
    request_images = [i for i in images for _ in candidates]
    scores = np.zeros(len(requests))
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(requests), batch_size):
            chunk = requests[first:first + batch_size]
            inputs, targets = _padded([context + candidate for context, candidate in chunk], eos)
            for row, (context, _) in enumerate(chunk):  # score only the caption
                targets[row, : len(context) - 1] = -100
            extra = _model_inputs(examples, request_images[first:first + len(chunk)], device)
            log_probs = F.log_softmax(model(inputs.to(device), **extra).logits.float(), dim=-1)
            picked = log_probs.gather(-1, targets.clamp(min=0).to(device)[..., None])[..., 0]
            picked = picked.masked_fill(targets.to(device) == -100, 0.0)
            scores[first:first + len(chunk)] = picked.sum(dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    predicted = scores.reshape(len(images), len(labels)).argmax(axis=1)
    truth = np.array([labels.index(examples.labels[i]) for i in images])
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    return {"accuracy": float((predicted == truth).mean()), "images": len(images), "labels": labels,
            "template": template, "confusion": confusion.tolist(), "chance": 1.0 / len(labels)}


@torch.no_grad()
def generate_images(model: nn.Module, tokenizer: Tokenizer, layout: ImageTokenLayout, image_tokenizer: ImageTokenizer,
                    template: str, labels: list[str], per_label: int, device: torch.device, temperature: float = 1.0,
                    top_k: int | None = None, seed: int = 0, batch_size: int = 100) -> dict[str, np.ndarray]:
    """{label: uint8 images [per_label, H, W(, 3)]} sampled after ``eos caption <begin-image>``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        for label in labels:
            prompt = [tokenizer.eos_id] + tokenizer.encode(template.format(label=label)) + [layout.begin_image]
            codes = []
            for first in range(0, per_label, batch_size):
                n = min(batch_size, per_label - first)
                ids = generate_in_range(model, torch.tensor([prompt] * n, device=device),  # type: ignore[arg-type]
                                        image_tokenizer.tokens_per_image, layout.image_offset, layout.total,
                                        temperature, top_k, generator)
                codes.append(ids.cpu().numpy() - layout.image_offset)
            out[label] = image_tokenizer.decode(np.concatenate(codes))
    finally:
        model.train(was_training)
    return out


def pixel_classifier(pixels: np.ndarray, labels: list[str]) -> tuple[Any, float]:
    """A logistic regression on raw pixels (/255) fitted on the given (held-out) images, and its
    own 5-fold cross-validated accuracy on them (how far its verdicts can be trusted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x = pixels.reshape(len(pixels), -1).astype(np.float64) / 255.0
    classifier = LogisticRegression(max_iter=5000)
    folds = min(5, min(labels.count(label) for label in set(labels)))
    own = float(cross_val_score(classifier, x, labels, cv=folds).mean()) if folds >= 2 else float("nan")
    return classifier.fit(x, labels), own


def score_generated(classifier: Any, generated: dict[str, np.ndarray]) -> dict[str, Any]:
    per_label = {}
    hits = total = 0
    for label, images in generated.items():
        predicted = classifier.predict(images.reshape(len(images), -1).astype(np.float64) / 255.0)
        correct = int((predicted == label).sum())
        per_label[label] = correct / len(images)
        hits, total = hits + correct, total + len(images)
    return {"accuracy": hits / max(total, 1), "per_label": per_label, "images": total}


def training_copies(generated: dict[str, np.ndarray], training_images: np.ndarray) -> dict[str, Any]:
    """The share of generated images identical to a training image as the codebook renders it
    (its codes decoded): samples that are copies of memorized training images rather than new ones."""
    seen = {image.tobytes() for image in training_images}
    copies = {label: float(np.mean([image.tobytes() in seen for image in images])) for label, images in generated.items()}
    total = sum(len(images) for images in generated.values())
    overall = sum(copies[label] * len(images) for label, images in generated.items()) / max(total, 1)
    return {"copied_training_fraction": overall, "copied_training_per_label": copies}


def image_grid_png(generated: dict[str, np.ndarray], columns: int = 10, scale: int = 4, gap: int = 1) -> bytes:
    """One row per label of its first ``columns`` images, each scaled up ``scale`` times (PNG bytes)."""
    from PIL import Image

    first = next(iter(generated.values()))
    height, width = first.shape[1:3]
    cell_w, cell_h = width * scale + gap, height * scale + gap
    mode = "RGB" if first.ndim == 4 else "L"
    canvas = Image.new(mode, (columns * cell_w + gap, len(generated) * cell_h + gap), 128 if mode == "L" else (128,) * 3)
    for row, images in enumerate(generated.values()):
        for col, image in enumerate(images[:columns]):
            tile = Image.fromarray(image, mode=mode).resize((width * scale, height * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (gap + col * cell_w, gap + row * cell_h))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def confusion_lines(result: dict[str, Any]) -> list[str]:
    """The confusion matrix as text (rows: true label, columns: predicted)."""
    labels = result["labels"]
    short = [label[:5] for label in labels]
    lines = ["true \\ pred " + " ".join(f"{s:>5}" for s in short)]
    for label, row in zip(short, result["confusion"]):
        lines.append(f"{label:<11} " + " ".join(f"{v:>5}" for v in row))
    return lines


def counts_by_label(labels: list[str | None]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        if label is not None:
            counts[label] += 1
    return dict(counts)
