"""The multimodal family end to end: `lmforge train` on the digits, its evaluation files, resume,
and `lmforge generate --image / --image-out` (slow: a real, tiny run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_config


def _config(tmp_path, steps: int, moe: bool = False) -> dict:
    model = {"family": "multimodal", "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64,
             "multimodal": {"images_per_label": 4, "eval_max_images": 50}}
    if moe:
        model["moe"] = {"n_experts": 2, "top_k": 1}
    return {"name": "mm", "runs_dir": str(tmp_path / "runs"),
            "data": {"out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.3,
                     "steps": ["read", "image_tokenizer", "tokenizer", "shards"],
                     "near_dedup": {"enabled": False}, "decontamination": {"enabled": False},
                     "image_tokenizer": {"patch_size": 2, "codebook_size": 32},
                     "sources": [{"name": "digits", "kind": "demo_digits", "max_documents": 300}]},
            "model": model,
            "train": {"steps": steps, "batch_size": 4, "seq_len": 64, "log_every": 2, "eval_every": 4,
                      "checkpoint_every": 4, "device": "cpu", "tensorboard": False},
            "eval": {"max_tokens_per_domain": 512, "task_items": 0, "position_bucket": 0, "sample_tokens": 4,
                     "sample_prompts": ["a handwritten"], "bootstrap_samples": 10}}


@pytest.mark.slow
def test_train_evaluate_resume_and_generate(tmp_path):
    config = write_config(tmp_path / "mm.yaml", _config(tmp_path, steps=8, moe=True))
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "mm"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    multimodal = [r for r in records if r["kind"] == "eval_multimodal"]
    assert [r["step"] for r in multimodal] == [4, 8]
    assert all(r["tokens_image"] > 0 and r["tokens_text"] > 0 and 0 <= r["caption_accuracy"] <= 1 for r in multimodal)
    assert set(multimodal[-1]["moe_expert_load"]) == {"text", "image"}
    final = json.loads((run / "eval" / "multimodal.json").read_text())
    assert final["generation"]["images"] == 40 and len(final["captions"]["confusion"]) == 10
    assert sum(map(sum, final["captions"]["confusion"])) == final["captions"]["images"]
    grid = Image.open(run / "eval" / "multimodal_samples.png")
    assert grid.size[1] > grid.size[0] / 2  # ten rows of images
    assert "Caption accuracy" in (run / "report.html").read_text()

    # resume continues the same run from its last checkpoint
    longer = write_config(tmp_path / "mm.yaml", _config(tmp_path, steps=10, moe=True))
    result = run_cli("train", str(longer), "--resume", "auto")
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps[-1] == 10

    from sklearn.datasets import load_digits

    digit = np.clip(np.rint(load_digits().images[0] * 255 / 16), 0, 255).astype(np.uint8)
    png = tmp_path / "zero.png"
    Image.fromarray(np.kron(digit, np.ones((3, 3), np.uint8))).save(png)  # 24x24: resized as in training
    result = run_cli("generate", str(run), "--image", str(png), "--max-new-tokens", "6", "--device", "cpu")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    out = tmp_path / "drawn.png"
    result = run_cli("generate", str(run), "--prompt", "a handwritten digit three", "--image-out", str(out),
                     "--image-scale", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (32, 32)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    result = run_cli("generate", str(run), "--image", str(tmp_path / "bad.png"), "--device", "cpu")
    assert result.returncode == 2 and "not an image" in result.stderr

    # lmforge eval adds caption loss and accuracy; the Hugging Face exporter refuses a multimodal model
    result = run_cli("eval", str(run), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "multimodal (discrete route)" in result.stdout
    record = json.loads((run / "eval" / "step_0000010.json").read_text())
    assert record["multimodal"]["bits_per_token_image"] > 0 and 0 <= record["multimodal"]["caption_accuracy"] <= 1
    result = run_cli("export", str(run), "--out", str(tmp_path / "hf"))
    assert result.returncode == 2 and "supports text-only families" in result.stderr


def test_generate_image_options_need_a_multimodal_model(tmp_path):
    from lmforge.core.errors import ConfigError
    from lmforge.serve.multimodal import load_image_tokenizer

    with pytest.raises(ConfigError, match="multimodal"):
        load_image_tokenizer(tmp_path, {"model": {"family": "transformer"}})
