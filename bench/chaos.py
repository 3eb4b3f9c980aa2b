"""Chaos check: SIGKILL a CPU training run at random steps, resume each time, compare.

Runs CONFIG once uninterrupted, then again while killing it K times with SIGKILL — each
time as soon as a randomly chosen step has been logged, so kills also land during
checkpoint saves — resuming with ``--resume auto`` after each kill. It then checks that
the final weights equal the uninterrupted run's bit for bit and that every logged loss
matches, and reports the checkpointing overhead (seconds per save and share of step time).

    python bench/chaos.py --config configs/debug.yaml --kills 5 --seed 0

Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge.core.checkpoint_files import latest_valid_checkpoint
from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.metrics_file import read_metrics


def launch(config: Path, overrides: list[str], resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "lmforge", "train", str(config), "--no-report"]
    for item in overrides:
        command += ["--set", item]
    if resume:
        command += ["--resume", "auto"]
    env = {**os.environ, "LMFORGE_PROGRESS": "0"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [r["step"] for r in read_metrics(path) if r.get("kind") == "train"]
    return max(steps, default=0)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


def overhead(run_dir: Path) -> tuple[float, float, int]:
    records = read_metrics(run_dir / "metrics.jsonl")
    saves = [r["seconds"] for r in records if r.get("kind") == "checkpoint" and "error" not in r]
    steps = {r["step"]: r["step_time_s"] for r in records if r.get("kind") == "train"}
    per_save = sum(saves) / max(len(saves), 1)
    return per_save, sum(saves) / max(sum(steps.values()) + sum(saves), 1e-9), len(saves)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/debug.yaml", help="run config (default configs/debug.yaml)")
    parser.add_argument("--kills", type=int, default=5, help="number of SIGKILLs (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the kill steps (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. train.checkpoint_every=5)")
    parser.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary folder)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lmforge_chaos_"))
    cfg = apply_overrides(read_yaml(args.config), args.overrides)
    steps = int(cfg.get("train", {}).get("steps", 200))
    base = [*args.overrides, f"runs_dir={workdir}", "train.tensorboard=false"]
    config = Path(args.config)

    start = time.perf_counter()
    reference = launch(config, [*base, "name=reference"], resume=False)
    if reference.wait() != 0:
        print(reference.stderr.read() if reference.stderr else "", file=sys.stderr)
        return 1
    reference_seconds = time.perf_counter() - start

    rng = random.Random(args.seed)
    kill_steps = sorted(rng.sample(range(1, steps), min(args.kills, steps - 1)))
    run_dir = workdir / "chaos"
    chaos_overrides = [*base, "name=chaos"]
    start = time.perf_counter()
    resumed_from = []
    for i, target in enumerate(kill_steps):
        child = launch(config, chaos_overrides, resume=i > 0)
        while child.poll() is None and last_step(run_dir) < target:
            time.sleep(0.01)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
        found = latest_valid_checkpoint(run_dir / "checkpoints")
        resumed_from.append(found.name if found else "start")
    final = launch(config, chaos_overrides, resume=True)
    if final.wait() != 0:
        print(final.stderr.read() if final.stderr else "", file=sys.stderr)
        return 1
    chaos_seconds = time.perf_counter() - start

    ref_ckpt = latest_valid_checkpoint(workdir / "reference" / "checkpoints")
    run_ckpt = latest_valid_checkpoint(run_dir / "checkpoints")
    assert ref_ckpt is not None and run_ckpt is not None
    a, b = load_file(str(ref_ckpt / "model.safetensors")), load_file(str(run_ckpt / "model.safetensors"))
    weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses_equal = train_losses(workdir / "reference") == train_losses(run_dir)
    per_save, share, saves = overhead(workdir / "reference")

    print(f"config: {args.config} {' '.join(args.overrides)}; {steps} steps")
    print(f"SIGKILL after steps {kill_steps}; resumed from {resumed_from}")
    print(f"uninterrupted run: {reference_seconds:.1f} s; killed {len(kill_steps)} times and resumed: "
          f"{chaos_seconds:.1f} s")
    print(f"final weights bit-identical: {weights_equal}; every logged loss identical: {losses_equal}")
    print(f"checkpointing: {saves} saves, {per_save:.3f} s per save, {100 * share:.1f}% of training time")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if weights_equal and losses_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
