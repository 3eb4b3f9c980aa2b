"""Render ``report.html``: one self-contained page (inline CSS, plots as base64 PNG)."""

from __future__ import annotations

import datetime
from html import escape
from pathlib import Path
from typing import Any

from lmforge.core.io import atomic_write_text
from lmforge.report.multimodal import multimodal_section
from lmforge.report import plots
from lmforge.report.run_data import RunData, load_run

STYLE = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .7em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;white-space:pre-wrap}
.note{color:#777;font-size:.9em}.grid{display:grid;grid-template-columns:1fr 1fr;gap:.5em}
.warning{color:#b00000;font-weight:bold}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str | None, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">' if data else ""


def _summary(run: RunData) -> str:
    rows: list[list[Any]] = []
    if run.train:
        last = run.train[-1]
        rows += [["final train loss", last["loss"]], ["steps", last["step"]], ["tokens trained", last.get("tokens", 0)]]
        rates = [r["tokens_per_s"] for r in run.train if "tokens_per_s" in r]
        if rates:
            rows.append(["mean tokens/s", sum(rates) / len(rates)])
            mfus = [r.get("mfu", 0.0) for r in run.train]
            rows.append(["mean MFU", f"{100 * sum(mfus) / len(mfus):.2f}%"])
    if run.lr_schedule:
        rows.append(["learning-rate schedule", run.lr_schedule])
    if run.time_budget:
        budget = run.time_budget
        rows.append(["time budget", f"{budget['budget_s']:g} s: {budget['total_steps']} of at most "
                     f"{budget['planned_steps']} steps at a median {budget['median_step_s']:.3f} s a step"])
    final = run.final or (run.evals[-1] if run.evals else None)
    if final:
        for domain, value in final.get("bpb", {}).items():
            interval = final.get("bpb_interval", {}).get(domain)
            rows.append([f"held-out bits/byte: {domain}", f"{value:.4f} ({_interval_text(final, interval)})"
                         if interval else value])
    if run.model_card:
        params = run.model_card.get("params", {})
        rows += [["parameters (total)", params.get("total", "?")], ["parameters (active/token)", params.get("active", "?")],
                 ["FLOPs per token (training)", run.model_card.get("flops_per_token", "?")]]
    return _table(["", "value"], rows)


def _interval_text(record: dict[str, Any], interval: list[float]) -> str:
    return f"{100 * record.get('interval_level', 0.95):.0f}% interval {interval[0]:.4f}-{interval[1]:.4f}"


def _heldout(run: RunData) -> str:
    """The final held-out bits-per-byte per domain with its interval, and what it rests on."""
    final = run.final or (run.evals[-1] if run.evals else None)
    if not final or not final.get("bpb"):
        return ('<p class="note">no held-out bits-per-byte: no evaluation ran, or the data has no held-out '
                'documents (raise data.heldout_fraction, or a source\'s heldout_fraction)</p>')
    level = f"{100 * final.get('interval_level', 0.95):.0f}%"
    rows = []
    for domain, value in final["bpb"].items():
        interval = final.get("bpb_interval", {}).get(domain)
        unit = final.get("interval_unit", {}).get(domain, "")
        rows.append([domain, value, f"{interval[0]:.4f} - {interval[1]:.4f}" if interval else "-",
                     final.get("eval_documents", {}).get(domain, "-"), final.get("eval_tokens", {}).get(domain, "-"),
                     {"document": "documents", "window": "windows (too few documents)"}.get(unit, "-")])
    guard = final.get("retrieval_guard")  # RETRO runs: retrieval on vs off, paired by document
    guard_html = "".join(f'<p class="{"warning" if line.startswith("WARNING") else "note"}">{escape(line)}</p>'
                         for line in guard["message"].splitlines()) if guard else ""
    return (_table(["domain", "bits/byte", f"{level} interval", "documents scored", "tokens scored", "resampled"],
                   rows) + guard_html
            + f'<p class="note">The {level} interval is a percentile bootstrap over the held-out documents '
              '(their summed loss and bytes resampled with replacement; lmforge/eval/bootstrap.py): it shows how '
              'much the number depends on which documents happen to be held out. Runs whose intervals do not '
              'overlap clearly differ; overlapping intervals do not make runs equal, as much of the spread '
              'between documents is common to two runs scored on the same documents.</p>')


def _model_card(card: dict[str, Any] | None) -> str:
    if not card:
        return '<p class="note">no model card</p>'
    params = card.get("params", {})
    rows = [["architecture", card.get("architecture", "")]] + [[f"parameters: {k}", v] for k, v in params.items()]
    rows += [["FLOPs per token", card.get("flops_per_token", "")], ["formula", card.get("flops_per_token_formula", "")],
             ["sequence length", card.get("seq_len", "")], ["vocabulary", card.get("vocab_size", "")],
             ["device", card.get("device", "")], ["MFU measured against", card.get("peak_flops_source", "")]]
    return _table(["", ""], rows)


def _data(manifest: dict[str, Any] | None, final: dict[str, Any] | None) -> str:
    manifest = manifest or {}
    rows = []
    origin = manifest.get("data_origin", {})  # real vs synthetic (lmforge synth), per source
    for source, splits in manifest.get("sources", {}).items():
        kind = origin.get("by_source", {}).get(source, {}).get("origin", "real")
        for split, info in splits.items():
            if isinstance(info, dict):
                rows.append([source, kind, split, info.get("documents", ""), info.get("tokens", ""),
                             info.get("bytes", "")])
    out = (_table(["source", "origin", "split", "documents", "tokens", "bytes"], rows)
           if rows else '<p class="note">no data manifest</p>')
    tokens = origin.get("train_tokens")
    if tokens:
        teachers = "; ".join(f"{name}: {escape(str((info.get('provenance') or {}).get('teacher')))}"
                             for name, info in origin.get("by_source", {}).items() if info.get("origin") == "synthetic")
        out += (f"<p>Training tokens: {tokens.get('real', 0)} real, {tokens.get('synthetic', 0)} synthetic "
                f"({100 * origin.get('synthetic_share_of_train_tokens', 0.0):.1f}% synthetic)."
                + (f' <span class="note">Teachers: {teachers}</span>' if teachers else "") + "</p>")
    steps = []
    for source, p in manifest.get("pipeline", {}).items():
        quality = p.get("removed_quality", {})
        quality_text = (", ".join(f"{rule} {n}" for rule, n in quality.items()) or "0") if isinstance(quality, dict) else quality
        steps.append([source, p.get("read", ""), p.get("removed_empty", ""), p.get("removed_duplicates", ""),
                      p.get("removed_near_duplicates", ""), quality_text, p.get("removed_contaminated", ""),
                      len(p.get("input_problems") or {})])
    if steps:
        out += _table(["source", "documents read", "empty", "exact duplicates", "near-duplicates",
                       "quality filters (by rule)", "contaminated (eval n-gram hits)", "files with input problems"],
                      steps)
    iso = (final or {}).get("isolation") or manifest.get("isolation")
    if iso:
        out += (f"<p>Isolation check: {iso.get('overlap', '?')} of {iso.get('heldout_docs', '?')} held-out "
                "documents found in the training data (documents are split by a hash of their content).</p>")
    return out


def _reliability(run: RunData) -> str:
    """Stability-guard decisions and checkpoint saves: what the run survived and what it cost."""
    last = run.train[-1] if run.train else {}
    skipped = [r for r in run.train if "skipped" in r]
    saves = [c for c in run.checkpoints if "error" not in c]
    failed = [c for c in run.checkpoints if "error" in c]
    step_time = sum(r.get("step_time_s", 0.0) for r in run.train)
    save_time = sum(c.get("seconds", 0.0) for c in saves)
    rows: list[list[Any]] = [
        ["steps skipped: non-finite loss or gradient", last.get("skipped_nonfinite", 0)],
        ["steps skipped: loss spike", last.get("skipped_spike", 0)],
        ["rollbacks to the last checkpoint", last.get("rollbacks", 0)],
        ["checkpoints saved", len(saves)],
        ["seconds per checkpoint save (mean)", save_time / len(saves) if saves else "-"],
        ["checkpoint time / (step time of logged steps + checkpoint time)",
         f"{100 * save_time / (step_time + save_time):.1f}%" if saves and step_time else "-"],
        ["failed saves (earlier checkpoints kept)", len(failed)],
    ]
    out = _table(["", "value"], rows)
    if skipped:
        items = ", ".join(f"step {r['step']} ({r['skipped']})" for r in skipped[:50])
        out += f"<p>Skipped updates: {escape(items)}.</p>"
    return out


def _tasks(final: dict[str, Any] | None) -> str:
    tasks = (final or {}).get("tasks") or {}
    if not tasks:
        return '<p class="note">no downstream tasks were evaluated</p>'
    def part(t: dict[str, Any], label: str) -> str:
        p = t.get(label) or {}
        return f"{p['acc']:.3f} ({p['items']})" if p.get("items") else "-"

    rows = [[name, t["acc"], t["acc_norm"], t["chance"], t["items"], part(t, "clean"), part(t, "dirty"), t["hash"]]
            for name, t in tasks.items()]
    return (_table(["task (held-out, multiple choice)", "acc", "acc_norm", "chance", "items",
                    "acc on clean items (n)", "acc on dirty items (n)", "items hash"], rows)
            + '<p class="note">Built from held-out documents: the true next line (verse/prose) or statement '
              '(Python) among distractors of similar length; see lmforge/eval/tasks.py. Dirty items share a '
              '13-gram of normalized words with the training data.</p>')


def _lineage(lineage: dict[str, Any] | None) -> str:
    """Where a continued run's weights came from (lineage.json), parent first."""
    if not lineage:
        return ""
    rows = []
    while lineage:
        rows.append([lineage.get("parent_name") or "?", lineage.get("checkpoint", "?"), lineage.get("parent_step", "?"),
                     ", ".join(lineage.get("took", [])), str(lineage.get("checkpoint_manifest_sha256", ""))[:16],
                     str(lineage.get("parent_data_fingerprint") or "-")[:16]])
        lineage = lineage.get("parent_lineage")
    return ("<h2>Lineage</h2>" + _table(["ancestor", "checkpoint", "step", "taken", "checkpoint sha256",
                                         "its data fingerprint"], rows)
            + '<p class="note">This run started from the checkpoint above (--init-from); earlier rows are '
              "its parent's ancestors.</p>")


def _long_context(run: RunData) -> str:
    """Loss by position and the newest passkey grid (eval/final.json and `lmforge eval` files)."""
    if not run.long_context:
        return ""
    out = "<h2>Long context: is the context used?</h2>"
    curve = plots.position_loss_plot(run)
    if curve:
        out += (_img(curve, "held-out loss by position")
                + '<p class="note">Mean held-out loss of the targets in each bucket of positions of the evaluation '
                  'windows (lmforge/eval/positions.py), from the same forward passes as the bits-per-byte above. '
                  'A model that uses its context has a falling curve; one that ignores it, a flat one.</p>')
    named = [(name, r["passkey"]) for name, r in run.long_context if r.get("passkey")]
    if named:
        name, grid = named[-1]
        rows = [[variant, length, sum(acc) / len(acc), sum(exact) / len(exact)] if None not in acc
                else [variant, length, "too short", "-"]
                for variant, v in sorted(grid["variants"].items(), key=lambda item: item[1]["pairs"])
                for length, acc, exact in zip(grid["lengths"], v["accuracy"], v["exact_match"])]
        out += (f"<p>Passkey retrieval ({escape(name)}): accuracy by likelihood among {grid['candidates']} "
                f"candidates (chance {grid['chance']:.2f}), {grid['items_per_cell']} items per cell, held-out keys "
                f"and values, {escape(str(grid['filler']))} filler.</p>"
                + _img(plots.passkey_heatmap(grid), "passkey accuracy by length and depth")
                + _table(["variant", "length (tokens)", "accuracy (mean over depths)", "exact match (greedy)"], rows)
                + '<p class="note">lmforge/eval/passkey.py; docs/long_context.md.</p>')
    return out


def _samples(final: dict[str, Any] | None) -> str:
    samples = (final or {}).get("samples") or []
    if not samples:
        return '<p class="note">no samples</p>'
    return "".join(f"<pre><b>{escape(s['prompt'])}</b>{escape(s['text'])}</pre>" for s in samples)


def render(run: RunData) -> str:
    name = run.path.name
    figures = [
        _img(plots.loss_plot(run), "loss"), _img(plots.bpb_plot(run), "bits per byte"),
        _img(plots.throughput_plot(run), "throughput"), _img(plots.expert_load_plot(run), "expert load"),
        _img(plots.lr_plot(run), "learning rate"), _img(plots.forgetting_plot(run), "change from the parent"),
    ]
    version = run.code_version or {}
    dirty = " (with uncommitted changes, see code.diff)" if version.get("dirty") else ""
    notes = "".join(f"<li>{escape(n)}</li>" for n in run.notes)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lmforge run {escape(name)}</title>
<style>{STYLE}</style></head><body>
<h1>lmforge run: {escape(name)}</h1>
<p class="note">report written {datetime.datetime.now().isoformat(timespec="seconds")} from {escape(str(run.path))}</p>
<h2>Summary</h2>{_summary(run)}
<h2>Held-out bits-per-byte</h2>{_heldout(run)}
<h2>Curves</h2><div class="grid">{"".join(f"<div>{f}</div>" for f in figures if f)}</div>
{_lineage(run.lineage)}
<h2>Model card</h2>{_model_card(run.model_card)}
<h2>Reliability</h2>{_reliability(run)}
<h2>Data</h2>{_data(run.manifest, run.final)}
<h2>Downstream tasks</h2>{_tasks(run.final)}
{_long_context(run)}
{multimodal_section(run.path)}
<h2>Samples</h2>{_samples(run.final)}
<h2>Code version</h2><p>lmforge {escape(str(version.get("version", "?")))}, commit
<code>{escape(str(version.get("commit")))}</code>{dirty}</p>
<h2>Config</h2><details><summary>resolved config.yaml</summary><pre>{escape(run.config_yaml or "(missing)")}</pre></details>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""


def write_report(run_dir: Path) -> Path:
    run = load_run(Path(run_dir))
    return atomic_write_text(run.path / "report.html", render(run))
