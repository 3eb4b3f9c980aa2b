"""How much of the text that follows a chunk do its retrieved neighbours repeat?

For sampled training chunks (with their precomputed neighbours) and for held-out chunks
(retrieved live, as `lmforge retrieval eval` does), compare the next chunk with each
neighbour's continuation, unaligned and aligned (lmforge.retrieval.alignment):

- positional agreement: share of the next chunk's tokens equal to a neighbour continuation's
  token at the same position (what chunked cross-attention can copy);
- share of chunks where a neighbour repeats at least half of the next chunk position by position;
- share of held-out chunks whose next chunk shares a run of >= 8 tokens with a neighbour.

    python bench/retrieval_overlap.py data/demo/retrieval [--data data/demo] [--samples 4000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lmforge.data.shards import ShardSet, load_manifest
from lmforge.eval.retrieval_eval import longest_common_run
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.neighbours import default_neighbours_dir, load_neighbours


def agreement(windows: np.ndarray, targets: np.ndarray, m: int) -> tuple[float, float]:
    same = windows[:, :, m:] == targets[:, None, :]
    return float(same.any(1).mean()), float((same.mean(-1).max(-1) >= 0.5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("--data", default=None, help="prepared data directory (default: the database's)")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("-k", type=int, default=2)
    parser.add_argument("--heldout-tokens", type=int, default=16384)
    args = parser.parse_args()
    db = ChunkDatabase(args.db)
    m = db.chunk_len
    data = Path(args.data or db.manifest["data_dir"])
    nb, _ = load_neighbours(default_neighbours_dir(db.path, args.k), db)
    nxt = np.asarray(db.next)
    rows = np.sort(np.random.default_rng(0).choice(np.flatnonzero(nxt[:len(nb)] >= 0), args.samples, replace=False))
    queries = np.asarray(db.tokens[rows]).astype(np.int64)
    targets = np.asarray(db.tokens[nxt[rows]]).astype(np.int64)
    print(f"training chunks ({len(rows)} sampled, precomputed k={args.k} neighbours)")
    for name, windows in (("unaligned", db.neighbour_tokens(nb[rows])),
                          ("aligned", db.neighbour_tokens(nb[rows], queries))):
        tokens, half = agreement(windows, targets, m)
        print(f"  {name:<10} positional agreement {tokens:.4f}   chunks with >= 50% repeated {half:.4f}")
    manifest = load_manifest(data)
    print(f"held-out chunks (first {args.heldout_tokens} tokens per domain, retrieved live, k={args.k})")
    for source in sorted(manifest["sources"]):
        shard = ShardSet(data, "heldout", source, manifest)
        chunks = shard.get(0, min(len(shard), args.heldout_tokens) // m * m).astype(np.int64).reshape(-1, m)
        if len(chunks) < 2:
            continue
        queries, targets = chunks[:-1], chunks[1:]
        ids = db.retrieve(queries, args.k)
        for name, windows in (("unaligned", db.neighbour_tokens(ids)), ("aligned", db.neighbour_tokens(ids, queries))):
            tokens, half = agreement(windows, targets, m)
            runs = np.stack([longest_common_run(targets, windows[:, j]) for j in range(args.k)], 1).max(1)
            print(f"  {source:<11} {name:<10} positional agreement {tokens:.4f}   chunks with >= 50% repeated "
                  f"{half:.4f}   run >= 8 tokens {float((runs >= 8).mean()):.4f}")


if __name__ == "__main__":
    main()
