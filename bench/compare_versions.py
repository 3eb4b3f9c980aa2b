"""Training throughput and losses of this checkout against an earlier commit, in one invocation.

For a refactor or a speed change: the same config is trained by both code versions through the
real ``lmforge train`` (run assembly, trainer, callbacks), alternating versions round by round so
a change in machine load hits both alike. Prints median tokens/s per version over the timed
steps of every round (the first ``--skip`` steps of each run are warm-up), the ratio, the spread
over rounds, and whether the two versions' losses are bit-identical.

    python bench/compare_versions.py configs/quickstart_moe.yaml --ref cdee255 --steps 30 --rounds 3 --ref-config

The earlier commit is extracted with ``git archive`` into a temporary folder (the checkout is not
touched); each version prepares its own copy of the data there, so the two never share files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract(ref: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def train(src: Path, config: Path, work: Path, name: str, args: argparse.Namespace) -> list[dict]:
    overrides = [f"name={name}", f"runs_dir={work / 'runs'}", f"data.out_dir={work / 'data'}",
                 f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
                 f"train.checkpoint_every={args.steps}", "train.tensorboard=false", *args.overrides]
    command = [sys.executable, "-m", "lmforge", "train", str(config), "--no-report"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "LMFORGE_PROGRESS": "0"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{src}: training failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    metrics = work / "runs" / name / "metrics.jsonl"
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--ref", required=True, help="the earlier commit (or branch, tag)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps of each run left out of the timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ref-config", action="store_true",
                        help="train both versions on the earlier commit's copy of CONFIG (for a refactor that "
                             "must keep losses bit-identical while the presets changed)")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error("--steps must exceed --skip")

    with tempfile.TemporaryDirectory(prefix="lmforge_versions_") as tmp:
        versions = {"current": ROOT, args.ref: extract(args.ref, Path(tmp) / "ref")}
        rates: dict[str, list[float]] = {v: [] for v in versions}
        losses: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            for version, src in versions.items():
                work = Path(tmp) / f"work_{list(versions).index(version)}"
                work.mkdir(exist_ok=True)
                owner = versions[args.ref] if args.ref_config else src
                config = (owner / args.config) if (owner / args.config).is_file() else Path(args.config).resolve()
                records = train(src, config, work, f"r{round_index}", args)
                timed = [r["tokens_per_s"] for r in records if r["step"] > args.skip]
                rates[version].append(statistics.median(timed))
                losses[version] = [r["loss"] for r in records]
                print(f"round {round_index + 1}/{args.rounds} {version}: {rates[version][-1]:,.0f} tokens/s",
                      file=sys.stderr)
    current, earlier = (statistics.median(rates[v]) for v in versions)
    print(json.dumps({
        "config": args.config, "steps": args.steps, "rounds": args.rounds, "cpu_threads": os.cpu_count(),
        "tokens_per_s": {v: round(statistics.median(r), 1) for v, r in rates.items()},
        "tokens_per_s_by_round": {v: [round(x, 1) for x in r] for v, r in rates.items()},
        "ratio_current_over_ref": round(current / earlier, 3),
        "losses_bit_identical": losses["current"] == losses[args.ref],
    }, indent=2))


if __name__ == "__main__":
    main()
