"""Image-text data: image records, the image source kinds (bad files counted and skipped), the
k-means image tokenizer, the image_tokenizer step (split and pixel isolation), interleaved batches
and the multimodal family's config."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.config import DataConfig, SourceConfig
from lmforge.data.image_config import ImageTokenizerConfig
from lmforge.data.image_records import ImageRecord, decode_record, encode_record, text_for_tokenizer
from lmforge.data.image_tokenizer import ImageTokenizer, ImageTokenLayout
from lmforge.data.sources import InputProblems, iter_documents


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    return (images[:n], d.target[:n]) if n else (images, d.target)


def test_record_round_trip_and_tokenizer_view():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    text = encode_record(ImageRecord(pixels, ["a  cat", "", "one cat"], "cat"))
    back = decode_record(text)
    assert np.array_equal(back.pixels, pixels) and back.captions == ["a cat", "one cat"] and back.label == "cat"
    assert text_for_tokenizer(text) == "a cat\none cat\n"
    assert text_for_tokenizer("plain <|image|> text\n") == "plain <|image|> text\n"
    with pytest.raises(ValueError):
        decode_record("<|image|> 8x8 L\nAAAA\n<|/image|>\n")  # 3 bytes for 64 pixels


def test_image_folder_counts_and_skips_bad_files(tmp_path, caplog):
    images, _ = _digits(3)
    (tmp_path / "good.png").write_bytes(_png(np.kron(images[0], np.ones((4, 4), np.uint8))))  # 32x32, resized
    (tmp_path / "rgb.png").write_bytes(_png(np.stack([images[1]] * 3, axis=-1)))
    whole = _png(np.kron(images[2], np.ones((4, 4), np.uint8)))
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])  # header intact, pixels cut
    (tmp_path / "text.png").write_bytes(b"this is not an image")
    (tmp_path / "deep.png").write_bytes(_png(np.full((8, 8), 4000, np.uint16)))  # 16-bit grey: mode I;16
    lines = [{"image": name, "text": f"caption {name}"} for name in
             ("good.png", "rgb.png", "truncated.png", "text.png", "deep.png", "missing.png")]
    lines.append({"image": "good.png"})  # no caption
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    problems = InputProblems()
    source = SourceConfig.from_dict({"name": "pics", "kind": "image_folder", "path": str(tmp_path), "image": {"size": [8, 8]}})
    docs = list(iter_documents(source, problems))
    assert [d.doc_id for d in docs] == ["good.png", "rgb.png"]
    first = decode_record(docs[0].text)
    assert first.pixels.shape == (8, 8) and first.captions == ["caption good.png"]
    assert dict(problems.counts) == {"damaged_image": 1, "not_an_image": 1, "unsupported_image_mode": 1,
                                     "unreadable_file": 1, "missing_image_or_caption": 1, "malformed_json_line": 1}
    assert "not an image Pillow can read; skipped" in caplog.text


def test_image_settings_only_for_image_kinds():
    with pytest.raises(ConfigError, match="image"):
        SourceConfig.from_dict({"name": "t", "kind": "files", "path": "x", "image": {"size": [8, 8]}})


def test_image_parquet_and_hf_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = _digits(4)
    column = [_png(images[0]), b"junk", _png(images[2]), _png(images[3])]
    pq.write_table(pa.table({"image": column, "text": ["zero", "one", "two", "three"],
                             "label": [int(v) for v in labels]}), tmp_path / "part.parquet")
    problems = InputProblems()
    source = SourceConfig.from_dict({"name": "pq", "kind": "image_parquet", "path": str(tmp_path),
                                     "image": {"label_field": "label"}})
    docs = list(iter_documents(source, problems))
    assert len(docs) == 3 and problems.counts["not_an_image"] == 1
    assert decode_record(docs[0].text).label == str(labels[0])

    saved = tmp_path / "hf"
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in column],
                                          "caption": ["a", "b", "c", "d"]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(saved))
    problems = InputProblems()
    docs = list(iter_documents(SourceConfig(name="hf", kind="image_hf", path=str(saved), text_field="caption"),
                               problems))
    assert len(docs) == 3 and problems.counts["not_an_image"] == 1
    assert np.array_equal(decode_record(docs[1].text).pixels, images[2])


def test_codebook_reconstruction_error_within_a_tenth_of_the_pixel_variance(tmp_path):
    images, _ = _digits()
    train, heldout = images[:1400], images[1400:]
    tokenizer = ImageTokenizer.train(train, ImageTokenizerConfig(patch_size=2, codebook_size=128))
    assert tokenizer.tokens_per_image == 16
    assert tokenizer.reconstruction_error(heldout) <= 0.10
    codes = tokenizer.encode(heldout[:5])
    assert codes.shape == (5, 16) and codes.max() < 128
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (5, 8, 8) and decoded.dtype == np.uint8
    tokenizer.save(tmp_path / "image_tokenizer.json")
    again = ImageTokenizer.load(tmp_path)
    assert np.array_equal(again.encode(heldout[:5]), codes)
    with pytest.raises(DataError, match="codebook_size"):
        ImageTokenizer.train(train[:2], ImageTokenizerConfig(patch_size=4, codebook_size=64))


def _prepare(tmp_path, sources, **extra):
    from lmforge.data.prepare import prepare_data

    cfg = DataConfig.from_dict({"out_dir": str(tmp_path / "data"), "vocab_size": 300,
                                "steps": ["read", "image_tokenizer", "tokenizer", "shards"],
                                "near_dedup": {"enabled": False}, "decontamination": {"enabled": False},
                                "image_tokenizer": {"patch_size": 2, "codebook_size": 32}, "sources": sources,
                                **extra})
    return cfg, prepare_data(cfg)


def test_same_image_with_other_captions_never_on_both_sides(tmp_path):
    from lmforge.data.image_steps import load_split

    images, _ = _digits(40)
    folder = tmp_path / "pics"
    folder.mkdir()
    lines = []
    for i, image in enumerate(images):
        (folder / f"{i}.png").write_bytes(_png(image))
        lines += [{"image": f"{i}.png", "text": f"first caption {i}"}, {"image": f"{i}.png", "text": f"second {i}"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    _, manifest = _prepare(tmp_path, [{"name": "pics", "kind": "image_folder", "path": str(folder)}],
                           heldout_fraction=0.5)
    train, heldout = load_split(tmp_path / "data", "train"), load_split(tmp_path / "data", "heldout")
    assert not set(train["pixel_hashes"]) & set(heldout["pixel_hashes"])
    removed = manifest["pipeline"]["pics"]["removed_image_tokenizer"].get("image_in_heldout", 0)
    assert removed > 0 and len(train["captions"]) + len(heldout["captions"]) + removed == 80
    assert manifest["images"]["splits"]["train"]["images"] == len(train["captions"])
    # the text shards hold the captions only
    tokens = manifest["sources"]["pics"]["train"]["tokens"]
    assert tokens < 10 * len(train["captions"])


def test_digits_prepared_split_by_hash_and_batches(tmp_path):
    import torch

    from lmforge.data.interleaved import ImageTextExamples, InterleavedLoader
    from lmforge.data.tokenizer import Tokenizer

    cfg, manifest = _prepare(tmp_path, [{"name": "digits", "kind": "demo_digits", "max_documents": 300}],
                             heldout_fraction=0.2)
    images = manifest["images"]
    assert images["splits"]["train"]["images"] + images["splits"]["heldout"]["images"] == 300
    assert images["reconstruction_error"]["heldout"] <= 0.10
    assert (tmp_path / "data" / "image_tokenizer.json").is_file()
    tokenizer = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    layout = ImageTokenLayout(tokenizer.vocab_size, 32)
    train = ImageTextExamples(tmp_path / "data", "train", tokenizer, layout)
    assert all(label is not None for label in train.labels) and len(train.captions[0]) == 4
    loader = InterleavedLoader(train, 64, 4, seed=3)
    inputs, targets = loader.next_batch()
    assert inputs.shape == (4, 64) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (inputs[:, 0] == tokenizer.eos_id).all()
    begins = (inputs == layout.begin_image).nonzero().tolist()
    for row, col in begins:  # every complete image is begin, 16 codes, end
        if col + 17 < 64:
            assert inputs[row, col + 17] == layout.end_image
            assert (inputs[row, col + 1:col + 17] >= layout.image_offset).all()
    again = InterleavedLoader(train, 64, 4, seed=3)
    assert torch.equal(again.next_batch()[0], inputs)
    resumed = InterleavedLoader(train, 64, 4, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(resumed.next_batch()[0], loader.next_batch()[0])


def test_family_config_checks_and_counts():
    import torch  # noqa: F401

    from lmforge.nn.families import family_of
    from lmforge.train.config import RunConfig

    data = {"out_dir": "x", "vocab_size": 300, "steps": ["read", "image_tokenizer", "tokenizer", "shards"],
            "near_dedup": {"enabled": False}, "decontamination": {"enabled": False},
            "image_tokenizer": {"codebook_size": 64}, "sources": [{"name": "digits", "kind": "demo_digits"}]}
    model = {"family": "multimodal", "vocab_size": 300, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}
    cfg = RunConfig.from_dict({"data": data, "model": model, "train": {"seq_len": 64}})
    assert cfg.model.multimodal.codebook_size == 64 and cfg.model.padded_vocab_size == 384  # 300 + 2 + 64 -> 384
    built = cfg.model.build()
    assert family_of(cfg.model).count_parameters(cfg.model).total == sum(p.numel() for p in built.parameters())
    with pytest.raises(ConfigError, match="image_tokenizer"):
        RunConfig.from_dict({"model": model, "train": {"seq_len": 64}})
    with pytest.raises(ConfigError, match="caption_template"):
        RunConfig.from_dict({"data": data, "model": {**model, "multimodal": {"caption_template": "no slot"}}})
