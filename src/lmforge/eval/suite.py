"""The end-of-run evaluation, shared by the trainer's final evaluation and ``lmforge eval``:
held-out loss and bits-per-byte per domain (and by position in the window), samples, held-out
multiple-choice tasks, the passkey grid when configured, and the isolation check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.logging import get_logger
from lmforge.data.heldout_check import MIN_HELDOUT_DOCUMENTS
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.config import EvalConfig
from lmforge.eval.heldout import evaluate_heldout
from lmforge.eval.isolation import isolation_report
from lmforge.eval.passkey import describe_passkey, evaluate_passkey
from lmforge.eval.positions import buckets_by_domain, describe_buckets
from lmforge.eval.samples import sample_texts
from lmforge.eval.tasks import build_tasks, evaluate_tasks, training_ngrams

log = get_logger(__name__)


def heldout_record(model: nn.Module, data_dir: Path, seq_len: int, cfg: EvalConfig, device: torch.device,
                   precision: str = "auto", max_tokens: int | None = None) -> dict[str, Any]:
    result = evaluate_heldout(model, data_dir, seq_len, max_tokens or cfg.max_tokens_per_domain,
                              batch_size=cfg.batch_size, device=device, precision=precision,
                              interval_level=cfg.interval_level, bootstrap_samples=cfg.bootstrap_samples)
    record = {"loss": result["loss"], "bpb": result["bpb"], "bpb_interval": result["bpb_interval"],
              "interval_level": cfg.interval_level, "interval_unit": result["interval_unit"],
              "eval_documents": result["documents"], "eval_tokens": result["tokens"], "eval_bytes": result["bytes"],
              "eval_seq_len": seq_len}
    if cfg.position_bucket:
        record["loss_by_position"] = buckets_by_domain(result["positions"], cfg.position_bucket)
    return record


def heldout_record_over(model: nn.Module, data_dirs: dict[str, Path], seq_len: int, cfg: EvalConfig,
                        device: torch.device, precision: str = "auto") -> dict[str, Any]:
    """:func:`heldout_record` over several prepared data directories (all with the model's tokenizer),
    each one's domains named with its prefix (``{"": own, "parent/": old}``: ``code``, ``parent/code``)."""
    merged: dict[str, Any] = {}
    for prefix, data_dir in data_dirs.items():
        record = heldout_record(model, data_dir, seq_len, cfg, device, precision)
        for key, value in record.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update({prefix + domain: v for domain, v in value.items()})
            else:
                merged[key] = value
    return merged


def complete_evaluation(record: dict[str, Any], model: nn.Module, tokenizer: Tokenizer, data_dir: Path,
                        cfg: EvalConfig) -> dict[str, Any]:
    """Add samples, task scores and the isolation report to a held-out record (in place)."""
    record["samples"] = sample_texts(model, tokenizer, cfg.sample_prompts, cfg.sample_tokens,
                                     cfg.temperature, cfg.top_k, cfg.seed)
    if cfg.task_items:
        tasks = build_tasks(data_dir, tokenizer, cfg.task_items, cfg.task_seed)
        record["tasks"] = evaluate_tasks(model, tokenizer, tasks, cfg.batch_size,
                                         train_ngrams=training_ngrams(data_dir, tokenizer))
    if cfg.passkey is not None:
        record["passkey"] = evaluate_passkey(model, tokenizer, cfg.passkey,
                                             record.get("eval_seq_len") or model.cfg.max_seq_len, data_dir,
                                             cfg.batch_size)
    record["isolation"] = isolation_report(data_dir)
    return record


def interval_header(record: dict[str, Any]) -> str:
    return f"{100 * record.get('interval_level', 0.95):.0f}% interval"


def format_interval(record: dict[str, Any], domain: str) -> str:
    """``low-high`` of a domain's bits-per-byte interval ("-" for records from before intervals)."""
    interval = record.get("bpb_interval", {}).get(domain)
    return f"{interval[0]:.4f}-{interval[1]:.4f}" if interval else "-"


def describe(record: dict[str, Any]) -> list[str]:
    """Human-readable lines for a finished evaluation record."""
    lines = [f"{'domain':<14}{'loss':>10}{'bits/byte':>12}{interval_header(record):>18}{'documents':>11}{'tokens':>10}"]
    for domain in record["bpb"]:
        lines.append(f"{domain:<14}{record['loss'][domain]:>10.4f}{record['bpb'][domain]:>12.4f}"
                     f"{format_interval(record, domain):>18}{record.get('eval_documents', {}).get(domain, '?'):>11}"
                     f"{record['eval_tokens'][domain]:>10}")
    if not record["bpb"]:
        lines.append("no held-out tokens in any domain: no bits-per-byte (see the warning above)")
    for domain, unit in record.get("interval_unit", {}).items():
        if unit == "window":
            lines.append(f"  {domain}: interval over scored windows, as fewer than {MIN_HELDOUT_DOCUMENTS} held-out "
                         "documents were scored: it leaves out the spread between documents")
    if record.get("loss_by_position"):
        lines.append(f"held-out loss (nats/token) by position in the {record.get('eval_seq_len', '?')}-token window:")
        lines += describe_buckets(record["loss_by_position"])
    if record.get("passkey"):
        lines += describe_passkey(record["passkey"])
    for name, score in record.get("tasks", {}).items():
        lines.append(f"task {name}: acc {score['acc']:.3f}, acc_norm {score['acc_norm']:.3f} "
                     f"(chance {score['chance']:.2f}, {score['items']} items, hash {score['hash']})")
        for label in ("clean", "dirty"):
            part = score.get(label)
            if part and part["items"]:
                lines.append(f"  {label} items (13-gram overlap with training data: {label == 'dirty'}): "
                             f"{part['items']}, acc {part['acc']:.3f}, acc_norm {part['acc_norm']:.3f}")
    if record.get("multimodal"):
        from lmforge.eval.multimodal import describe_multimodal

        lines += describe_multimodal(record["multimodal"])
    iso = record.get("isolation")
    if iso:
        lines.append(f"isolation: {iso['overlap']} of {iso['heldout_docs']} held-out documents found in training data")
    return lines
