"""The multimodal family's continuous routes: ``continuous`` (patches linearly projected into the
decoder, early fusion) and ``encoder`` (a small image encoder first, late fusion) — the network
and its counting (nn/patch_input.py), the sequences and loader (data/patch_sequences.py), training
with exact resume, ``lmforge eval`` / ``generate`` / ``export`` on such runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config
from lmforge.core.config import FieldValueError
from lmforge.core.errors import ConfigError
from lmforge.data.patch_sequences import PatchExamples, PatchSequenceLoader, PatchTokenLayout, patchify
from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.counting import flops_per_token
from lmforge.nn.families import family_of, model_config_from_dict
from lmforge.nn.multimodal import MultimodalSettings
from lmforge.nn.patch_input import PatchInputTransformer
from lmforge.nn.transformer import KVCache

from test_multimodal_data import _prepare

VOCAB = 40


def _model_cfg(route: str, **multimodal):
    return model_config_from_dict({
        "family": "multimodal", "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
        "multimodal": {"route": route, "image_size": [8, 8], "image_channels": 1, "patch_size": 2,
                       "examples_per_row": 2, "encoder": {"d_model": 16, "n_layers": 1, "n_heads": 2},
                       **multimodal}})


def _image_ids(layout: PatchTokenLayout, rows: int = 4, columns: int = 4) -> list[int]:
    return [layout.begin_image, *(([layout.patch] * columns + [layout.row_separator]) * rows), layout.end_image]


def test_patchify_cuts_rows_of_patches_and_scales_pixels():
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 17  # 0..255
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 4) and patches.dtype == np.float32
    assert np.allclose(patches[0, 1], (np.array([2, 3, 6, 7]) * 17) / 127.5 - 1)  # top-right patch, row by row
    assert patches.min() == -1.0 and patches.max() == 1.0
    rgb = np.repeat(image[..., None], 3, axis=-1)
    assert patchify(rgb, 2).shape == (1, 4, 12)
    with pytest.raises(ConfigError, match="patch_size"):
        patchify(image, 3)


def test_layout_agrees_with_the_model_config():
    cfg = _model_cfg("continuous")
    layout = PatchTokenLayout(VOCAB)
    assert cfg.patch_token_id == layout.patch and cfg.total_vocab_size == layout.total
    assert cfg.patch_grid == (4, 4) and cfg.patch_dim == 4
    assert isinstance(cfg.build(), PatchInputTransformer)
    assert type(_model_cfg("discrete").build()).__name__ == "Transformer"  # the discrete route is unchanged


def test_settings_reject_options_of_other_routes():
    with pytest.raises(FieldValueError, match="image_loss_weight"):
        MultimodalSettings(route="continuous", image_loss_weight=0.5)
    with pytest.raises(FieldValueError, match="route"):
        MultimodalSettings(route="pixels")  # type: ignore[arg-type]
    with pytest.raises(FieldValueError, match="patch_size"):
        MultimodalSettings(route="continuous", patch_size=3, image_size=[8, 8], image_channels=1)


@pytest.mark.parametrize("route", ["continuous", "encoder"])
def test_counts_match_the_built_model_and_flops_include_the_image_side(route):
    cfg = _model_cfg(route)
    model = cfg.build()
    counts = family_of(cfg).count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    decoder_only = flops_per_token(cfg, 64)
    extra = family_of(cfg).flops_per_token(cfg, 64) - decoder_only
    share = 2 * 16 / 64  # examples_per_row * patches / seq_len
    if route == "continuous":
        assert extra == pytest.approx(share * 6 * 4 * 32, abs=1)
    else:  # the encoder's matmuls (input, qkv + output, SwiGLU, projection out) and its attention
        per_patch = 6 * (4 * 16 + 4 * 16 * 16 + 3 * 16 * 64 + 16 * 32) + 12 * 16 * 16
        assert extra == pytest.approx(share * per_patch, abs=1)


@pytest.mark.parametrize("route", ["continuous", "encoder"])
def test_patches_reach_only_later_positions_and_cached_decoding_matches(route):
    torch.manual_seed(0)
    cfg = _model_cfg(route)
    model = cfg.build().eval()
    layout = PatchTokenLayout(VOCAB)
    ids = torch.tensor([[0, 5, *_image_ids(layout), 7, 8, 9]])
    images = torch.rand(1, 1, 16, 4) * 2 - 1
    out = model(ids, images=images).logits
    other = images.clone()
    other[0, 0, 5] = -other[0, 0, 5]
    changed = model(ids, images=other).logits
    first_patch = 3
    assert torch.equal(out[:, :first_patch], changed[:, :first_patch])  # causal: earlier positions unaffected
    assert not torch.allclose(out[:, -1], changed[:, -1])  # the text after the image reads the pixels
    with pytest.raises(ValueError, match="placeholders"):
        model(ids)  # placeholders need images
    with pytest.raises(ValueError, match="placeholders"):
        model(ids, images=torch.zeros(1, 2, 16, 4))  # two images, one image's placeholders
    cache = KVCache(model, batch=1)
    prefix = model(ids[:, :-1], kv_cache=cache, images=images).logits
    last = model(ids[:, -1:], kv_cache=cache).logits
    assert torch.allclose(torch.cat([prefix, last], dim=1), out, atol=1e-5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("patch_digits")
    _prepare(tmp_path, [{"name": "digits", "kind": "demo_digits", "max_documents": 120}], heldout_fraction=0.25)
    tokenizer = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    return PatchExamples(tmp_path / "data", "train", tokenizer, 2), tokenizer


def test_rows_hold_whole_examples_and_score_text_only(digits):
    examples, tokenizer = digits
    layout = examples.layout
    loader = PatchSequenceLoader(examples, 100, 3, seed=4, examples_per_row=3, text_first_fraction=0.5)
    inputs, targets, images = loader.next_batch()
    assert inputs.shape == (3, 100) and targets.shape == (3, 100) and images.shape == (3, 3, 16, 4)
    assert ((inputs == layout.patch).sum(dim=1) == 3 * 16).all()  # every row: exactly its three images
    scored = targets[targets != -100]
    assert len(scored) and not bool(layout.is_image_token(scored).any())  # loss on text tokens only
    assert (inputs[:, 0] == tokenizer.eos_id).all()
    # the patches are the drawn images' own (no shift): each one is a training image's patches
    known = {p.tobytes() for p in examples.patches}
    assert all(image.numpy().tobytes() in known for row in images for image in row)
    # resume: a loader restored from the state continues the exact stream
    state = loader.state_dict()
    following = loader.next_batch()
    restored = PatchSequenceLoader(examples, 100, 3, seed=4, examples_per_row=3, text_first_fraction=0.5)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.next_batch(), following))


def test_shifted_images_only_when_read_and_rows_that_do_not_fit(digits):
    examples, _ = digits
    loader = PatchSequenceLoader(examples, 100, 4, seed=1, examples_per_row=3, augment_shift=1)
    _, _, images = loader.next_batch()
    shifted = {p.tobytes() for p in loader.shifted.reshape(-1, 16, 4)}
    assert all(image.numpy().tobytes() in shifted for row in images for image in row)
    plain = {p.tobytes() for p in examples.patches}
    assert any(image.numpy().tobytes() not in plain for row in images for image in row)
    with pytest.raises(ConfigError, match="examples_per_row"):
        PatchSequenceLoader(examples, 64, 4, seed=1, examples_per_row=3)


def _run_config(tmp_path, route: str, steps: int) -> dict:
    moe = {"moe": {"n_experts": 2, "top_k": 1}} if route == "encoder" else {}  # MoE decoders work on every route
    return {"name": f"mm_{route}", "runs_dir": str(tmp_path / "runs"),
            "data": {"out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.3,
                     "steps": ["read", "image_tokenizer", "tokenizer", "shards"],
                     "near_dedup": {"enabled": False}, "decontamination": {"enabled": False},
                     "image_tokenizer": {"patch_size": 2, "codebook_size": 16},
                     "sources": [{"name": "digits", "kind": "demo_digits", "max_documents": 150}]},
            "model": {"family": "multimodal", "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 112, **moe,
                      "multimodal": {"route": route, "examples_per_row": 3, "augment_shift": 1, "eval_max_images": 20,
                                     "encoder": {"d_model": 16, "n_layers": 1, "n_heads": 2}}},
            "train": {"steps": steps, "batch_size": 2, "seq_len": 112, "log_every": 1, "eval_every": 3,
                      "checkpoint_every": 3, "device": "cpu", "tensorboard": False},
            "eval": {"max_tokens_per_domain": 256, "task_items": 0, "position_bucket": 0, "sample_tokens": 2,
                     "sample_prompts": ["a handwritten"], "bootstrap_samples": 10}}


@pytest.mark.slow
@pytest.mark.parametrize("route", ["continuous", "encoder"])
def test_training_resumes_bit_identically(tmp_path, route):
    from lmforge.core.metrics_file import read_metrics
    from lmforge.train.assembly import build_trainer, train_run
    from lmforge.train.callbacks import Callback
    from lmforge.train.config import RunConfig

    class Crash(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.step == 4:
                raise RuntimeError("simulated crash")

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}

    raw = _run_config(tmp_path, route, steps=6)
    run_a = train_run(RunConfig.from_dict(raw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(RunConfig.from_dict({**raw, "name": "b"}), extra_callbacks={"crash": Crash()})
    trainer = build_trainer(RunConfig.from_dict({**raw, "name": "b"}), resume="auto")
    assert trainer.step == 3
    run_b = trainer.fit()
    a, b = losses(run_a), losses(run_b)
    assert sorted(a) == list(range(1, 7)) and a == b
    final = json.loads((run_a / "eval" / "multimodal.json").read_text())
    assert final["route"] == route and "generation" not in final and final["bits_per_token_image"] is None
    assert 0 <= final["caption_accuracy"] <= 1 and final["bits_per_token_caption"] > 0
    assert final["training_flops"] == final["flops_per_token"] * 6 * 2 * 112
    if route == "encoder":
        assert set(final["moe_expert_load"]) == {"text", "image"}


@pytest.mark.slow
def test_eval_generate_and_export_of_a_continuous_run(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    config = write_config(tmp_path / "mm.yaml", _run_config(tmp_path, "continuous", steps=3))
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "mm_continuous"
    assert "Route continuous" in (run / "report.html").read_text()

    result = run_cli("eval", str(run), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "multimodal (continuous route)" in result.stdout and "caption accuracy" in result.stdout
    record = json.loads((run / "eval" / "step_0000003.json").read_text())
    assert record["multimodal"]["captions"]["images"] == sum(map(sum, record["multimodal"]["captions"]["confusion"]))

    digit = np.clip(np.rint(load_digits().images[0] * 255 / 16), 0, 255).astype(np.uint8)
    png = tmp_path / "zero.png"
    Image.fromarray(np.kron(digit, np.ones((3, 3), np.uint8))).save(png)  # 24x24: resized as in training
    result = run_cli("generate", str(run), "--image", str(png), "--max-new-tokens", "5", "--device", "cpu")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    result = run_cli("generate", str(run), "--prompt", "a handwritten digit one", "--image-out",
                     str(tmp_path / "x.png"), "--device", "cpu")
    assert result.returncode == 2 and "image generation needs the discrete route" in result.stderr
    assert not (tmp_path / "x.png").exists()
    result = run_cli("export", str(run), "--out", str(tmp_path / "hf"))
    assert result.returncode == 2 and "supports text-only families" in result.stderr
    assert not (tmp_path / "hf").exists()
