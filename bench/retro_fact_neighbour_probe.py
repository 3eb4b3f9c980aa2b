"""Does a trained RETRO model read a fact document it is handed? A probe on the training distribution.

For windows of the ``invented_facts`` source (the ``facts`` source of the run's database), the
model's loss on the tokens that a question chunk's neighbours inform (RETRO's causal shift: from the
chunk's last token to the next chunk's last but one) is measured twice on the same windows: with
the precomputed (retrieved) neighbours, and with a chunk of the question's own fact document in
the first slot (``retrieval.gold_fact_rate`` = 1, :mod:`lmforge.retrieval.fact_pairs`). A model
that reads gains on the answer words; one that does not scores the same. Also reported: the loss
on the answer words alone (the last word before each ".\\n" that ends an "Answer:" line).

    python bench/retro_fact_neighbour_probe.py RUN [RUN ...] --db DATA/retrieval [--batches 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.nn.loading import load_model
from lmforge.retrieval.batches import RetroLoader
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.fact_pairs import fact_chunks_of_training_chunks, question_fact_documents
from lmforge.retrieval.neighbours import default_neighbours_dir, load_neighbours


def answer_positions(db: ChunkDatabase, targets: np.ndarray) -> np.ndarray:
    """True at target tokens inside an answer word (the text between the prompt and ".\\n" of an
    "Answer:" line: the word(s) after the line's last space)."""
    pieces = [db.tokenizer.decode([int(t)]) for t in targets]
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])  # token i: characters [b_i, b_i+1)
    text = "".join(pieces)
    mask = np.zeros(len(targets), dtype=bool)
    position = 0
    while (line := text.find("\nAnswer:", position)) >= 0 and (end := text.find(".\n", line)) >= 0:
        word = text.rfind(" ", line, end) + 1
        mask |= (bounds[:-1] < end) & (bounds[1:] > word)
        position = end
    return mask


def probe(run: Path, db: ChunkDatabase, fact_chunks: tuple[np.ndarray, np.ndarray], batches: int, seed: int) -> dict:
    model, config, _ = load_model(run)
    k = config["model"]["retro"]["n_neighbours"]
    neighbours, manifest = load_neighbours(default_neighbours_dir(db.path, k), db)
    common = dict(seq_len=config["train"]["seq_len"], batch_size=8, seed=seed, k=k, weights={"facts": 1.0},
                  align=config["model"]["retro"].get("align_neighbours", True),
                  exclusion_radius=int(manifest.get("exclusion_radius", 8)))
    retrieved = RetroLoader(db, neighbours, **common)
    given = RetroLoader(db, neighbours, **common, gold_fact_rate=1.0, fact_chunks=fact_chunks)
    m = db.chunk_len
    sums = {"span": [0.0, 0.0, 0], "answer": [0.0, 0.0, 0]}
    present = [0, 0]  # answer words found in the fact chunk given, answer words
    with torch.no_grad():
        for _ in range(batches):
            x, y, with_fact = given.next_batch()
            _, _, plain = retrieved.next_batch()
            losses = []
            for nb in (plain, with_fact):
                logits = model(x, neighbours=nb).logits
                losses.append(F.cross_entropy(logits.transpose(1, 2), y, reduction="none").numpy())
            changed = (with_fact[:, :, 0] != plain[:, :, 0]).any(-1).numpy()  # [B, chunks]
            for row in range(x.shape[0]):
                span = np.zeros(y.shape[1], dtype=bool)
                for u in np.flatnonzero(changed[row]):
                    span[u * m + m - 1:(u + 1) * m + m - 1] = True
                answers = span & answer_positions(db, y[row].numpy())
                for u in np.flatnonzero(changed[row]):  # is each answer word in the fact chunk it was given?
                    window = np.zeros_like(answers)
                    window[u * m + m - 1:(u + 1) * m + m - 1] = True
                    given_text = db.tokenizer.decode(with_fact[row, u, 0].tolist())
                    for word in _words(db, y[row].numpy(), answers & window):
                        present[0] += word in given_text
                        present[1] += 1
                for name, mask in (("span", span), ("answer", answers)):
                    sums[name][0] += float(losses[0][row][mask].sum())
                    sums[name][1] += float(losses[1][row][mask].sum())
                    sums[name][2] += int(mask.sum())
    out: dict = {name: {"tokens": n, "loss_retrieved": a / max(n, 1), "loss_fact_given": b / max(n, 1)}
                 for name, (a, b, n) in sums.items()}
    out["answer_word_in_fact_chunk_given"] = present[0] / max(present[1], 1)
    return out


def _words(db: ChunkDatabase, targets: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each run of consecutive True positions of ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [db.tokenizer.decode(targets[a:b].tolist()).strip() for a, b in zip(edges[::2], edges[1::2])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--db", required=True, help="the runs' training database (with a 'facts' source)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=12345, help="loader seed (batches unlike the training order)")
    args = parser.parse_args()
    db = ChunkDatabase(args.db)
    fact_chunks = fact_chunks_of_training_chunks(db, question_fact_documents(db, "facts"))  # once for every run
    results = {str(run): probe(run, db, fact_chunks, args.batches, args.seed) for run in args.runs}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
