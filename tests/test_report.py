"""report.html from a synthetic run directory, and tolerant metrics reading."""

from __future__ import annotations

import json

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.core.metrics_file import append_metrics, read_metrics
from lmforge.report import write_report


def _run_dir(tmp_path):
    run = tmp_path / "demo-run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("name: demo-run\n")
    for step in range(1, 21):
        append_metrics(run / "metrics.jsonl", {
            "kind": "train", "step": step, "tokens": step * 512, "loss": 8 - step * 0.1, "aux_loss": 0.02,
            "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 5000.0, "mfu": 0.2,
            "moe/expert_load": [0.25, 0.3, 0.2, 0.25],
        })
        if step % 10 == 0:
            append_metrics(run / "metrics.jsonl", {"kind": "eval", "step": step, "tokens": step * 512,
                                                   "loss": {"verse": 6.0, "python": 5.5},
                                                   "bpb": {"verse": 2.3456, "python": 1.9876}})
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 21, "lo')  # killed mid-write
    (run / "model_card.json").write_text(json.dumps({
        "architecture": "test", "params": {"total": 1000, "active": 600}, "flops_per_token": 3600,
        "peak_flops_source": "measured"}))
    (run / "eval" / "final.json").write_text(json.dumps({
        "bpb": {"verse": 2.3456, "python": 1.9876}, "isolation": {"overlap": 0, "heldout_docs": 7},
        "samples": [{"prompt": "x", "text": "<script>alert(1)</script>"}]}))
    return run


def test_read_metrics_skips_truncated_last_line(tmp_path):
    records = read_metrics(_run_dir(tmp_path) / "metrics.jsonl")
    assert len(records) == 22 and records[-1]["step"] == 20


def test_report_has_plots_numbers_and_escapes_samples(tmp_path):
    html = write_report(_run_dir(tmp_path)).read_text()
    assert html.count("data:image/png;base64,") >= 4  # loss, bpb, throughput, expert load, lr
    assert "verse" in html and "python" in html and "2.346" in html
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "0 of 7 held-out" in html


def test_report_on_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="run directory not found"):
        write_report(tmp_path / "nope")


def test_report_shows_guard_decisions_and_checkpoint_costs(tmp_path):
    run = _run_dir(tmp_path)
    # (the truncated line is the file's last: start the extra records on a new line)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("\n")
    append_metrics(run / "metrics.jsonl", {"kind": "train", "step": 21, "tokens": 21 * 512, "loss": 9.0,
                                           "step_time_s": 0.5, "skipped": "spike", "skipped_nonfinite": 2,
                                           "skipped_spike": 1, "rollbacks": 1})
    append_metrics(run / "metrics.jsonl", {"kind": "checkpoint", "step": 10, "seconds": 0.25, "path": "x"})
    append_metrics(run / "metrics.jsonl", {"kind": "checkpoint", "step": 20, "seconds": 0.1,
                                           "error": "disk full"})
    html = write_report(run).read_text()
    section = html[html.index("<h2>Reliability</h2>"):]
    assert "steps skipped: loss spike</td><td>1" in section
    assert "non-finite loss or gradient</td><td>2" in section
    assert "rollbacks to the last checkpoint</td><td>1" in section
    assert "failed saves (earlier checkpoints kept)</td><td>1" in section
    assert "step 21 (spike)" in section


def test_report_shows_what_each_data_step_removed(tmp_path):
    run = _run_dir(tmp_path)
    (run / "data_manifest.json").write_text(json.dumps({
        "sources": {"verse": {"train": {"documents": 80, "tokens": 1000, "bytes": 4000}}},
        "pipeline": {"verse": {"read": 91, "removed_empty": 0, "removed_duplicates": 7, "removed_near_duplicates": 35,
                               "removed_quality": {"min_words": 2}, "removed_contaminated": 4,
                               "input_problems": {}}}}))
    html = write_report(run).read_text()
    assert "<td>verse</td><td>91</td><td>0</td><td>7</td><td>35</td><td>min_words 2</td><td>4</td>" in html


def test_report_shows_heldout_intervals(tmp_path):
    run = _run_dir(tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("\n")
    interval = {"verse": [2.3012, 2.3987], "python": [1.9001, 2.0702]}
    append_metrics(run / "metrics.jsonl", {"kind": "eval", "step": 30, "loss": {"verse": 6.0, "python": 5.5},
                                           "bpb": {"verse": 2.35, "python": 1.98}, "bpb_interval": interval,
                                           "interval_level": 0.95})
    (run / "eval" / "final.json").write_text(json.dumps({
        "bpb": {"verse": 2.3456, "python": 1.9876}, "bpb_interval": interval, "interval_level": 0.95,
        "interval_unit": {"verse": "document", "python": "window"}, "eval_documents": {"verse": 6, "python": 3},
        "eval_tokens": {"verse": 16384, "python": 16384}}))
    html = write_report(run).read_text()
    section = html[html.index("<h2>Held-out bits-per-byte</h2>"):html.index("<h2>Curves</h2>")]
    assert "<td>verse</td><td>2.346</td><td>2.3012 - 2.3987</td><td>6</td><td>16,384</td><td>documents</td>" in section
    assert "windows (too few documents)" in section
    assert "2.3456 (95% interval 2.3012-2.3987)" in html  # the summary row


def test_report_says_when_there_is_no_heldout_bpb(tmp_path):
    run = _run_dir(tmp_path)
    (run / "eval" / "final.json").write_text(json.dumps({"bpb": {}, "samples": []}))
    html = write_report(run).read_text()
    section = html[html.index("<h2>Held-out bits-per-byte</h2>"):html.index("<h2>Curves</h2>")]
    assert "no held-out bits-per-byte" in section and "heldout_fraction" in section


def test_report_draws_the_planned_lr_curve_of_the_config(tmp_path):
    from lmforge.optim.config import OptimConfig
    from lmforge.optim.schedules import lr_curve
    from lmforge.report.run_data import load_run

    run = _run_dir(tmp_path)
    optim = {"lr": 0.002, "schedule": "wsd", "warmup_steps": 2, "decay_steps": 5, "cooldown": "1-sqrt"}
    (run / "config.yaml").write_text(f"name: demo-run\noptim: {json.dumps(optim)}\ntrain: {{steps: 20}}\n")
    data = load_run(run)
    expected = [0.002 * m for m in lr_curve(20, OptimConfig.from_dict(optim))]  # type: ignore[arg-type]
    assert data.planned_lr == expected and data.planned_lr[-1] == pytest.approx(0.0002)
    html = write_report(run).read_text()
    assert 'alt="learning rate"' in html
    assert ("learning-rate schedule</td><td>wsd, 1-sqrt cooldown over the last 5 steps to 0.1 x peak; "
            "warmup 2 steps; peak lr 0.002</td>") in html


def test_report_plans_the_lr_curve_without_logged_lr_and_notes_a_bad_schedule(tmp_path):
    from lmforge.report import plots
    from lmforge.report.run_data import load_run

    run = tmp_path / "no-lr"
    run.mkdir()
    (run / "config.yaml").write_text("optim: {schedule: cosine, warmup_steps: 3}\ntrain: {steps: 30}\n")
    append_metrics(run / "metrics.jsonl", {"kind": "train", "step": 10, "loss": 5.0})
    data = load_run(run)
    assert data.planned_lr is not None and len(data.planned_lr) == 30 and plots.lr_plot(data) is not None
    # A schedule the config cannot lay out in train.steps: the report still renders, and says why.
    (run / "config.yaml").write_text("optim: {schedule: wsd, warmup_steps: 3, decay_steps: 40}\ntrain: {steps: 30}\n")
    data = load_run(run)
    assert data.planned_lr is None and plots.lr_plot(data) is None
    html = write_report(run).read_text()
    assert "planned learning-rate curve not drawn: optim.warmup_steps (3) + optim.decay_steps (40) exceed" in html
