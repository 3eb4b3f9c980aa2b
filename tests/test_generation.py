"""Generation produces and returns every requested token: prompts longer than the context and
continuations past it slide the window; bad sampling options are clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.nn.config import ModelConfig
from lmforge.nn.generation import generate, sliding_window_keep

SMALL = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus):
    from conftest import run_cli, tiny_run_dict, write_config

    tmp = tmp_path_factory.mktemp("generate_run")
    cfg = tiny_run_dict(tmp, tiny_corpus, train={"steps": 4, "batch_size": 2, "seq_len": 32, "log_every": 1,
                                                 "eval_every": 0, "checkpoint_every": 0, "tensorboard": False})
    result = run_cli("train", str(write_config(tmp / "run.yaml", cfg)), "--no-report")
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny"


def _random_model(**extra):
    torch.manual_seed(0)
    return ModelConfig.from_dict({**SMALL, **extra}).build().eval()


def _reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The sliding-window policy without a KV cache: each token from a full forward pass over the
    window; a window that would pass max_seq_len restarts from the most recent tokens."""
    max_len, keep = model.cfg.max_seq_len, sliding_window_keep(model.cfg.max_seq_len)
    ids, start = list(prompt), max(0, len(prompt) - max_len)
    for _ in range(n):
        logits = model(torch.tensor([ids[start:]])).logits[0, -1, : model.cfg.vocab_size]
        ids.append(int(logits.argmax()))
        if len(ids) - start > max_len:
            start = len(ids) - keep
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len, n", [(5, 50), (40, 30), (16, 1), (1, 16)])
def test_cached_generation_slides_the_window_like_a_full_recompute(prompt_len, n):
    model = _random_model()
    prompt = torch.randint(0, SMALL["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, n, temperature=0)
    assert out.shape == (1, prompt_len + n)
    assert torch.equal(out[:, :prompt_len], prompt)  # the whole prompt, even past the context
    assert out[0, prompt_len:].tolist() == _reference_greedy(model, prompt[0].tolist(), n)


def test_batched_sampling_returns_every_token_for_every_row():
    model = _random_model(moe={"n_experts": 4, "top_k": 2})
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 20))
    out = generate(model, prompt, 45, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 65) and torch.equal(out[:, :20], prompt)
    assert int(out.max()) < SMALL["vocab_size"]  # padded vocabulary ids are never sampled


def test_empty_prompt_starts_from_the_end_of_text_token():
    model = _random_model()
    eos = 96
    out = generate(model, torch.empty(1, 0, dtype=torch.long), 10, temperature=0, eos_id=eos)
    assert 1 <= out.shape[1] <= 10  # only generated ids: the start token is not part of the result
    from_eos = generate(model, torch.tensor([[eos]]), 10, temperature=0, eos_id=eos)
    assert torch.equal(out, from_eos[:, 1:])
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(model, torch.empty(1, 0, dtype=torch.long), 10)


@pytest.mark.parametrize("option, value, match", [
    ("max_new_tokens", 0, "max_new_tokens"),
    ("max_new_tokens", -5, "max_new_tokens"),
    ("max_new_tokens", 2.5, "max_new_tokens"),
    ("temperature", math.nan, "temperature"),
    ("temperature", math.inf, "temperature"),
    ("temperature", -0.5, "temperature"),
    ("top_k", -3, "top_k"),
])
def test_bad_sampling_options_are_config_errors_naming_the_option(option, value, match):
    model = _random_model()
    options = {"max_new_tokens": 4, "temperature": 1.0, "top_k": None, option: value}
    with pytest.raises(ConfigError, match=match):
        generate(model, torch.tensor([[1, 2]]), **options)


def test_cli_prints_all_it_generated_past_the_context(trained_run, tiny_corpus):
    """The issue's reproduction: a prompt longer than the context and a continuation past it."""
    from conftest import run_cli
    from lmforge.serve.loading import load_for_inference

    model, tokenizer, _, _ = load_for_inference(trained_run, torch.device("cpu"))
    max_len = model.cfg.max_seq_len
    prompt = (tiny_corpus / "prose" / "doc_001.txt").read_text()[:300]
    prompt_ids = torch.tensor([tokenizer.encode(prompt)])
    assert prompt_ids.shape[1] > max_len
    n = 2 * max_len
    full = generate(model, prompt_ids, n, temperature=0)  # no eos: every token comes out
    assert full.shape[1] == prompt_ids.shape[1] + n
    with_eos = generate(model, prompt_ids, n, temperature=0, eos_id=tokenizer.eos_id)
    assert torch.equal(with_eos, full)  # this model does not end the text: all n tokens must be printed
    continuation = tokenizer.decode(full[0, prompt_ids.shape[1]:].tolist())
    assert continuation
    result = run_cli("generate", str(trained_run), "--prompt", prompt, "--max-new-tokens", str(n),
                     "--temperature", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + continuation + "\n"


def test_retro_generation_slides_by_chunks_and_starts_an_empty_prompt_from_eos(tmp_path, tiny_corpus):
    from conftest import tiny_run_dict
    from lmforge.data.config import DataConfig
    from lmforge.data.prepare import prepare_data
    from lmforge.nn.retro import RetroModelConfig
    from lmforge.retrieval.database import build_database
    from lmforge.retrieval.generation import generate_with_retrieval

    data = tiny_run_dict(tmp_path, tiny_corpus)["data"]
    prepare_data(DataConfig.from_dict(data))
    db = build_database(data["out_dir"], tmp_path / "db", chunk_len=8, embedder="bag_of_tokens:32")
    torch.manual_seed(0)
    model = RetroModelConfig.from_dict({**SMALL, "vocab_size": db.tokenizer.vocab_size, "max_seq_len": 32,
                                        "retro": {"chunk_len": 8, "n_neighbours": 2, "encoder_layers": 1}}).build()
    model.eval()
    long_prompt = db.tokenizer.encode((tiny_corpus / "prose" / "doc_002.txt").read_text()[:400])
    assert len(long_prompt) > 32
    out, used = generate_with_retrieval(model, db, long_prompt, 50, temperature=0)
    assert len(out) == 50 and len(used) == (len(long_prompt) + 49) // 8
    eos = db.tokenizer.eos_id
    out, used = generate_with_retrieval(model, db, [], 20, temperature=0.8, top_k=0, eos_id=eos,
                                        generator=torch.Generator().manual_seed(0))
    assert 1 <= len(out) <= 20 and (len(out) == 20 or out[-1] == eos)
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate_with_retrieval(model, db, [], 5)
    for bad in ({"max_new_tokens": 0}, {"temperature": math.nan}, {"top_k": -3}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            generate_with_retrieval(model, db, long_prompt, **{"max_new_tokens": 5, **bad})
