"""The reading benchmark broken down by question template, pooled over runs.

For each of the six question templates of ``lmforge.eval.facts_reading`` (kind/attribute), from
the runs' ``eval/facts_reading.json`` (written by ``lmforge retrieval facts --variant reading``):
the model's accuracy before and after ``retrieval add`` and the copy and presence baselines, each
with a 95% bootstrap interval over entities (all runs' and benchmark seeds' answers pooled), and
whether the template is used by the ``invented_facts`` training source or held out from it.
With ``--db`` it also measures, without any model, how often the question's chunk retrieves its
entity's fact document after the facts are added (recall@k, on a private copy of the database),
and, for a database with an ``invented_facts`` source named ``facts``, how often a training answer
(the last word of an "Answer:" line that starts in chunk u+1) is in the precomputed training
neighbours of chunk u, the ones the model reads while it predicts the answer.

    python bench/retro_reading_breakdown.py RUN [RUN ...] [--db DATA/retrieval] [--out table.md]
    python bench/retro_reading_breakdown.py --db DATA/retrieval --seeds 3,4,5   # fact recall alone
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lmforge.data.invented_facts import BENCHMARK_TEMPLATES_HELD_OUT, BENCHMARK_TEMPLATES_SEEN
from lmforge.eval.facts import accuracy_interval, benchmark_items
from lmforge.eval.facts_reading import READING_QUESTIONS

CONDITIONS = ("before_add", "after_add", "copy_baseline_after_add", "presence_baseline_after_add")


def _slot(kind: str, attribute: str) -> str:
    seen = "seen in training" if (kind, attribute) in BENCHMARK_TEMPLATES_SEEN else (
        "held out from training" if (kind, attribute) in BENCHMARK_TEMPLATES_HELD_OUT else "?")
    return f"{kind}/{attribute} ({seen})"


def pooled_by_template(runs: list[Path]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{template: {condition: (accuracy, low, high)}}; rows "all", "seen", "held out" too."""
    scores: dict[tuple[str, str], list[float]] = {}
    clusters: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        result = json.loads((run / "eval" / "facts_reading.json").read_text())
        for per_seed in result["per_seed"]:
            n = len(READING_QUESTIONS)
            for cond in CONDITIONS:
                for i, (score, entity) in enumerate(zip(per_seed[cond]["scores"], per_seed["entities_of_questions"])):
                    kind, attribute = READING_QUESTIONS[i % n][:2]
                    groups = [_slot(kind, attribute), "all",
                              "seen templates" if (kind, attribute) in BENCHMARK_TEMPLATES_SEEN else "held-out templates"]
                    for group in groups:
                        scores.setdefault((group, cond), []).append(score)
                        clusters.setdefault((group, cond), []).append(f"{run.name}:{per_seed['seed']}:{entity}")
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for (group, cond), values in scores.items():
        low, high = accuracy_interval(values, clusters[(group, cond)])
        out.setdefault(group, {})[cond] = (float(np.mean(values)), low, high)
    return out


def fact_recall_by_template(db_path: Path, seeds: list[int], k: int = 2) -> dict[str, float]:
    """Share of questions whose chunk retrieves its entity's fact document (top ``k``) after the add."""
    from lmforge.retrieval.database import ChunkDatabase, add_documents, remove_documents

    hits: dict[str, list[bool]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "db"
        shutil.copytree(db_path, copy, ignore=shutil.ignore_patterns("neighbours_*", ".lock"))
        for seed in seeds:
            documents, items = benchmark_items("reading", 24, seed)
            embedder = ChunkDatabase(copy).embedder
            added = add_documents(copy, documents, source=f"breakdown_{seed}", embedder=embedder)
            db = ChunkDatabase(copy)
            db.set_embedder(embedder)
            tokenizer = db.tokenizer  # the database keeps its own copy
            chunk_docs = np.asarray(db.doc)[:, 0]  # once per seed, not per question
            doc_of = {t.split(":", 1)[1]: d for (t, _), d in zip(documents, added["document_ids"]) if t.startswith("fact:")}
            m = db.chunk_len
            for i, item in enumerate(items):
                prompt = tokenizer.encode(item["prompt"])
                prompt = [tokenizer.eos_id] * ((-len(prompt)) % m) + prompt
                ids = db.retrieve(np.array(prompt[-m:])[None], k)[0]
                hit = bool((chunk_docs[ids[ids >= 0]] == doc_of[item["entity"]]).any())
                kind, attribute = READING_QUESTIONS[i % len(READING_QUESTIONS)][:2]
                for group in (_slot(kind, attribute), "all"):
                    hits.setdefault(group, []).append(hit)
            remove_documents(copy, source=f"breakdown_{seed}")
    return {group: float(np.mean(v)) for group, v in hits.items()}


def training_answer_presence(db_path: Path, source: str = "facts", samples: int = 800, k: int = 2) -> float:
    """Share of sampled training answers whose word is in the neighbours the model reads for them."""
    from lmforge.retrieval.database import ChunkDatabase

    db = ChunkDatabase(db_path)
    tokenizer = db.tokenizer
    neighbours = np.load(Path(db_path) / f"neighbours_k{k}" / "neighbours.npy", mmap_mode="r")
    first, n = db.sources[source]["first_chunk"], db.sources[source]["n_chunks"]
    tokens = np.asarray(db.tokens)
    total = hits = 0
    for u in np.random.default_rng(1).choice(np.arange(1, n - 1), min(samples, n - 2), replace=False):
        chunk = first + int(u)
        read = " ".join(tokenizer.decode(tokens[j].tolist()) + tokenizer.decode(tokens[j + 1].tolist())
                        for j in neighbours[chunk] if j >= 0)
        for line in tokenizer.decode(tokens[chunk + 1].tolist()).split("\n"):
            if line.startswith("Answer: ") and line.endswith("."):
                total += 1
                hits += line[:-1].split()[-1] in read
    return hits / max(total, 1)


def table(runs: list[Path], db: Path | None, seeds: list[int]) -> str:
    from lmforge.retrieval.database import ChunkDatabase

    pooled = pooled_by_template(runs)
    recall = fact_recall_by_template(db, seeds) if db is not None else {}
    lines = ["| questions | model before add | model after add | copy baseline | presence baseline | fact retrieved (k=2) |",
             "|---|---|---|---|---|---|"]
    order = [_slot(k, a) for k, a, _, _ in READING_QUESTIONS] + ["seen templates", "held-out templates", "all"]
    for group in order:
        if group not in pooled:
            continue
        cells = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in (pooled[group][c] for c in CONDITIONS)]
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {recall[group]:.3f} |" if group in recall
                     else f"| {group} | " + " | ".join(cells) + " | |")
    if db is not None and "facts" in ChunkDatabase(db).sources:
        lines += ["", f"Training answers whose word is in the neighbours read while predicting them: "
                      f"{training_answer_presence(db):.3f}"]
    return "\n".join(lines) + "\n"


def recall_table(db: Path, seeds: list[int]) -> str:
    """Fact recall by question kind alone (no runs): how well a database's embedder retrieves."""
    recall = fact_recall_by_template(db, seeds)
    order = [_slot(k, a) for k, a, _, _ in READING_QUESTIONS] + ["all"]
    return "\n".join(["| questions | fact retrieved (k=2) |", "|---|---|"]
                     + [f"| {group} | {recall[group]:.3f} |" for group in order if group in recall]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path,
                        help="run directories with eval/facts_reading.json (none: only --db's fact recall)")
    parser.add_argument("--db", type=Path, help="the runs' database (its fact recall is measured on a copy)")
    parser.add_argument("--seeds", default="0,1,2", help="benchmark seeds of the recall measurement")
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args()
    if not args.runs and args.db is None:
        parser.error("give run directories, or --db for the fact recall of a database alone")
    seeds = [int(s) for s in args.seeds.split(",")]
    text = table(args.runs, args.db, seeds) if args.runs else recall_table(args.db, seeds)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
