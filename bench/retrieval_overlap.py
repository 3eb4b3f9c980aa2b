"""How much of the text that follows a chunk do its retrieved neighbours repeat?

For sampled training chunks (with their precomputed neighbours) and for held-out chunks
(retrieved live, as `lmforge retrieval eval` does), compare the next chunk with each
neighbour's continuation, unaligned and aligned (lmforge.retrieval.alignment):

- positional agreement: share of the next chunk's tokens equal to a neighbour continuation's
  token at the same position (what chunked cross-attention can copy);
- share of chunks where a neighbour repeats at least half of the next chunk position by position;
- share of held-out chunks whose next chunk shares a run of >= 8 tokens with a neighbour.

    python bench/retrieval_overlap.py data/demo/retrieval [--data data/demo] [--samples 4000]

``figure`` draws RETRO's leakage analysis from `lmforge retrieval eval` results (their
``chunk_overlap`` section: held-out bpb with and without retrieval by how much of each chunk
the database repeats), one line pair per database, and writes a PNG, a Markdown table and
the numbers as JSON (docs/retrieval.md, "Large databases and gains by overlap")::

    python bench/retrieval_overlap.py figure --result decontaminated=A.json --result raw=B.json \\
        --out docs/results/retro_large

Its inputs come from `lmforge retrieval eval`, on chosen held-out domains only where the rest need
not be scored at that length (the whole held-out code of data/demo is 169k tokens; literature,
which no package repeats)::

    lmforge retrieval eval RUN --db DB --domains code --max-tokens 200000 --fractions 1.0 --out A.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lmforge.data.shards import ShardSet, load_manifest
from lmforge.eval.retrieval_eval import longest_common_run
from lmforge.retrieval.database import ChunkDatabase
from lmforge.retrieval.neighbours import default_neighbours_dir, load_neighbours


def agreement(windows: np.ndarray, targets: np.ndarray, m: int) -> tuple[float, float]:
    same = windows[:, :, m:] == targets[:, None, :]
    return float(same.any(1).mean()), float((same.mean(-1).max(-1) >= 0.5).mean())


def overlap_table(results: dict[str, dict]) -> str:
    """Markdown: per database and bucket of r(C), chunks, bpb without / with retrieval and the gain."""
    lines = ["| database | r(C) | chunks | bpb without | bpb with | gain (bpb) | gain, 95% interval |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, result in results.items():
        overlap = result["chunk_overlap"]
        for group, prefix in (("buckets", ""), ("cumulative", "all with r ")):
            for bucket, entry in overlap[group].items():
                if not entry["chunks"]:
                    lines.append(f"| {name} | {prefix}{bucket} | 0 | – | – | – | – |")
                    continue
                gain = entry["bpb_without"] - entry["bpb_with"]
                low, high = entry.get("gain_interval", (float("nan"), float("nan")))
                lines.append(f"| {name} | {prefix}{bucket} | {entry['chunks']} | {entry['bpb_without']:.4f} | "
                             f"{entry['bpb_with']:.4f} | {gain:+.4f} | [{low:+.4f}, {high:+.4f}] |")
    return "\n".join(lines) + "\n"


def overlap_figure(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpb, ax_gain, ax_cum) = plt.subplots(1, 3, figsize=(16, 4.4))
    for colour, (name, result) in zip(("tab:blue", "tab:red", "tab:green", "tab:purple"), results.items()):
        buckets = result["chunk_overlap"]["buckets"]
        names = [b for b, e in buckets.items() if e["chunks"]]
        x = np.arange(len(buckets))[[list(buckets).index(b) for b in names]]
        without = [buckets[b]["bpb_without"] for b in names]
        with_ = [buckets[b]["bpb_with"] for b in names]
        ax_bpb.plot(x, without, "--", color=colour, marker="o", label=f"{name}: without retrieval")
        ax_bpb.plot(x, with_, "-", color=colour, marker="s", label=f"{name}: with retrieval")
        gains = np.array(without) - np.array(with_)
        intervals = np.array([buckets[b].get("gain_interval", [g, g]) for b, g in zip(names, gains)]).reshape(-1, 2)
        ax_gain.bar(x + (0.2 if colour != "tab:blue" else -0.2), gains, width=0.4, color=colour, label=name,
                    yerr=np.abs(intervals.T - gains), capsize=3, ecolor="black")
        cumulative = result["chunk_overlap"]["cumulative"]
        alphas = [a for a, e in cumulative.items() if e["chunks"]]
        ax_cum.plot([float(a[2:]) for a in alphas],
                    [cumulative[a]["bpb_without"] - cumulative[a]["bpb_with"] for a in alphas],
                    color=colour, marker="o", label=name)
        for xi, b in zip(x, names):
            ax_gain.annotate(str(buckets[b]["chunks"]), (xi + (0.2 if colour != "tab:blue" else -0.2), 0),
                             ha="center", va="bottom", fontsize=7)
    labels = list(next(iter(results.values()))["chunk_overlap"]["buckets"])
    for ax in (ax_bpb, ax_gain):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("chunk overlap r(C) with the database")
        ax.grid(alpha=0.3)
    ax_bpb.set_ylabel("held-out bits per byte")
    ax_bpb.legend(fontsize=7)
    ax_gain.axhline(0, color="black", lw=0.8)
    ax_gain.set_ylabel("gain from retrieval (bpb without - with)")
    ax_gain.set_title("numbers: evaluated chunks per bucket; bars: 95% bootstrap over chunks", fontsize=8)
    ax_gain.legend(fontsize=7)
    ax_cum.set_xlabel("alpha: chunks with r(C) <= alpha (the paper's filter)")
    ax_cum.set_ylabel("gain from retrieval (bpb)")
    ax_cum.axhline(0, color="black", lw=0.8)
    ax_cum.grid(alpha=0.3)
    ax_cum.legend(fontsize=7)
    fig.suptitle("RETRO leakage analysis: held-out bpb by how much of each chunk the database repeats")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="retrieval_overlap.py figure")
    parser.add_argument("--result", action="append", required=True, metavar="NAME=PATH",
                        help="a `lmforge retrieval eval` JSON result, named (repeatable)")
    parser.add_argument("--out", required=True, help="folder for overlap.png, overlap.md, overlap.json")
    args = parser.parse_args(argv)
    results = {}
    for item in args.result:
        name, _, path = item.partition("=")
        result = json.loads(Path(path).read_text())
        if not result.get("chunk_overlap", {}).get("chunks"):
            raise SystemExit(f"{path}: no chunk_overlap section (rerun `lmforge retrieval eval`)")
        results[name] = result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overlap_figure(results, out / "overlap.png")
    (out / "overlap.md").write_text(overlap_table(results))
    (out / "overlap.json").write_text(json.dumps(
        {name: {"database": r["database"], "checkpoint": r["checkpoint"], "bpb": r["bpb"],
                "chunk_overlap": r["chunk_overlap"]} for name, r in results.items()}, indent=1))
    print(overlap_table(results))
    print(f"written: {out / 'overlap.png'}, {out / 'overlap.md'}, {out / 'overlap.json'}")


def main() -> None:
    if sys.argv[1:2] == ["figure"]:
        figure_main(sys.argv[2:])
        return
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
