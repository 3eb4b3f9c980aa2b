"""The report's multimodal section: losses by modality, caption accuracy and its confusion matrix,
and a grid of images generated per prompt (from eval/multimodal.json, eval/multimodal_samples.png
and the ``eval_multimodal`` records of metrics.jsonl; train/multimodal_family.py writes them)."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == "eval_multimodal":
            out.append(record)
    return out


def _cell(value: Any) -> str:
    if value is None:  # image bits/token of the continuous routes: images are never targets there
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def multimodal_section(run_dir: Path) -> str:
    """HTML for a multimodal run; empty for any other run."""
    run_dir = Path(run_dir)
    final_path = run_dir / "eval" / "multimodal.json"
    records = _records(run_dir)
    if not final_path.is_file() and not records:
        return ""
    out = "<h2>Multimodal: text and image tokens</h2>"
    if records:
        rows = "".join(
            "<tr>" + "".join(f"<td>{_cell(r.get(k, '-'))}</td>" for k in
                             ("step", "bits_per_token_text", "bits_per_token_caption", "bits_per_token_image",
                              "caption_accuracy")) + "</tr>"
            for r in records)
        route = records[-1].get("route", "discrete")
        out += ("<table><tr><th>step</th><th>text bits/token</th><th>caption after image bits/token</th>"
                f"<th>image bits/token</th><th>caption accuracy</th></tr>{rows}</table><p class=\"note\">Route "
                f"{escape(str(route))}. Held-out images, both orders (caption then image, image then caption); "
                "begin/end-image count as image tokens"
                + ("; image positions are never predicted on this route (n/a)." if route != "discrete" else ".")
                + "</p>")
    try:
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        final = {}
    captions = final.get("captions")
    if captions:
        labels = captions["labels"]
        head = "".join(f"<th>{escape(label)}</th>" for label in labels)
        body = "".join(f"<tr><th>{escape(label)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                       for label, row in zip(labels, captions["confusion"]))
        out += (f"<p>Caption accuracy {captions['accuracy']:.3f} on {captions['images']} held-out images "
                f"(chance {captions['chance']:.2f}): the most likely of the captions "
                f"<code>{escape(captions['template'])}</code>. Confusion matrix (rows: true, columns: predicted):</p>"
                f"<table><tr><th></th>{head}</tr>{body}</table>")
    generation = final.get("generation")
    if generation:
        per_label = ", ".join(f"{escape(k)} {v:.2f}" for k, v in generation["per_label"].items())
        out += (f"<p>Generated images classified as their prompt's label: {generation['accuracy']:.3f} "
                f"({generation['images']} images, temperature {generation['temperature']}); per label: {per_label}. "
                f"Classifier: {escape(generation['classifier'])} ({generation['classifier_heldout_images']} images, "
                f"own cross-validated accuracy {generation['classifier_cross_validated_accuracy']:.3f}).</p>")
    load = final.get("moe_expert_load")
    if load:
        out += "<p>MoE expert load by modality (share of routed token-slots): " + "; ".join(
            f"{escape(k)} {', '.join(f'{v:.3f}' for v in values)}" for k, values in load.items()) + "</p>"
    grid = run_dir / "eval" / "multimodal_samples.png"
    if grid.is_file():
        data = base64.b64encode(grid.read_bytes()).decode("ascii")
        out += (f'<p>Generated images, one row per prompt (first ten of each):</p>'
                f'<img alt="generated images per prompt" src="data:image/png;base64,{data}">')
    return out
