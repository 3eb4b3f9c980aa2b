"""Log-likelihood of continuations given contexts: the primitive behind multiple-choice
and cloze evaluation (lmforge's own tasks and the lm-evaluation-harness adapter)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.nn.transformer import Transformer


@torch.no_grad()
def score_continuations(
    model: Transformer, requests: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context), whether
    the continuation is the greedy choice at every position).

    A pair longer than the model's context keeps its most recent ``max_seq_len + 1`` tokens
    (the continuation always stays whole; it must fit). Requests are grouped by length so a
    batch wastes little padding; results come back in request order.
    """
    max_len = model.cfg.max_seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    prepared = []
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {index}: empty continuation")
        if len(continuation) > max_len:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the "
                             f"model's context ({max_len})")
        if not context:
            raise ValueError(f"request {index}: empty context (give at least one token, e.g. end-of-text)")
        full = (context + continuation)[-(max_len + 1):]
        prepared.append((index, full, len(continuation)))
    prepared.sort(key=lambda item: -len(item[1]))
    for first in range(0, len(prepared), batch_size):
        chunk = prepared[first:first + batch_size]
        width = len(chunk[0][1]) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (_, full, _) in enumerate(chunk):
            inputs[row, : len(full) - 1] = torch.tensor(full[:-1])
        logits = model(inputs.to(device)).logits[..., : model.cfg.vocab_size].float()
        log_probs = F.log_softmax(logits, dim=-1)
        for row, (index, full, n_cont) in enumerate(chunk):
            end = len(full) - 1
            positions = torch.arange(end - n_cont, end, device=device)
            targets = torch.tensor(full[-n_cont:], device=device)
            row_lp = log_probs[row, positions]
            total = float(row_lp.gather(-1, targets[:, None]).sum())
            greedy = bool((row_lp.argmax(dim=-1) == targets).all())
            results[index] = (total, greedy)
    model.train(was_training)
    return results  # type: ignore[return-value]
