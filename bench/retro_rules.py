"""RETRO training rules compared: held-out bpb with and without retrieval, and the knowledge benchmarks.

One cell per (rule, seed): train ``configs/retro_demo.yaml`` with the rule's overrides, then

- ``lmforge retrieval eval``: held-out bits-per-byte per domain with and without retrieval, with the
  paired per-document interval of the difference (the eval guard, ``retrieval_hurts``);
- ``lmforge retrieval facts --variant reading``: the reading benchmark (facts asked in other
  phrasings, reverse relations, entities by description, distractor documents) over several
  benchmark seeds, with its model-free copy baseline;
- ``lmforge retrieval facts --variant verbatim``: the original (copyable) benchmark.

Every step is a plain ``lmforge`` command, printed before it runs, so any cell can be redone by
hand. The benchmarks add documents to and remove them from a private copy of the database, so
training runs reading the original are never disturbed. Results: ``OUT/RULE_sSEED/`` (the run)
and ``OUT/results.json`` / ``OUT/table.md`` (the table, every cell with its commands).

    python bench/retro_rules.py --data /tmp/h20/data/demo --db /tmp/h20/data/demo/retrieval \\
        --out /tmp/h20/rules --steps 400 --seeds 0,1
    python bench/retro_rules.py ... --phase eval     # (re)evaluate trained cells only
    python bench/retro_rules.py ... --phase table    # rebuild the table from the cells' results
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from lmforge.eval.facts import accuracy_interval
from lmforge.retrieval.database import SCRATCH_MARKER, mark_scratch_database, remove_database_folder

CONFIG = "configs/retro_demo.yaml"
# The rules compared. Neighbours never come from the chunk's own documents or its exclusion
# radius (lmforge.retrieval.neighbours) in every rule; "paper" adds no gold neighbours.
RULES: dict[str, list[str]] = {
    "paper": ["retrieval.gold_neighbour_rate=0"],
    "gold25": ["retrieval.gold_neighbour_rate=0.25", "retrieval.gold_neighbour_schedule=constant"],
    "gold25_linear": ["retrieval.gold_neighbour_rate=0.25", "retrieval.gold_neighbour_schedule=linear"],
    "paper_noread": ["retrieval.gold_neighbour_rate=0", "model.retro.aligned_read=false"],
    "gold25_noread": ["retrieval.gold_neighbour_rate=0.25", "retrieval.gold_neighbour_schedule=constant",
                      "model.retro.aligned_read=false"],
    # a quarter of the chunks read another chunk of their own document (never their continuation)
    "docnb25": ["retrieval.gold_neighbour_rate=0", "retrieval.document_neighbour_rate=0.25"],
}
LMFORGE = [sys.executable, "-m", "lmforge.cli.main"]


def _show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in (["lmforge"] + cmd[len(LMFORGE):] if cmd[:len(LMFORGE)] == LMFORGE else cmd))


def _run(cmd: list[str]) -> None:
    print("$", _show(cmd), flush=True)
    subprocess.run(cmd, check=True)


def cell_name(args: argparse.Namespace, rule: str, seed: int) -> str:
    return f"{args.recipe}_{rule}_s{seed}" if args.recipe else f"{rule}_s{seed}"


def cell_commands(args: argparse.Namespace, rule: str, seed: int) -> dict[str, list[str]]:
    name = cell_name(args, rule, seed)
    run = Path(args.out) / name
    bench_db = Path(args.out) / f"bench_db_{name}"  # one per cell: cells may run in parallel processes
    overrides = [f"name={name}", f"runs_dir={args.out}", f"data.out_dir={args.data}", f"retrieval.db={args.db}",
                 f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.seed={seed}",
                 *args.override, *RULES[rule]]
    seeds = ",".join(str(s) for s in range(args.bench_seeds))
    verbatim_seeds = ",".join(str(s) for s in range(args.verbatim_seeds))
    return {
        "train": LMFORGE + ["train", args.config, "--no-report"] + [a for o in overrides for a in ("--set", o)],
        "eval": LMFORGE + ["retrieval", "eval", str(run), "--db", args.db, "--fractions", "1.0"],
        "reading": LMFORGE + ["retrieval", "facts", str(run), "--db", str(bench_db), "--variant", "reading",
                              "--seeds", seeds, "--out", str(run / "eval" / "facts_reading.json")],
        "verbatim": LMFORGE + ["retrieval", "facts", str(run), "--db", str(bench_db), "--variant", "verbatim",
                               "--seeds", verbatim_seeds, "--out", str(run / "eval" / "facts_verbatim.json")],
    }


def _fresh_bench_db(args: argparse.Namespace, name: str) -> None:
    bench_db = Path(args.out) / f"bench_db_{name}"
    if bench_db.exists():
        remove_database_folder(bench_db)
    shutil.copytree(args.db, bench_db, ignore=shutil.ignore_patterns("neighbours_*", ".lock", SCRATCH_MARKER))
    mark_scratch_database(bench_db, "bench/retro_rules.py")


def _cell_result(args: argparse.Namespace, rule: str, seed: int) -> dict | None:
    run = Path(args.out) / cell_name(args, rule, seed)
    files = {k: run / "eval" / f for k, f in (("eval", "retrieval.json"), ("reading", "facts_reading.json"),
                                               ("verbatim", "facts_verbatim.json"))}
    if not all(f.is_file() for f in files.values()):
        return None
    data = {k: json.loads(f.read_text()) for k, f in files.items()}
    pooled = {}  # per-question scores with their (benchmark seed, entity), for intervals over a rule's cells
    for cond in ("after_add", "copy_baseline_after_add", "presence_baseline_after_add", "before_add"):
        scores, clusters = [], []
        for result in data["reading"]["per_seed"]:
            scores += result[cond]["scores"]
            clusters += [f"{result['seed']}:{e}" for e in result["entities_of_questions"]]
        pooled[cond] = {"scores": scores, "clusters": clusters}
    return {"reading_scores": pooled, "rule": f"{args.recipe}/{rule}" if args.recipe else rule, "seed": seed, "bpb": data["eval"]["bpb"], "guard": data["eval"].get("guard"),
            "reading": data["reading"]["summary"], "verbatim": data["verbatim"]["summary"],
            "commands": {k: _show(c) for k, c in cell_commands(args, rule, seed).items()}}


def _fmt_interval(summary: dict, condition: str) -> str:
    entry = summary[condition]
    return f"{entry['accuracy']:.3f} [{entry['interval'][0]:.2f}, {entry['interval'][1]:.2f}]"


def _over_seeds(differences: list[float]) -> str:
    """Mean of the seeds' bpb differences with a 95% Student-t interval over seeds (seeds are the
    runs' noise: each cell's own paired interval covers only the choice of held-out documents)."""
    mean = float(np.mean(differences))
    if len(differences) < 2:
        return f"{mean:+.4f}"
    half = float(stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences))
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


def write_table(args: argparse.Namespace, rules: list[str], seeds: list[int]) -> None:
    cells = [c for r in rules for s in seeds if (c := _cell_result(args, r, s)) is not None]
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps([{k: v for k, v in c.items() if k != "reading_scores"}
                                                  for c in cells], indent=1))
    lines = ["| rule | seed | code bpb without → with (Δ [95% paired]) | literature bpb without → with (Δ [95% paired]) "
             "| reading: model after add | reading: copy baseline after add | reading: before add / after remove "
             "| verbatim: model after add | verbatim: copy baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        bpb = []
        for domain in ("code", "literature"):
            g = c["guard"]["domains"][domain]
            flag = " **hurts**" if g["retrieval_hurts"] else ""
            bpb.append(f"{c['bpb']['none'][domain]:.3f} → {c['bpb']['db_1'][domain]:.3f} "
                       f"({g['difference']:+.4f} [{g['interval'][0]:+.4f}, {g['interval'][1]:+.4f}]){flag}")
        r, v = c["reading"], c["verbatim"]
        lines.append(f"| {c['rule']} | {c['seed']} | {bpb[0]} | {bpb[1]} | {_fmt_interval(r, 'after_add')} "
                     f"| {_fmt_interval(r, 'copy_baseline_after_add')} "
                     f"| {r['before_add']['accuracy']:.3f} / {r['after_remove']['accuracy']:.3f} "
                     f"| {_fmt_interval(v, 'after_add')} | {v['copy_baseline_after_add']['accuracy']:.3f} |")
    lines += ["", "Per rule, mean over seeds:", "",
              "| rule | seeds | Δ code bpb [95% over seeds] | Δ literature bpb [95% over seeds] "
              "| domains where retrieval hurts (per-cell paired intervals) | reading before add | "
              "reading after add | reading copy baseline | reading presence baseline | verbatim after add |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for rule in rules:
        mine = [c for c in cells if c["rule"] == (f"{args.recipe}/{rule}" if args.recipe else rule)]
        if not mine:
            continue
        d = {dom: _over_seeds([c["guard"]["domains"][dom]["difference"] for c in mine]) for dom in ("code", "literature")}
        hurts = sum(c["guard"]["domains"][dom]["retrieval_hurts"] for c in mine for dom in ("code", "literature"))
        mean = {k: np.mean([c[k]["after_add"]["accuracy"] for c in mine]) for k in ("reading", "verbatim")}
        reading = {}
        for cond in ("after_add", "copy_baseline_after_add", "presence_baseline_after_add", "before_add"):
            scores = [x for c in mine for x in c["reading_scores"][cond]["scores"]]
            clusters = [x for c in mine for x in c["reading_scores"][cond]["clusters"]]
            low, high = accuracy_interval(scores, clusters)
            reading[cond] = f"{np.mean(scores):.3f} [{low:.3f}, {high:.3f}]"
        lines.append(f"| {mine[0]['rule']} | {len(mine)} | {d['code']} | {d['literature']} | {hurts} of {2 * len(mine)} "
                     f"| {reading['before_add']} | {reading['after_add']} | {reading['copy_baseline_after_add']} "
                     f"| {reading['presence_baseline_after_add']} | {mean['verbatim']:.3f} |")
    lines += ["", "Commands of each cell:", ""]
    for c in cells:
        lines.append(f"- `{c['rule']}` seed {c['seed']}:")
        lines += [f"  - `{cmd}`" for cmd in c["commands"].values()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG, help=f"the run config the rules override (default {CONFIG})")
    parser.add_argument("--recipe", default="",
                        help="label of the config's recipe, prefixed to cell names (e.g. reading: reading_RULE_sSEED)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further config override of every cell (repeatable), e.g. data.tokenizer_from=DIR")
    parser.add_argument("--data", required=True, help="prepared data directory (as the config's data section)")
    parser.add_argument("--db", required=True, help="chunk database with neighbours (lmforge retrieval build/neighbours)")
    parser.add_argument("--out", required=True, help="directory for the runs, results.json and table.md")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {', '.join(RULES)}")
    parser.add_argument("--seeds", default="0,1", help="training seeds (default 0,1)")
    parser.add_argument("--steps", type=int, default=800, help="training steps per cell (default 800, the demo's)")
    parser.add_argument("--bench-seeds", type=int, default=3,
                        help="reading-benchmark seeds (entity sets of 24) per cell (default 3)")
    parser.add_argument("--verbatim-seeds", type=int, default=1, help="verbatim-benchmark seeds per cell (default 1)")
    parser.add_argument("--phase", choices=("all", "train", "eval", "table"), default="all")
    parser.add_argument("--redo", action="store_true", help="evaluate again cells that already have results")
    args = parser.parse_args()
    rules = args.rules.split(",")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        parser.error(f"--rules: unknown {unknown} (known: {', '.join(RULES)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for rule in rules:
        for seed in seeds:
            commands = cell_commands(args, rule, seed)
            run = Path(args.out) / cell_name(args, rule, seed)
            if args.phase in ("all", "train") and not (run / "eval" / "final.json").is_file():
                _run(commands["train"])
            if args.phase in ("all", "eval") and (run / "eval" / "final.json").is_file():
                outputs = {"eval": run / "eval" / "retrieval.json", "reading": run / "eval" / "facts_reading.json",
                           "verbatim": run / "eval" / "facts_verbatim.json"}
                for step, output in outputs.items():
                    if output.is_file() and not args.redo:
                        continue
                    if step != "eval":
                        _fresh_bench_db(args, cell_name(args, rule, seed))
                    _run(commands[step])
                bench_db = Path(args.out) / f"bench_db_{cell_name(args, rule, seed)}"
                if bench_db.exists():
                    remove_database_folder(bench_db)
    write_table(args, rules, seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
