"""Synthetic data validated by small experiments (issue 16): the synthetic-share sweep and
teacher → student in the data-limited regime, chained from existing ``lmforge`` commands.

1. ``lmforge synth`` twice: a finished larger run (the teacher) continues the first 32 tokens of
   the demo corpus' literature and code training documents
   (``configs/teacher_student_synth_{literature,code}.yaml``; resumable, finished shards reused);
2. ``lmforge data prepare``: one directory with the real sources (the same documents, held-out
   split and tokenizer as ``data/demo``: ``data.tokenizer_from``) and one synthetic source per
   real domain, through the whole pipeline (quality, dedup against the real data, decontamination);
3. per seed, ``lmforge mixture-sweep`` of the student (``configs/synth_share_cpu.yaml``):
   - **share**: synthetic share 0, 25, 50, 75% of the mixture weight (split evenly between the two
     domains, as the real half is), every run the same 192 steps x 2048 tokens;
   - **teacher → student**: a unique real budget U (``data.unique_tokens``, the first U/2 training
     tokens of each real domain) and D = 4U training tokens in every arm: ``repeat`` (U real, 4
     epochs), ``teacher_1u`` (U real + U teacher tokens, 2 epochs each), ``teacher_3u`` (U real +
     3U teacher tokens, 1 epoch each), and ``fresh`` (4U real tokens, 1 epoch: what more real data
     would give);
4. the tables: held-out bits per byte on the REAL held-out split only (mean of literature and
   code), per seed and averaged; the students' bpb on the teacher's own held-out samples apart.

Every command is printed before it runs, so any step can be redone by hand; finished runs are
reused by the mixture sweep, so the script resumes after a crash.

    OMP_NUM_THREADS=1 python bench/synth_validation.py --out /tmp/h16b --seeds 0,1 --jobs 2
    python bench/synth_validation.py --out /tmp/h16b --seeds 0,1 --phase table   # tables only

Results: ``OUT/results.json`` and ``OUT/tables.md``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
STUDENT_CONFIG = "configs/synth_share_cpu.yaml"
SYNTH_CONFIGS = {"synth_literature": "configs/teacher_student_synth_literature.yaml",
                 "synth_code": "configs/teacher_student_synth_code.yaml"}
REAL = ("literature", "code")
SYNTHETIC = ("synth_literature", "synth_code")
SHARES = (0, 25, 50, 75)             # synthetic share of the mixture, percent
UNIQUE_TOKENS = 98_304               # U: 48 steps of 16 x 128 tokens, as in configs/epochs_cpu.yaml
STEPS = 192                          # D = 4U = 393,216 tokens in every run of both experiments
# Teacher → student arms: (name, unique-token budget in units of U, real weight, synthetic weight).
# The budget is split over sources by mixture probability, so the real part is always U.
ARMS = (("repeat", 1, 1.0, 0.0), ("teacher_1u", 2, 1.0, 1.0), ("teacher_3u", 4, 1.0, 3.0),
        ("fresh", 4, 1.0, 0.0))


def share_mixture(share: int) -> str:
    """``--mixture`` of a synthetic share in percent: real and synthetic weight each split evenly
    over the two domains, so the domain balance is the same at every share."""
    real, synth = (100 - share) / 200, share / 200
    weights = {name: real for name in REAL} | {name: synth for name in SYNTHETIC}
    return ",".join(f"{name}={w:g}" for name, w in weights.items() if w > 0)


def arm_mixture(real_weight: float, synth_weight: float) -> str:
    weights = {name: real_weight for name in REAL} | {name: synth_weight for name in SYNTHETIC}
    return ",".join(f"{name}={w:g}" for name, w in weights.items() if w > 0)


def resolved_config(base: dict[str, Any], out: Path) -> dict[str, Any]:
    """The student config with every path under ``out`` (runs, prepared data, synthetic folders)."""
    cfg = copy.deepcopy(base)
    cfg["runs_dir"] = str(out / "runs")
    cfg["data"]["out_dir"] = str(out / "data")
    names = [source["name"] for source in cfg["data"]["sources"]]
    missing = [name for name in (*REAL, *SYNTHETIC) if name not in names]
    if missing:
        raise SystemExit(f"{STUDENT_CONFIG}: data.sources lacks {missing} (has {names})")
    for source in cfg["data"]["sources"]:
        if source["name"] in SYNTHETIC:
            if source.get("kind") != "synthetic":
                raise SystemExit(f"{STUDENT_CONFIG}: source {source['name']} must be kind synthetic")
            source["path"] = str(out / source["name"])
    return cfg


def lmforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli.main", *args]


def preparation_commands(out: Path, config: Path) -> list[list[str]]:
    commands = [lmforge("synth", path, "--set", f"out_dir={out / name}") for name, path in SYNTH_CONFIGS.items()]
    commands.append(lmforge("data", "prepare", str(config)))
    return commands


def seed_commands(out: Path, config: Path, seed: int) -> list[list[str]]:
    """The mixture sweeps of one seed: the share sweep, then one sweep per unique-token budget."""
    common = ["--set", f"train.seed={seed}", "--set", f"train.steps={STEPS}"]
    commands = [lmforge("mixture-sweep", str(config), *common, "--set", f"name=share_s{seed}",
                        "--out", str(out / "sweeps" / f"share_s{seed}"),
                        *[a for share in SHARES for a in ("--mixture", share_mixture(share))])]
    for budget in sorted({arm[1] for arm in ARMS}):
        arms = [arm for arm in ARMS if arm[1] == budget]
        commands.append(lmforge("mixture-sweep", str(config), *common, "--set", f"name=ts{budget}u_s{seed}",
                                "--set", f"data.unique_tokens={budget * UNIQUE_TOKENS}",
                                "--out", str(out / "sweeps" / f"ts{budget}u_s{seed}"),
                                *[a for arm in arms for a in ("--mixture", arm_mixture(arm[2], arm[3]))]))
    return commands


def run(command: list[str]) -> None:
    print("+ " + shlex.join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "LMFORGE_PROGRESS": os.environ.get("LMFORGE_PROGRESS", "0")}
    subprocess.run(command, check=True, cwd=REPO, env=env)


# ---- tables -----------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def real_bpb(row: dict[str, str]) -> float:
    """Held-out bits per byte on the real data only: the mean over the real domains."""
    return sum(float(row[f"bpb_{name}"]) for name in REAL) / len(REAL)


def synthetic_bpb(row: dict[str, str]) -> float | None:
    values = [float(row[f"bpb_{name}"]) for name in SYNTHETIC if row.get(f"bpb_{name}")]
    return sum(values) / len(values) if values else None


def gather(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Per-seed rows of both experiments from the sweeps' ``sweep.csv`` files."""
    share, teacher = [], []
    for seed in seeds:
        path = out / "sweeps" / f"share_s{seed}" / "sweep.csv"
        if path.is_file():
            for pct, row in zip(SHARES, read_rows(path)):
                share.append({"seed": seed, "share": pct, "run": row["run"], "real_bpb": real_bpb(row),
                              **{f"bpb_{n}": float(row[f"bpb_{n}"]) for n in REAL},
                              "synthetic_bpb": synthetic_bpb(row)})
        for budget in sorted({arm[1] for arm in ARMS}):
            path = out / "sweeps" / f"ts{budget}u_s{seed}" / "sweep.csv"
            if not path.is_file():
                continue
            arms = [arm for arm in ARMS if arm[1] == budget]
            for arm, row in zip(arms, read_rows(path)):
                epochs = [float(v) for k, v in row.items() if k.startswith("epochs_") and v]
                teacher.append({"seed": seed, "arm": arm[0], "run": row["run"], "unique_tokens": budget * UNIQUE_TOKENS,
                                "real_unique_tokens": UNIQUE_TOKENS * (4 if arm[0] == "fresh" else 1),
                                "synthetic_unique_tokens": UNIQUE_TOKENS * (budget - 1) if arm[3] else 0,
                                "epochs": max(epochs) if epochs else None, "real_bpb": real_bpb(row),
                                **{f"bpb_{n}": float(row[f"bpb_{n}"]) for n in REAL},
                                "synthetic_bpb": synthetic_bpb(row)})
    return {"share": share, "teacher_student": teacher}


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def tables(results: dict[str, Any], seeds: list[int]) -> str:
    """Markdown: one row per share / arm, each seed's real bpb, the mean, and the change against
    the reference row (share 0; the repeat arm) seed by seed (paired: same seed), with its mean
    and standard error over seeds."""
    lines = []

    def block(rows: list[dict], key: str, order: list, reference: Any, title: str) -> None:
        seed_cols = "".join(f" seed {s} |" for s in seeds)
        lines.extend([f"### {title}", "", f"| {key} |{seed_cols} mean real bpb (± half range) | vs {reference}, "
                      f"per seed | vs {reference}: mean (± s.e.) | student bpb on teacher samples |",
                      "|---|" + "---:|" * (len(seeds) + 4)])
        for value in order:
            cells = {r["seed"]: r for r in rows if r[key] == value}
            if not cells:
                continue
            refs = {r["seed"]: r for r in rows if r[key] == reference}
            per_seed = "".join(f" {cells[s]['real_bpb']:.4f} |" if s in cells else " |" for s in seeds)
            mean, half = _mean([c["real_bpb"] for c in cells.values()])
            deltas = [100 * (cells[s]["real_bpb"] / refs[s]["real_bpb"] - 1) for s in seeds if s in cells and s in refs]
            paired = "-"
            if deltas:
                error = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else 0.0
                paired = f"{statistics.fmean(deltas):+.2f}% ± {error:.2f}"
            synth = [c["synthetic_bpb"] for c in cells.values() if c["synthetic_bpb"] is not None]
            lines.append(f"| {value} |{per_seed} {mean:.4f} ± {half:.4f} | {', '.join(f'{d:+.2f}%' for d in deltas)} | "
                         f"{paired} | " + (f"{statistics.fmean(synth):.4f}" if synth else "-") + " |")
        lines.append("")

    block(results["share"], "share", list(SHARES), 0, "Synthetic share (percent of training tokens)")
    block(results["teacher_student"], "arm", [a[0] for a in ARMS], "repeat",
          f"Teacher → student (U = {UNIQUE_TOKENS:,} real tokens, D = 4U = {4 * UNIQUE_TOKENS:,})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/h16b", help="everything goes under this folder")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at the same time (one thread each)")
    parser.add_argument("--phase", choices=["all", "prepare", "train", "table"], default="all")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out.mkdir(parents=True, exist_ok=True)
    config = out / "synth_share.yaml"
    config.write_text(yaml.safe_dump(resolved_config(yaml.safe_load((REPO / STUDENT_CONFIG).read_text()), out),
                                     sort_keys=False))
    if args.phase in ("all", "prepare"):
        for command in preparation_commands(out, config):
            run(command)
    if args.phase in ("all", "train"):
        def one_seed(seed: int) -> None:
            for command in seed_commands(out, config, seed):
                run(command)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one_seed, seeds))
    results = gather(out, seeds)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = tables(results, seeds)
    (out / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
