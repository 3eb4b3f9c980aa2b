"""Time to quality: configs trained side by side for equal wall-clock (or equal tokens), scored
on held-out bits-per-byte per domain, with Hugging Face Llama/Mixtral of the baseline's shape.

    python bench/speedrun.py configs/quickstart_moe.yaml configs/quickstart.yaml --seconds 120
    python bench/speedrun.py configs/quickstart_moe.yaml --tokens 400000
    python bench/speedrun.py base=configs/quickstart_moe.yaml \\
        muon=configs/quickstart_moe.yaml+optim.name=muon+optim.muon_lr=0.02 --seconds 120

Each CONFIG is ``[LABEL=]PATH[+key=value...]``: a run config with its own dotted overrides
(``--set`` applies to every config). The first config is the baseline. Every config is built by
the run assembly (``train.assembly.build_trainer``: data, model family, optimizer, batches) and
stepped with ``Trainer.train_step`` — the same step ``lmforge train`` takes; callbacks (logging,
checkpoints, evaluation) do not run, the held-out evaluation is called here between steps.

**Equal wall-clock** (``--seconds S``): a calibration first trains throwaway copies of every
config for ``--calibration-rounds`` rounds of one step each (alternating) and takes the median
step time, pooled over configs of the same cost (same model, batch shape, optimizer kind,
precision and compile: a learning-rate variant costs what its base costs).
Each config then gets ``train.steps = S * tokens/s / tokens per step``, so its LR schedule ends
with its budget. With ``--baseline-tokens-per-s R`` (the baseline's rate on a quiet machine),
every rate is rescaled by ``R / measured baseline rate``: on a shared machine the budgets are then
quiet-machine seconds, while the ratios between configs still come from the same process.
**Equal tokens** (``--tokens N``): each config gets ``N / tokens per step`` steps.

The configs are then trained interleaved, one step at a time, always stepping the one furthest
behind in its own run (fraction of steps done), so machine load hits them alike. Each is
evaluated ``--evals`` times along its run (``--eval-tokens`` per domain; the last evaluation
uses the config's own ``eval.max_tokens_per_domain``), evaluation time not counted; every config
is scored with the same window (``--eval-seq-len``, default the baseline's ``train.seq_len``), so a
config that trains on shorter sequences is not scored with less context. Reported per
config: held-out bpb per domain at the end, measured tokens/s over the whole run and its ratio
to the baseline, budget seconds (tokens trained / planned tokens/s) and, with ``--target-bpb``,
the budget seconds at which each domain first reaches it (linear between evaluations).

The Hugging Face row (``--no-hf`` skips it) is the baseline's architecture as
``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (MoE) from ``train_throughput.hf_model``,
trained on the baseline's batch stream with the baseline's optimizer, schedule and clipping.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("LMFORGE_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmforge.core.config import apply_overrides, read_yaml  # noqa: E402
from lmforge.core.seeding import seed_everything  # noqa: E402
from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.eval.heldout import evaluate_heldout  # noqa: E402
from lmforge.optim.optimizers import build_optimizer, set_learning_rate  # noqa: E402
from lmforge.optim.schedules import lr_multiplier  # noqa: E402
from lmforge.train.assembly import build_trainer  # noqa: E402
from lmforge.train.config import RunConfig  # noqa: E402
from lmforge.train.families import RunSetup, training_family  # noqa: E402
from lmforge.train.run_dir import remove_run_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import hf_model  # noqa: E402


@dataclass
class Entry:
    label: str
    path: str
    overrides: list[str]


def parse_entry(text: str, index: int) -> Entry:
    """``[LABEL=]PATH[+key=value...]``."""
    head, *overrides = text.split("+")
    label, _, path = head.rpartition("=") if "=" in head else ("", "", head)
    return Entry(label or (Path(path).stem if not overrides else f"{Path(path).stem}_{index}"), path, overrides)


def run_config(entry: Entry, common: list[str], runs_dir: Path, steps: int) -> RunConfig:
    raw = apply_overrides(read_yaml(entry.path), [*common, *entry.overrides])
    raw.update(name=f"speedrun_{entry.label}", runs_dir=str(runs_dir))
    raw.setdefault("train", {})["steps"] = steps
    return RunConfig.from_dict(raw)


@dataclass
class Contestant:
    label: str
    step: Callable[[], float]          # one optimizer step; returns the training loss
    model: torch.nn.Module
    cfg: RunConfig                     # for the HF row: the baseline's (resolved) config
    steps_total: int
    close: Callable[[], None] = lambda: None
    steps_done: int = 0
    seconds: float = 0.0               # measured time inside steps
    last_loss: float = math.nan
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.tokens_per_step

    @property
    def progress(self) -> float:
        return self.steps_done / self.steps_total

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.last_loss = self.step()
        self.seconds += time.perf_counter() - start
        self.steps_done += 1


def lmforge_contestant(entry: Entry, common: list[str], runs_dir: Path, steps: int) -> Contestant:
    cfg = run_config(entry, common, runs_dir, steps)
    remove_run_dir(runs_dir / cfg.name)  # each speedrun starts its runs afresh; only an lmforge run is deleted
    trainer = build_trainer(cfg)
    trainer.model.train()

    def step() -> float:
        return float(trainer.train_step()["loss"])

    def close() -> None:
        if trainer.run_lock is not None:
            trainer.run_lock.release()
    return Contestant(entry.label, step, trainer.eval_model, trainer.cfg, steps, close)


def hf_contestant(baseline: RunConfig, steps: int) -> Contestant:
    """The baseline's shape in transformers, on the baseline's batches, optimizer and schedule."""
    cfg = dataclasses.replace(baseline, train=dataclasses.replace(baseline.train, steps=steps))
    seed_everything(cfg.train.seed)
    model = hf_model(cfg.model).train()
    data_dir = Path(cfg.data.out_dir)
    setup = RunSetup(cfg, data_dir, Tokenizer.load(data_dir / "tokenizer.json"), 0, 1, None)
    batches = training_family(cfg.model.family).build(setup, model).batches
    optimizer = build_optimizer(model, cfg.optim)
    state = {"step": 0}
    moe = cfg.model.moe

    def step() -> float:
        set_learning_rate(optimizer, lr_multiplier(state["step"], steps, cfg.optim))
        loss_sum = 0.0
        for _ in range(cfg.train.grad_accum_steps):
            inputs, targets, _ = batches.next_batch()
            out = model(input_ids=inputs)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            aux = out.aux_loss if moe is not None and getattr(out, "aux_loss", None) is not None else 0.0
            ((loss + aux) / cfg.train.grad_accum_steps).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return loss_sum / cfg.train.grad_accum_steps

    name = "hf_mixtral" if moe is not None else "hf_llama"
    return Contestant(name, step, model, cfg, steps)


def build_all(entries: list[Entry], common: list[str], runs_dir: Path, steps: list[int],
              with_hf: bool) -> list[Contestant]:
    contestants = [lmforge_contestant(e, common, runs_dir, n) for e, n in zip(entries, steps)]
    if with_hf:
        contestants.append(hf_contestant(contestants[0].cfg, steps[len(entries)]))
    return contestants


def cost_signature(cfg: RunConfig) -> str:
    """What a step's time depends on: the model, the batch shape, the optimizer kind, precision,
    compile. Configs that differ only in learning rates or schedules share their calibration."""
    train = cfg.train
    return json.dumps([cfg.model.to_dict(), train.batch_size, train.grad_accum_steps, train.seq_len,
                       train.precision, train.compile, cfg.optim.name], sort_keys=True, default=str)


def calibrate(entries: list[Entry], args: argparse.Namespace, runs_dir: Path) -> list[float]:
    """Tokens/s of throwaway copies of every contestant: after two untimed steps each, rounds of one
    step per contestant (order reversed every round, so neither end of a round is favoured); the
    median step time over every contestant of the same cost signature (HF: its own)."""
    n = len(entries) + (0 if args.no_hf else 1)
    contestants = build_all(entries, args.overrides, runs_dir / "calibration", [10**4] * n, not args.no_hf)
    signatures = [cost_signature(c.cfg) for c in contestants[:len(entries)]] + ["hf"] * (n - len(entries))
    times: dict[str, list[float]] = {s: [] for s in signatures}
    for c in contestants:
        for _ in range(2):
            c.step()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for round_index in range(args.calibration_rounds):
        ordered = list(zip(contestants, signatures))
        for c, signature in (ordered if round_index % 2 == 0 else reversed(ordered)):
            start = clock()
            c.step()
            times[signature].append((clock() - start) / c.tokens_per_step)
    for c in contestants:
        c.close()
    return [1.0 / statistics.median(times[s]) for s in signatures]


def evaluate(c: Contestant, max_tokens: int, planned_rate: float, seq_len: int) -> None:
    result = evaluate_heldout(c.model, Path(c.cfg.data.out_dir), seq_len, max_tokens,
                              precision=c.cfg.train.precision)
    c.model.train()
    tokens = c.steps_done * c.tokens_per_step
    c.evals.append({"step": c.steps_done, "tokens": tokens, "budget_seconds": tokens / planned_rate,
                    "measured_seconds": c.seconds, "eval_tokens": max_tokens, "loss": c.last_loss,
                    "bpb": {d: round(v, 4) for d, v in result["bpb"].items()}})


def time_to_target(evals: list[dict[str, Any]], domain: str, target: float) -> float | None:
    """Budget seconds at which ``domain`` first reaches ``target`` bpb, linear between evaluations."""
    previous = None
    for record in evals:
        bpb = record["bpb"].get(domain)
        if bpb is not None and bpb <= target:
            if previous is None or previous["bpb"][domain] == bpb:
                return record["budget_seconds"]
            share = (previous["bpb"][domain] - target) / (previous["bpb"][domain] - bpb)
            return previous["budget_seconds"] + share * (record["budget_seconds"] - previous["budget_seconds"])
        previous = record
    return None


def race(contestants: list[Contestant], planned_rates: list[float], args: argparse.Namespace) -> None:
    """Step the contestant furthest behind until all are done; evaluate each at its eval points."""
    eval_points = [[max(1, round(c.steps_total * (i + 1) / args.evals)) for i in range(args.evals)]
                   for c in contestants]
    while True:
        pending = [c for c in contestants if c.steps_done < c.steps_total]
        if not pending:
            break
        index = contestants.index(min(pending, key=lambda c: c.progress))
        c = contestants[index]
        c.timed_step()
        if not math.isfinite(c.last_loss):
            raise SystemExit(f"{c.label}: loss became {c.last_loss} at step {c.steps_done}")
        if c.steps_done in eval_points[index]:
            final = c.steps_done == c.steps_total
            evaluate(c, c.cfg.eval.max_tokens_per_domain if final else args.eval_tokens, planned_rates[index],
                     args.eval_seq_len or contestants[0].cfg.train.seq_len)
            print(f"[{c.label}] step {c.steps_done}/{c.steps_total} loss {c.last_loss:.3f} "
                  f"bpb {c.evals[-1]['bpb']} ({c.seconds:.0f} s)", flush=True)


def unequal_budget(planned_ratio: float, measured_ratio: float, tolerance: float = 0.1) -> str | None:
    """Why an equal-time row is not equal, or None: the calibration planned a config at
    ``planned_ratio`` x the baseline's tokens/s and the race measured ``measured_ratio`` x; beyond
    ``tolerance`` (relative) its budget in seconds was not the baseline's (e.g. other load during
    the calibration), and its Δ bpb carries that error."""
    error = measured_ratio / planned_ratio - 1.0
    if abs(error) <= tolerance:
        return None
    return (f"the calibration planned {planned_ratio:.2f}x the baseline's tokens/s, the race measured "
            f"{measured_ratio:.2f}x: it got {abs(error):.0%} {'less' if error > 0 else 'more'} time than "
            f"the baseline; rerun on a quieter machine before reading its row")


def report(contestants: list[Contestant], planned_rates: list[float], args: argparse.Namespace,
           calibration: list[float] | None) -> dict[str, Any]:
    base = contestants[0]
    base_rate = base.steps_done * base.tokens_per_step / base.seconds
    domains = sorted(base.evals[-1]["bpb"])
    rows = []
    for i, c in enumerate(contestants):
        final = c.evals[-1]
        rate = c.steps_done * c.tokens_per_step / c.seconds
        row = {"label": c.label, "steps": c.steps_done, "tokens_per_step": c.tokens_per_step,
               "tokens": c.steps_done * c.tokens_per_step, "budget_seconds": round(final["budget_seconds"], 1),
               "planned_tokens_per_s": round(planned_rates[i], 1),
               "measured_tokens_per_s": round(rate, 1), "tokens_per_s_vs_baseline": round(rate / base_rate, 3),
               "bpb": final["bpb"],
               "bpb_vs_baseline": {d: round(final["bpb"][d] - base.evals[-1]["bpb"][d], 4) for d in domains},
               "final_loss": round(c.last_loss, 4), "evals": c.evals}
        if calibration is not None:
            row["calibration_tokens_per_s"] = round(calibration[i], 1)
        if args.target_bpb is not None:
            row["seconds_to_target"] = {d: time_to_target(c.evals, d, args.target_bpb) for d in domains}
        if args.seconds and i > 0:
            row["unequal_budget"] = unequal_budget(planned_rates[i] / planned_rates[0], rate / base_rate)
        rows.append(row)
    budget = f"{args.seconds:g} s" if args.seconds else f"{args.tokens} tokens"
    print(f"\nbudget {budget} per config; baseline {base.label}")
    print("| config | steps | tokens/s (× base) | " + " | ".join(f"{d} bpb (Δ)" for d in domains)
          + (" | s to target " + str(args.target_bpb) if args.target_bpb is not None else "") + " |")
    for row in rows:
        cells = [f"{row['bpb'][d]:.3f} ({row['bpb_vs_baseline'][d]:+.3f})" for d in domains]
        line = (f"| {row['label']} | {row['steps']} | {row['measured_tokens_per_s']:.0f} "
                f"({row['tokens_per_s_vs_baseline']:.2f}) | " + " | ".join(cells))
        if args.target_bpb is not None:
            line += " | " + ", ".join(f"{d} {v:.0f}" if v is not None else f"{d} —"
                                      for d, v in row["seconds_to_target"].items())
        print(line + " |")
    for row in rows:
        if row.get("unequal_budget"):
            print(f"warning: {row['label']}: {row['unequal_budget']}")
    return {"command": " ".join(sys.argv), "budget": budget, "baseline": base.label,
            "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="[LABEL=]PATH[+key=value...]; the first is the baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every config")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, help="equal wall-clock budget per config")
    budget.add_argument("--tokens", type=int, help="equal token budget per config")
    parser.add_argument("--baseline-tokens-per-s", type=float,
                        help="the baseline's tokens/s on a quiet machine: budgets become quiet-machine seconds")
    parser.add_argument("--calibration-rounds", type=int, default=12, help="rounds of one step per config")
    parser.add_argument("--evals", type=int, default=4, help="evaluations along each run (the last at the end)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain, intermediate evals")
    parser.add_argument("--eval-seq-len", type=int,
                        help="window of the held-out evaluation, the same for every config (default: the baseline's seq_len)")
    parser.add_argument("--target-bpb", type=float, help="report the time each domain first reaches this bpb")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face row")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="calibration clock: wall time, or this process's CPU time (with --threads 1 it is "
                             "the step's own work, unaffected by waiting for a core on a shared machine)")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="print the calibration's tokens/s per config (and its ratio to the baseline) and stop")
    parser.add_argument("--out", default="/tmp/speedrun", help="folder for runs and result.json")
    args = parser.parse_args()
    if not (args.seconds or args.tokens or args.calibrate_only):
        parser.error("give a budget: --seconds S or --tokens N (or --calibrate-only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [parse_entry(text, i) for i, text in enumerate(args.configs)]
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"config labels must differ, got {labels}: name them LABEL=PATH")
    out = Path(args.out)
    runs_dir = out / "runs"
    n = len(entries) + (0 if args.no_hf else 1)
    per_step = [run_config(e, args.overrides, runs_dir, 1).train.tokens_per_step for e in entries]
    per_step += [per_step[0]] * (n - len(entries))  # the HF row reads the baseline's batches
    calibration = None
    if args.calibrate_only:
        rates = calibrate(entries, args, runs_dir)
        labels = labels + ["hf"] * (n - len(entries))
        result = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                  "calibration_rounds": args.calibration_rounds,
                  "tokens_per_s": {label: round(rate, 1) for label, rate in zip(labels, rates)},
                  "ratio_to_baseline": {label: round(rate / rates[0], 3) for label, rate in zip(labels, rates)}}
        print(json.dumps(result, indent=1))
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps(result, indent=1))
        return
    if args.seconds:
        calibration = calibrate(entries, args, runs_dir)
        scale = args.baseline_tokens_per_s / calibration[0] if args.baseline_tokens_per_s else 1.0
        planned = [rate * scale for rate in calibration]
        steps = [max(1, round(args.seconds * rate / tokens)) for rate, tokens in zip(planned, per_step)]
        print("calibration tokens/s:", [round(r) for r in calibration], "-> steps", steps, flush=True)
    else:
        steps = [max(1, args.tokens // tokens) for tokens in per_step]
        planned = [float("nan")] * n
    contestants = build_all(entries, args.overrides, runs_dir, steps, not args.no_hf)
    if not args.seconds:  # budget seconds from the measured rates, filled after the race
        planned = [1.0] * n
    try:
        race(contestants, planned, args)
    finally:
        for c in contestants:
            c.close()
    if not args.seconds:
        for i, c in enumerate(contestants):
            planned[i] = c.steps_done * c.tokens_per_step / c.seconds
            for record in c.evals:
                record["budget_seconds"] = record["measured_seconds"]
    result = report(contestants, planned, args, calibration)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"\nwritten {out / 'result.json'}")


if __name__ == "__main__":
    main()
