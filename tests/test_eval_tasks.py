"""Held-out multiple-choice tasks: construction is deterministic, well-formed and uses only
held-out text; scoring ranks a memorised answer first."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.eval.tasks import TaskItem, evaluate_tasks, next_line_items, next_statement_items

VERSE = "\n".join(f"Line number {i} of the poem, with words enough" for i in range(60))
CODE = "\n".join(
    f"def function_{i}(x):\n    total = x * {i}\n    total += {i + 1}\n    result = total - {i + 2}\n    return result\n"
    for i in range(20))


def test_next_line_items_are_deterministic_and_well_formed():
    items = next_line_items([VERSE], n_items=10, seed=3)
    assert items == next_line_items([VERSE], n_items=10, seed=3)
    assert items != next_line_items([VERSE], n_items=10, seed=4)
    lines = VERSE.splitlines()
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        target = item.choices[item.answer]
        index = lines.index(target)
        assert item.context == "\n".join(lines[index - 4:index]) + "\n"


def test_next_statement_items_keep_indentation_and_show_the_signature():
    items = next_statement_items([CODE], n_items=10, seed=0)
    assert len(items) == 10
    for item in items:
        assert item.context.startswith("def function_")
        indents = {c[: len(c) - len(c.lstrip())] for c in item.choices}
        assert indents == {"    "}  # whitespace gives nothing away
        assert item.choices[item.answer] in CODE.splitlines()


def test_scoring_prefers_what_the_model_memorised():
    torch.manual_seed(0)
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.nn.config import ModelConfig

    text = "alpha beta gamma delta\n"
    tok = Tokenizer.train([text * 50, "zeta eta theta iota\n" * 5], vocab_size=280)
    model = ModelConfig.from_dict({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                   "max_seq_len": 32}).build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([tok.encode(text * 4)])
    for _ in range(60):
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    item = TaskItem("alpha beta gamma delta\n", ["zeta eta theta iota", "alpha beta gamma delta"], 1)
    result = evaluate_tasks(model, tok, {"memorised": [item]})["memorised"]
    assert result["acc"] == 1.0 and result["items"] == 1 and result["chance"] == 0.5


def test_training_and_eval_report_task_scores(tmp_path, tiny_corpus):
    cfg = tiny_run_dict(tmp_path, tiny_corpus, eval={"max_tokens_per_domain": 256, "sample_tokens": 4,
                                                     "sample_prompts": ["the "], "task_items": 8})
    config = write_config(tmp_path / "run.yaml", cfg)
    assert run_cli("train", str(config)).returncode == 0
    final = json.loads((tmp_path / "runs" / "tiny" / "eval" / "final.json").read_text())
    assert set(final["tasks"]) == {"prose_next_line", "code_next_statement"}
    for score in final["tasks"].values():
        assert 0 <= score["acc"] <= 1 and score["items"] + score["skipped_too_long"] == 8
        assert score["items"] > 0 and score["chance"] == 0.25
        assert score["clean"]["items"] + score["dirty"]["items"] == score["items"]
    assert "Downstream tasks" in (tmp_path / "runs" / "tiny" / "report.html").read_text()
    result = run_cli("eval", str(tmp_path / "runs" / "tiny"))
    assert result.returncode == 0, result.stderr
    assert "task code_next_statement: acc" in result.stdout


def test_items_sharing_a_13gram_with_training_data_are_scored_as_dirty():
    from lmforge.data.ngrams import text_ngram_hashes
    from lmforge.eval.tasks import dirty_items

    seen = TaskItem("one two three four five six seven eight\n", ["nine ten eleven twelve thirteen", "x y"], 0)
    unseen = TaskItem("alpha beta gamma\n", ["delta", "epsilon"], 0)
    train = np.unique(text_ngram_hashes("zero one two three four five six seven eight nine ten eleven twelve "
                                        "thirteen fourteen", 13))
    assert dirty_items([seen, unseen], train) == [True, False]
    # only the true answer counts: a distractor that appears in training data does not
    decoy = TaskItem(seen.context, ["x y", "nine ten eleven twelve thirteen"], 0)
    assert dirty_items([decoy], train) == [False]
