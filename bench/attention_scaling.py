"""Tokens/s and peak memory of attention variants as the sequence grows: a training step and
generation, for full causal attention, document-masked attention and sliding-window layers.

Peak memory: every (variant, length, phase) runs once, cold, in its own Python process, so the
peak is its own: on CPU the growth of the peak resident set (``ru_maxrss``) over the process's
peak just before the work (model and inputs already built), on CUDA
``torch.cuda.max_memory_allocated`` above the memory allocated before it. Speed: one process per
(length, phase) builds every variant and alternates their runs for ``--rounds`` rounds after a
warm-up run each, so a change in machine load hits all variants alike; tokens/s is the median.

- train: forward, backward and an AdamW step on ``--batch-size`` random sequences of the length;
- generate: a prompt of ``length - new_tokens`` tokens prefilled into the KV cache, then
  ``--new-tokens`` tokens decoded one at a time (greedy); prefill and decode tokens/s, and the
  bytes of keys and values the cache holds.

The document-masked variant packs documents of ``--doc-len`` tokens (an end-of-text token, id 0,
starts each); the sliding-window variant makes every layer local with ``--window``. The table
prints each variant's tokens/s and memory as a ratio to full attention at the same length, run in
the same invocation, since on a shared machine only such ratios are worth comparing.

    python bench/attention_scaling.py                                   # CPU: 256 ... 16k, a few minutes
    python bench/attention_scaling.py --lengths 256,1024 --variants full,window --json out.json
    python bench/attention_scaling.py --device cuda --lengths 1024,4096,16384,65536 --d-model 512 --n-layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("full", "document", "window")
PHASES = ("train", "generate")


def model_config(args: argparse.Namespace, variant: str, length: int) -> dict[str, Any]:
    attention: dict[str, Any] = {}
    if variant == "document":
        attention = {"document_mask": True}
    elif variant == "window":
        attention = {"sliding_window": args.window}
    return {"vocab_size": args.vocab_size, "d_model": args.d_model, "n_layers": args.n_layers,
            "n_heads": args.n_heads, "max_seq_len": length, "attention": attention}


# --- one measurement, in its own process -----------------------------------------------------

def _memory_mark(device: Any) -> float:
    """Bytes in use now (CUDA) or the peak resident set so far (CPU), to subtract from the peak."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB


def _peak_since(device: Any, mark: float) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device)) - mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - mark


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_work(spec: dict[str, Any], variant: str) -> tuple[Any, Any]:
    """``(device, work)``: ``work()`` runs one training step or one generation of ``variant`` and
    returns its timings (train: ``{"seconds"}``; generate: prefill and decode seconds, cache bytes)."""
    import torch

    from lmforge.nn.attention import END_OF_TEXT_ID
    from lmforge.nn.config import ModelConfig
    from lmforge.nn.transformer import KVCache

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(spec["models"][variant])
    model = cfg.build().to(device)
    length, batch = spec["length"], spec["batch_size"]
    ids = torch.randint(1, cfg.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    if variant == "document":
        ids[:, :: spec["doc_len"]] = END_OF_TEXT_ID
    ids = ids.to(device)
    if spec["phase"] == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> dict[str, float]:
            start = time.perf_counter()
            model(ids[:, :-1], ids[:, 1:]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(device)
            return {"seconds": time.perf_counter() - start}

        return device, step

    model.eval()
    new = spec["new_tokens"]
    prompt = ids[:, : length - new]

    @torch.no_grad()
    def generate() -> dict[str, float]:
        cache = KVCache(model, batch, max_len=length)
        start = time.perf_counter()
        logits = model(prompt, kv_cache=cache).logits[:, -1]
        _synchronize(device)
        prefilled = time.perf_counter()
        for _ in range(new):
            next_id = logits[:, : cfg.vocab_size].argmax(dim=-1, keepdim=True)
            logits = model(next_id, kv_cache=cache).logits[:, -1]
        _synchronize(device)
        return {"prefill_seconds": prefilled - start, "decode_seconds": time.perf_counter() - prefilled,
                "kv_cache_bytes": cache.nbytes()}

    return device, generate


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one cold run of one variant (this process runs nothing else)."""
    variant = spec["variants"][0]
    device, work = build_work(spec, variant)
    mark = _memory_mark(device)
    timings = work()
    return {"variant": variant, "length": spec["length"], "phase": spec["phase"],
            "peak_bytes": _peak_since(device, mark), **{k: v for k, v in timings.items() if k == "kv_cache_bytes"}}


def measure_speed(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokens/s of every variant at one length, their runs alternating round by round so that a
    change in machine load hits all of them alike; medians after one warm-up run each."""
    works = {variant: build_work(spec, variant)[1] for variant in spec["variants"]}
    for work in works.values():
        work()
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in works}
    for _ in range(spec["rounds"]):
        for variant, work in works.items():
            runs[variant].append(work())
    batch, length, new = spec["batch_size"], spec["length"], spec["new_tokens"]
    out = []
    for variant, timings in runs.items():
        median = {key: statistics.median(t[key] for t in timings) for key in timings[0]}
        row: dict[str, Any] = {"variant": variant, "length": length, "phase": spec["phase"], "rounds": len(timings)}
        if spec["phase"] == "train":
            row["tokens_per_s"] = batch * length / median["seconds"]
        else:
            row["prefill_tokens_per_s"] = batch * (length - new) / median["prefill_seconds"]
            row["tokens_per_s"] = batch * new / median["decode_seconds"]
        out.append(row)
    return out


# --- the sweep ---------------------------------------------------------------------------------

def hardware(device: str, threads: int | None) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = threads or torch.get_num_threads()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_worker(kind: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``measure_<kind>`` in a fresh Python process; its rows, or one error row per variant."""
    command = [sys.executable, __file__, "--worker", json.dumps({"kind": kind, **spec})]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"variant": v, "length": spec["length"], "phase": spec["phase"], "error": tail}
                for v in spec["variants"]]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return rows if isinstance(rows, list) else [rows]


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "—" if value is None or not reference else f"{value / reference:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per length and variant, train and generation figures and ratios to full."""
    by_key = {(r["variant"], r["length"], r["phase"]): r for r in results}
    lines = ["| length | variant | train tok/s | ×full | train peak MiB | ×full | prefill tok/s | "
             "decode tok/s | ×full | generate peak MiB | KV cache MiB | ×full |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in sorted({r["length"] for r in results}):
        for variant in VARIANTS:
            train, gen = by_key.get((variant, length, "train"), {}), by_key.get((variant, length, "generate"), {})
            if not train and not gen:
                continue
            full_train, full_gen = by_key.get(("full", length, "train"), {}), by_key.get(("full", length, "generate"), {})
            cells = [
                str(length), variant,
                f"{train['tokens_per_s']:,.0f}" if "tokens_per_s" in train else train.get("error", "—"),
                _ratio(train.get("tokens_per_s"), full_train.get("tokens_per_s")),
                _mib(train.get("peak_bytes")), _ratio(train.get("peak_bytes"), full_train.get("peak_bytes")),
                f"{gen['prefill_tokens_per_s']:,.0f}" if "prefill_tokens_per_s" in gen else gen.get("error", "—"),
                f"{gen['tokens_per_s']:,.0f}" if "tokens_per_s" in gen else "—",
                _ratio(gen.get("tokens_per_s"), full_gen.get("tokens_per_s")),
                _mib(gen.get("peak_bytes")), _mib(gen.get("kv_cache_bytes")),
                _ratio(gen.get("kv_cache_bytes"), full_gen.get("kv_cache_bytes")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,1024,4096,16384", help="comma-separated sequence lengths")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's own); on a shared CPU, 1 keeps "
                             "threads from waiting on each other")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=256, help="sliding window of the window variant")
    parser.add_argument("--doc-len", type=int, default=512, help="document length of the document variant")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded after the prompt")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternating")
    parser.add_argument("--json", default="attention_scaling.json", help="where the results are written")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_speed(spec) if spec["kind"] == "speed" else measure_memory(spec)))
        return
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(phases) - set(PHASES))
    if unknown or any(n <= args.new_tokens for n in lengths):
        sys.exit(f"unknown variant or phase {unknown}, or a length not above --new-tokens {args.new_tokens}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    measured: dict[tuple[str, int, str], dict[str, Any]] = {}
    for length in lengths:
        for phase in phases:
            spec = {"length": length, "phase": phase, "device": args.device, "threads": args.threads,
                    "batch_size": args.batch_size,
                    "doc_len": args.doc_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
                    "models": {v: model_config(args, v, length) for v in variants}}
            rows = run_worker("speed", {**spec, "variants": variants})
            for variant in variants:
                rows += run_worker("memory", {**spec, "variants": [variant]})
            for row in rows:
                measured.setdefault((row["variant"], length, phase), {}).update(row)
            for variant in variants:
                row = measured[(variant, length, phase)]
                shown = f"{row['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in row else row.get("error")
                print(f"  {length:>6} {variant:<9} {phase:<9} {shown}", file=sys.stderr, flush=True)
    results = list(measured.values())
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": hardware(args.device, args.threads),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\n{report['hardware']} load average {report['load_average_before_after']}, "
          f"{report['seconds']} s; results in {args.json}")


if __name__ == "__main__":
    main()
