"""lm-evaluation-harness adapter: run any ``lm-eval`` task on an lmforge run or checkpoint.

    lmforge eval runs/quickstart --lm-eval-tasks hellaswag            (online: tasks from the Hub)
    lmforge eval runs/quickstart --lm-eval-tasks my_task --lm-eval-include tasks/   (local YAML tasks)

or from Python: ``lm_eval.simple_evaluate(model=LmforgeLM("runs/quickstart"), tasks=[...])``.
Importing this module registers the model name ``lmforge`` with lm-eval, so
``--model lmforge --model_args pretrained=RUN`` works once it is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.nn.generation import generate
from lmforge.nn.scoring import score_continuations
from lmforge.serve.loading import load_for_inference

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # optional dependency
    raise LmforgeError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from exc


@register_model("lmforge")
class LmforgeLM(LM):
    """The three request types lm-eval asks of a model, answered by an lmforge checkpoint."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 16, **_: Any):
        super().__init__()
        from lmforge.core.device import resolve_device

        self.model, self.tokenizer, self.run_config, self.checkpoint = load_for_inference(
            pretrained, resolve_device(device))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = self.model.cfg.max_seq_len

    def _context_ids(self, text: str) -> list[int]:
        # An empty context is conditioned on end-of-text, the document boundary the model knows.
        return self.tokenizer.encode(text) if text else [self.tokenizer.eos_id]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._split(*request.args) for request in requests]
        return score_continuations(self.model, pairs, self.batch_size)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as they fall in running text: trailing spaces
        move to the continuation, and the joined text is encoded once and cut after the context."""
        if not context:
            return [self.tokenizer.eos_id], self.tokenizer.encode(continuation)
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self.tokenizer.encode(continuation)
        return ctx or [self.tokenizer.eos_id], cont or self.tokenizer.encode(continuation)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ids = self.tokenizer.encode(text)
            pairs, start = [], 0
            # Non-overlapping windows, each conditioned on the tokens just before it.
            while start < len(ids):
                piece = ids[start:start + self.max_length]
                context = ids[max(0, start - 1):start] or [self.tokenizer.eos_id]
                pairs.append((context, piece))
                start += len(piece)
            out.append(sum(lp for lp, _ in score_continuations(self.model, pairs, self.batch_size)))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 128))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = torch.tensor([self._context_ids(context)], device=next(self.model.parameters()).device)
            ids = generate(self.model, prompt, max_new, temperature=temperature, eos_id=self.tokenizer.eos_id)
            text = self.tokenizer.decode(ids[0, prompt.shape[1]:].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def run_lm_eval(target: str | Path, tasks: list[str], include: str | None = None, limit: int | None = None,
                device: str = "cpu") -> dict[str, Any]:
    """Evaluate with lm-eval's Python API; returns its per-task results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include) if include else TaskManager()
    results = lm_eval.simple_evaluate(model=LmforgeLM(str(target), device=device), tasks=tasks,
                                      task_manager=manager, limit=limit)
    if results is None:
        raise LmforgeError("lm-eval returned no results")
    return results["results"]
