"""Training options of the multimodal family: shift augmentation before tokenization and the
image-token loss weight (data/interleaved.py, nn/multimodal.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.core.config import FieldValueError
from lmforge.data.image_tokenizer import ImageTokenizer, ImageTokenLayout
from lmforge.data.interleaved import ImageTextExamples, InterleavedLoader, shift_image
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.multimodal import MultimodalSettings

from test_multimodal_data import _prepare


def test_shift_image_moves_pixels_and_fills_with_the_darkest_value():
    image = np.arange(1, 17, dtype=np.uint8).reshape(4, 4)
    down_right = shift_image(image, 1, 1)
    assert np.array_equal(down_right[1:, 1:], image[:-1, :-1])
    assert (down_right[0] == 1).all() and (down_right[:, 0] == 1).all()
    up_left = shift_image(image, -1, -2)
    assert np.array_equal(up_left[:-1, :-2], image[1:, 2:])
    assert np.array_equal(shift_image(image, 0, 0), image)
    assert (shift_image(image, 5, 0) == 1).all()  # moved out entirely
    rgb = np.stack([image] * 3, axis=-1)
    assert np.array_equal(shift_image(rgb, 1, 0)[1:], rgb[:-1])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("digits")
    _prepare(tmp_path, [{"name": "digits", "kind": "demo_digits", "max_documents": 200}], heldout_fraction=0.2)
    tokenizer = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    image_tokenizer = ImageTokenizer.load(tmp_path / "data" / "image_tokenizer.json")
    layout = ImageTokenLayout(tokenizer.vocab_size, image_tokenizer.codebook_size)
    return ImageTextExamples(tmp_path / "data", "train", tokenizer, layout), image_tokenizer


def test_shifted_codes_encode_the_shifted_pixels(digits):
    examples, image_tokenizer = digits
    shifted = examples.shifted_codes(image_tokenizer, 1)
    assert shifted.shape == (9, len(examples), image_tokenizer.tokens_per_image)
    assert np.array_equal(shifted[4], examples.codes)  # the centre entry is the unshifted image
    # entry 0 is (dy, dx) = (-1, -1)
    assert np.array_equal(shifted[0, 3], image_tokenizer.encode(shift_image(examples.pixels[3], -1, -1)[None])[0])
    assert (shifted != examples.codes[None]).any(axis=(1, 2)).sum() == 8  # every other shift changes codes


def test_augmented_batches_hold_shifted_images_and_resume_exactly(digits):
    examples, image_tokenizer = digits
    layout = examples.layout
    plain = InterleavedLoader(examples, 64, 8, seed=5)
    augmented = InterleavedLoader(examples, 64, 8, seed=5, augment_shift=1, image_tokenizer=image_tokenizer)
    inputs, _ = augmented.next_batch()
    assert not torch.equal(inputs, plain.next_batch()[0])
    # every complete image in the batch is one of its shifted versions' codes
    # every complete image is one of its shifted versions; an image after a caption (text -> image,
    # one the model learns to write) is never shifted
    allowed = {tuple(layout.image_ids(codes).tolist()) for codes in augmented.shifted.reshape(-1, 16)}
    unshifted = {tuple(layout.image_ids(codes).tolist()) for codes in examples.codes}
    read = written = shifted_read = 0
    for row, col in (inputs == layout.begin_image).nonzero().tolist():
        if col + 17 < 64:
            image = tuple(inputs[row, col + 1:col + 17].tolist())
            if inputs[row, col - 1] == examples.eos:
                assert image in allowed
                read += 1
                shifted_read += image not in unshifted
            else:
                assert image in unshifted
                written += 1
    assert read > 0 and written > 0 and shifted_read > 0
    resumed = InterleavedLoader(examples, 64, 8, seed=5, augment_shift=1, image_tokenizer=image_tokenizer)
    resumed.load_state_dict(augmented.state_dict())
    assert torch.equal(resumed.next_batch()[0], augmented.next_batch()[0])
    with pytest.raises(ValueError, match="image tokenizer"):
        InterleavedLoader(examples, 64, 8, seed=5, augment_shift=1)


def test_image_loss_weight_drops_only_image_targets_at_its_rate(digits):
    examples, _ = digits
    layout = examples.layout
    full_inputs, full_targets = InterleavedLoader(examples, 128, 32, seed=1).next_batch()
    inputs, targets = InterleavedLoader(examples, 128, 32, seed=1, image_loss_weight=0.25).next_batch()
    assert torch.equal(inputs, full_inputs)  # the same sequences, fewer scored targets
    image = layout.is_image_token(full_targets)
    assert torch.equal(targets[~image], full_targets[~image])  # text targets all kept
    kept = (targets[image] != -100).float().mean().item()
    assert 0.2 < kept < 0.3
    assert torch.equal(targets[image & (targets != -100)], full_targets[image & (targets != -100)])
    # two ranks together mask exactly as one rank with the global batch
    whole = InterleavedLoader(examples, 128, 4, seed=1, image_loss_weight=0.5).next_batch()[1]
    halves = [InterleavedLoader(examples, 128, 2, seed=1, image_loss_weight=0.5, rank=r, world_size=2).next_batch()[1]
              for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_option_values_checked():
    assert MultimodalSettings(augment_shift=2, image_loss_weight=0.5).augment_shift == 2
    with pytest.raises(FieldValueError, match="augment_shift"):
        MultimodalSettings(augment_shift=-1)
    with pytest.raises(FieldValueError, match="image_loss_weight"):
        MultimodalSettings(image_loss_weight=0.0)
    with pytest.raises(FieldValueError, match="image_loss_weight"):
        MultimodalSettings(image_loss_weight=1.5)


def test_training_copies_counts_exact_reproductions_only():
    from lmforge.eval.captions import training_copies

    training = np.arange(3 * 4, dtype=np.uint8).reshape(3, 2, 2)
    new = training[0].copy()
    new[0, 0] = 200
    generated = {"one": np.stack([training[0], training[2], new, new]), "two": np.stack([new, new])}
    found = training_copies(generated, training)
    assert found["copied_training_per_label"] == {"one": 0.5, "two": 0.0}
    assert found["copied_training_fraction"] == pytest.approx(2 / 6)
