"""lm-evaluation-harness adapter: run any ``lm-eval`` task on an lmforge run or checkpoint.

    lmforge eval runs/quickstart --lm-eval-tasks hellaswag            (online: tasks from the Hub)
    lmforge eval runs/quickstart --lm-eval-tasks my_task --lm-eval-include tasks/   (local YAML tasks)

or from Python: ``lm_eval.simple_evaluate(model=LmforgeLM("runs/quickstart"), tasks=[...])``.
Importing this module registers the model name ``lmforge`` with lm-eval, so
``--model lmforge --model_args pretrained=RUN`` works once it is imported.

Every request is answered as the harness's own Hugging Face backend (``--model hf``) answers
it for the model ``lmforge export`` writes, so scores can stand next to published ones
(``tests/test_lm_eval_parity.py`` checks it, request by request):

- ``loglikelihood``: the harness's own splitting (``TemplateLM``): all trailing whitespace of
  the context moves into the continuation, the joined text is encoded once and cut after the
  context's tokens, and an empty context is conditioned on end-of-text. Pairs longer than
  the model's context keep their most recent ``max_seq_len + 1`` tokens.
- ``loglikelihood_rolling``: the harness's windows (``lm_eval.utils.get_rolling_token_windows``
  with one token of context, made disjoint): the first window starts from end-of-text, each
  later one predicts up to ``max_seq_len`` new tokens and is filled up with the tokens before
  them, so the last window sees a full context.
- ``generate_until``: ``max_gen_toks`` (default 256) new tokens at most, greedy unless the task
  samples; the context keeps its last ``max_seq_len - max_gen_toks`` tokens; generation ends at
  end-of-text or once a stop string (``until``, plus end-of-text) appears, and the text is cut
  at the stop strings in the harness's order.

Requests are batched: log-likelihoods in length-sorted batches of ``batch_size``, generations
in batches of prompts with the same settings and the same number of tokens.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.data.tokenizer import EOS
from lmforge.nn.generation import generate
from lmforge.nn.scoring import score_continuations
from lmforge.serve.loading import load_for_inference

try:
    # The harness fills its model registry lazily, only while it is empty; registering
    # ``lmforge`` first would hide its own backends (``--model hf``) from this process.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # optional dependency
    raise LmforgeError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lmforge[eval]'") from exc

# Aliases of the generation length a task may give, in the harness's order of priority.
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class GenerationSettings:
    """One ``generate_until`` request's options, read as the harness reads them."""

    until: tuple[str, ...]    # stop strings, end-of-text last
    max_gen_toks: int
    temperature: float        # 0 is greedy
    top_k: int | None


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """The three request types lm-eval asks of a model, answered by an lmforge checkpoint."""

    max_gen_toks = 256  # the harness's hf backend default, when a task sets none

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 16, **_: Any):
        super().__init__()
        from lmforge.core.device import resolve_device

        self.model, self.tokenizer, self.run_config, self.checkpoint = load_for_inference(
            pretrained, resolve_device(device))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = self.model.cfg.max_seq_len

    # -- what TemplateLM needs to split loglikelihood requests as every harness backend does --

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # Documents follow end-of-text in training; the export names it the beginning of sequence too.
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer.encode(string)  # lmforge's tokenizer adds no special tokens

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """(request key, context ids, continuation ids) -> (log-likelihood, is greedy) each."""
        results = score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                      self.batch_size)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    # -- rolling log-likelihood (perplexity tasks) --

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, score_continuations(self.model, windows, self.batch_size)):
            totals[owner] += log_likelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation --

    def generation_settings(self, kwargs: Any) -> GenerationSettings:
        """A request's generation options: stop strings, length, temperature (greedy unless the
        task samples), as the harness normalizes them; bad options are a clear error."""
        if not isinstance(kwargs, dict):
            raise LmforgeError(f"generate_until: generation options must be a mapping, got {kwargs!r}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(stop, str) for stop in until):
            raise LmforgeError(f"generate_until: 'until' must be a string or a list of strings, got {until!r}")
        if EOS not in until:
            until.append(EOS)
        given = [kwargs[key] for key in _MAX_TOKEN_KEYS if kwargs.get(key) is not None]
        max_gen_toks = int(given[0]) if given else self.max_gen_toks
        if not 0 < max_gen_toks < self.max_length:
            raise LmforgeError(f"generate_until: max_gen_toks={max_gen_toks} must be at least 1 and below the "
                               f"model's context of {self.max_length} tokens (the prompt needs room)")
        temperature = float(kwargs.get("temperature", 0.0))
        do_sample = kwargs.get("do_sample")
        if not (temperature > 0 if do_sample is None else do_sample):
            temperature = 0.0
        top_k = kwargs.get("top_k")
        return GenerationSettings(tuple(until), max_gen_toks, temperature, int(top_k) if top_k else None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        batches: dict[tuple[str, int], list[int]] = defaultdict(list)
        prompts, settings = [], []
        for index, request in enumerate(requests):
            context, kwargs = request.args
            settings.append(self.generation_settings(kwargs))
            # The harness keeps the last max_length - max_gen_toks tokens, so prompt and
            # generation fit the model's context. An empty prompt starts from end-of-text.
            ids = self.tok_encode(context)[-(self.max_length - settings[-1].max_gen_toks):]
            prompts.append(ids or [self.eot_token_id])
            batches[(json.dumps(kwargs, sort_keys=True, default=str), len(prompts[-1]))].append(index)
        for members in batches.values():
            for first in range(0, len(members), self.batch_size):
                rows = members[first:first + self.batch_size]
                continuations = self._generate_batch([prompts[i] for i in rows], settings[rows[0]])
                for index, ids in zip(rows, continuations):
                    out[index] = cut_at_stops(self.tokenizer.decode(ids), settings[index].until)
                    self.cache_hook.add_partial("generate_until", requests[index].args, out[index])
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
        """New token ids for prompts of equal length, each ending before its first end-of-text
        or as soon as one of the stop strings appears in its text.

        Generation runs in growing chunks (16, 32, ... tokens) so a batch whose rows all
        stopped early does not run on to ``max_gen_toks``; finished rows leave the batch.
        """
        device = next(self.model.parameters()).device
        eos = self.eot_token_id
        tokens = torch.tensor(prompts, dtype=torch.long, device=device)
        new: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        remaining, chunk = settings.max_gen_toks, 16
        while active and remaining > 0:
            step = min(chunk, remaining)
            grown = generate(self.model, tokens, step, temperature=settings.temperature, top_k=settings.top_k,
                             eos_id=eos)
            fresh = grown[:, tokens.shape[1]:].tolist()
            still = []
            for position, row in enumerate(active):
                new[row] += fresh[position]
                if eos in new[row]:
                    new[row] = new[row][: new[row].index(eos)]
                elif not any(stop in self.tokenizer.decode(new[row]) for stop in settings.until if stop):
                    still.append(position)
            remaining -= len(fresh[0])
            if len(fresh[0]) < step:  # every row ended with end-of-text
                break
            tokens = grown[still]
            active = [active[position] for position in still]
            chunk *= 2
        return new


def cut_at_stops(text: str, until: tuple[str, ...] | list[str]) -> str:
    """The text before the stop strings, cut at each in turn as the harness does (the order
    matters when one stop string contains another)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


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
