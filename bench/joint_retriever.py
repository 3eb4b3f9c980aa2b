"""Reference rows and the markdown table for `lmforge retrieval train-retriever` results (docs/retrieval.md).

Reads OUT/distractor_facts.json written by

    lmforge retrieval train-retriever RUN --out OUT --retrievers frozen_minilm,frozen_bag_of_tokens,query_only,joint ...

and adds, on the same held-out questions and the same task databases (OUT/seed{N}/db_trainable):

- ``oracle_fact``: the RETRO model reads the first k chunks of the question's own fact document
  (what a perfect retriever gives the reader: the accuracy ceiling of this model);
- ``no_retrieval``: the model without neighbours.

    python bench/joint_retriever.py RUN OUT [OUT ...]     # several OUTs (other seeds) are pooled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.distractor_facts import (evaluate_retriever, fact_document_ids, make_distractor_setting,
                                           query_chunks, summarise)
from lmforge.eval.facts import score_questions
from lmforge.nn.loading import load_model
from lmforge.retrieval.database import ChunkDatabase


class OracleRetriever:
    """Returns the first k chunks of each query's own fact document (query chunk -> document)."""

    def __init__(self, db: ChunkDatabase, items: list[dict], chunks: np.ndarray):
        docs = {d["id"]: d for d in db.documents}
        self.by_chunk = {tuple(c.tolist()): docs[int(d)] for c, d in zip(chunks, fact_document_ids(db, items))}

    def retrieve(self, chunks: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(chunks), k), -1, dtype=np.int64)
        for i, chunk in enumerate(np.asarray(chunks)):
            doc = self.by_chunk.get(tuple(chunk.tolist()))
            if doc is not None:
                n = min(k, doc["n_chunks"])
                out[i, :n] = doc["first_chunk"] + np.arange(n)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("out", nargs="+", help="train-retriever output folders (their seeds are pooled)")
    args = parser.parse_args()
    results = [json.loads((Path(o) / "distractor_facts.json").read_text()) for o in args.out]
    result = {**results[0], "per_seed": [s for r in results for s in r["per_seed"]]}
    folder_of = {s["seed"]: Path(o) for o, r in zip(args.out, results) for s in r["per_seed"]}
    names = [n for n in results[0]["summary"] if all(n in s for s in result["per_seed"])]
    result["summary"] = summarise(result["per_seed"], names)
    model, _, checkpoint = load_model(args.run)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    references = []
    for seed_result in result["per_seed"]:
        seed = seed_result["seed"]
        setting = make_distractor_setting(result["train_entities"], result["eval_entities"], seed)
        db = ChunkDatabase(folder_of[seed] / f"seed{seed}" / "db_trainable")
        items = setting["eval_questions"]
        oracle = OracleRetriever(db, items, query_chunks(tokenizer, items, db.chunk_len))
        entry = {"seed": seed, "oracle_fact": evaluate_retriever(model, tokenizer, db, items, oracle)}
        plain = score_questions(model, tokenizer, items, None)
        entry["no_retrieval"] = {**entry["oracle_fact"], "accuracy": plain["accuracy"],
                                 "accuracy_scores": plain["scores"], "recall_scores": [0.0] * len(items),
                                 "recall_at_1": 0.0}
        references.append(entry)
    summary = {**result["summary"], **summarise(references, ["oracle_fact", "no_retrieval"])}
    (Path(args.out[0]) / "pooled.json").write_text(json.dumps({"summary": summary, "per_seed": references,
                                                               "outputs": args.out}, indent=1))
    print("| retriever | held-out recall@1 [95% CI] | answer accuracy [95% CI] | per seed (recall@1 / accuracy) |")
    print("|---|---|---|---|")
    for name, entry in summary.items():
        r, a = entry["recall_at_1"], entry["accuracy"]
        seeds = ", ".join(f"{x:.2f} / {y:.2f}" for x, y in zip(r["per_seed"], a["per_seed"]))
        print(f"| {name} | {r['mean']:.3f} [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}] | {a['mean']:.3f} "
              f"[{a['interval'][0]:.2f}, {a['interval'][1]:.2f}] | {seeds} |")
    for seed_result in result["per_seed"]:
        for name in ("query_only", "joint"):
            if name in seed_result:
                t = seed_result[name]["training"]
                costs = t["refreshes"]
                print(f"seed {seed_result['seed']} {name}: train recall@1 {seed_result[name]['train_recall_at_1']:.3f}, "
                      f"{t['seconds']:.0f} s, {len(costs)} refreshes of {costs[-1]['chunks']} chunks, "
                      f"{sum(c['seconds'] for c in costs):.2f} s in all, {t['cached_pairs']} LM-scored pairs")


if __name__ == "__main__":
    main()
