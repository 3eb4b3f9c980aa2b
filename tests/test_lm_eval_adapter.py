"""Likelihood scoring and the lm-evaluation-harness adapter, offline with a local task."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.nn.config import ModelConfig
from lmforge.nn.scoring import score_continuations


def test_scores_equal_a_direct_computation_and_truncate_from_the_left():
    torch.manual_seed(0)
    model = ModelConfig.from_dict({"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                   "max_seq_len": 16}).build().eval()
    requests = [([1, 2, 3], [4, 5]), ([7], [8]), (list(range(1, 30)), [9, 10, 11])]
    scores = score_continuations(model, requests, batch_size=2)
    for (context, continuation), (total, greedy) in zip(requests, scores):
        full = (context + continuation)[-17:]
        with torch.no_grad():
            logits = model(torch.tensor([full[:-1]])).logits[0, :, :50]
        lp = F.log_softmax(logits, -1)
        n = len(continuation)
        expected = sum(float(lp[len(full) - 1 - n + i, t]) for i, t in enumerate(continuation))
        assert total == pytest.approx(expected, abs=1e-5)
        argmax = lp[len(full) - 1 - n:].argmax(-1).tolist()
        assert greedy == (argmax == continuation)
    with pytest.raises(ValueError, match="exceeds"):
        score_continuations(model, [([1], list(range(20)))])


def test_lm_eval_runs_a_local_task_end_to_end(tmp_path, tiny_corpus):
    pytest.importorskip("lm_eval")
    cfg = tiny_run_dict(tmp_path, tiny_corpus, train={"steps": 6, "batch_size": 4, "seq_len": 32, "log_every": 1,
                                                      "eval_every": 0, "checkpoint_every": 0, "tensorboard": False})
    config = write_config(tmp_path / "run.yaml", cfg)
    assert run_cli("train", str(config), "--no-report").returncode == 0
    rng = random.Random(0)
    words = "the king queen sword castle river night love war".split()
    docs = [{"context": " ".join(rng.choice(words) for _ in range(6)),
             "choices": [" " + " ".join(rng.choice(words) for _ in range(2)) for _ in range(3)],
             "answer": rng.randrange(3)} for _ in range(10)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "toy.yaml").write_text(
        "task: lmforge_toy_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'toy.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    run = tmp_path / "runs" / "tiny"
    result = run_cli("eval", str(run), "--lm-eval-tasks", "lmforge_toy_mc", "--lm-eval-include", str(tasks))
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(next((run / "eval").glob("*.lm_eval.json")).read_text())
    accuracy = written["lmforge_toy_mc"]["acc,none"]

    # The same accuracy computed directly from lmforge's scores: lm-eval adds nothing of its own.
    from lmforge.serve.lm_eval_adapter import LmforgeLM

    lm = LmforgeLM(str(run))
    correct = 0
    for doc in docs:
        # lm-eval asks for (context, target_delimiter + choice), the delimiter being " "
        pairs = [lm._encode_pair(doc["context"], " " + choice) for choice in doc["choices"]]
        scores = [s for s, _ in score_continuations(lm.model, pairs)]
        correct += int(max(range(3), key=scores.__getitem__) == doc["answer"])
    assert accuracy == pytest.approx(correct / len(docs))
