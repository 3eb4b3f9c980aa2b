"""The eval guard: a paired per-document comparison of held-out loss with and without retrieval,
and the reading benchmark's construction (no answer is a verbatim continuation)."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.eval.facts import accuracy_interval, benchmark_items
from lmforge.eval.facts_reading import check_not_verbatim, make_reading_entities, reading_questions
from lmforge.eval.retrieval_guard import paired_difference_interval, retrieval_guard


def _domain(rng: np.random.Generator, n_docs: int, shift: float) -> dict[str, np.ndarray]:
    """Documents of very different difficulty (the spread a paired test removes), and retrieval
    adding ``shift`` nats per byte to every one of them, plus a little noise."""
    size = rng.integers(500, 5000, n_docs).astype(float)
    without = size * rng.uniform(1.0, 3.0, n_docs)
    with_ = without + size * (shift + rng.normal(0, 0.002, n_docs))
    return {"doc_without": without, "doc_with": with_, "doc_bytes": size,
            "window_without": without, "window_with": with_, "window_bytes": size}


def test_a_small_consistent_rise_is_flagged_plainly_and_noise_is_not():
    rng = np.random.default_rng(0)
    guard = retrieval_guard({"code": _domain(rng, 12, 0.01), "prose": _domain(rng, 12, 0.0)})
    code, prose = guard["domains"]["code"], guard["domains"]["prose"]
    assert code["retrieval_hurts"] and code["interval"][0] > 0 and code["unit"] == "document"
    assert not prose["retrieval_hurts"] and not prose["retrieval_helps"]
    assert prose["interval"][0] < 0 < prose["interval"][1]
    assert guard["retrieval_hurts"] == ["code"]
    first = guard["message"].splitlines()[0]
    assert first.startswith("WARNING: retrieval makes held-out code worse") and "beyond the noise" in first
    assert "prose" in guard["message"] and "within noise" in guard["message"]
    # the unpaired view would miss it: the per-condition spread between documents is far wider
    spread = np.ptp(_domain(np.random.default_rng(1), 12, 0.0)["doc_without"] / (np.log(2) * 2500))
    assert spread > 10 * (code["interval"][1] - code["interval"][0])


def test_a_consistent_gain_is_reported_as_help_and_few_documents_fall_back_to_windows():
    rng = np.random.default_rng(1)
    guard = retrieval_guard({"code": _domain(rng, 3, -0.02)})
    code = guard["domains"]["code"]
    assert code["retrieval_helps"] and not code["retrieval_hurts"] and code["unit"] == "window"
    assert "improves" in guard["message"] and not guard["retrieval_hurts"]


def test_paired_interval_point_and_errors():
    diff, low, high = paired_difference_interval(np.array([10.0, 20.0]), np.array([10.0, 20.0]), np.array([5, 5]))
    assert diff == 0.0 and low == 0.0 and high == 0.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference_interval(np.ones(3), np.ones(2), np.ones(3))


def test_reading_questions_never_hold_their_answer_verbatim_and_have_distractors():
    people = make_reading_entities(12, seed=3)
    towns = [p["town"] for p in people] + [p["distractor"]["town"] for p in people]
    assert len(set(towns)) == len(towns)  # a reverse question has one answer
    items = reading_questions(people, seed=3)
    assert {i["kind"] for i in items} == {"reordered", "reverse", "description"}
    for person in people:
        mine = [i for i in items if i["entity"] == person["name"]]
        assert len(mine) == 6 and all(i["answer"] == 0 and len(set(i["candidates"])) == 4 for i in mine)
        for item in mine:  # the distractor's value is always a wrong candidate
            assert item["candidates"][1].strip() == str(person["distractor"][item["attribute"]])
    verbatim_docs, verbatim_items = benchmark_items("verbatim", 4, 0)
    with pytest.raises(ValueError, match="occurs verbatim"):
        check_not_verbatim(verbatim_items, [text for _, text in verbatim_docs])
    with pytest.raises(Exception, match="unknown variant 'cloze'"):
        benchmark_items("cloze", 4, 0)


def test_accuracy_interval_resamples_whole_entities():
    scores = [1.0, 1.0, 0.0, 0.0] * 10
    clusters = [i // 2 for i in range(40)]  # each entity all right or all wrong
    low, high = accuracy_interval(scores, clusters)
    assert low < 0.5 < high and high - low > 0.2
    assert accuracy_interval([1.0] * 8, list(range(8))) == (1.0, 1.0)


def test_the_run_report_says_so_plainly_when_retrieval_hurts(tmp_path):
    import json

    from lmforge.core.metrics_file import append_metrics
    from lmforge.report import write_report

    run = tmp_path / "retro-run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("name: retro-run\n")
    append_metrics(run / "metrics.jsonl", {"kind": "train", "step": 1, "tokens": 512, "loss": 7.0})
    rng = np.random.default_rng(0)
    guard = retrieval_guard({"code": _domain(rng, 12, 0.01), "prose": _domain(rng, 12, 0.0)})
    (run / "eval" / "final.json").write_text(json.dumps({"bpb": {"code": 2.3, "prose": 2.4},
                                                         "retrieval_guard": guard}))
    html = write_report(run).read_text()
    assert '<p class="warning">WARNING: retrieval makes held-out code worse' in html
    assert "held-out prose by" in html and "within noise" in html
