"""Sampled generations from fixed prompts, with their own RNG (never the training one)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.nn.generation import generate


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> list[dict[str, str]]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    samples = []
    for prompt in prompts:
        prompt_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
        out = generate(
            model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
            eos_id=tokenizer.eos_id, generator=generator,
        )
        samples.append({"prompt": prompt, "text": tokenizer.decode(out[0, prompt_ids.shape[1]:].tolist())})
    model.train(was_training)
    return samples
