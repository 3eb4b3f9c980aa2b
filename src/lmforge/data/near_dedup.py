"""Near-duplicate documents: MinHash signatures of word shingles, LSH banding, clusters.

Two documents are near-duplicates when the Jaccard similarity of their sets of word
``shingle_size``-grams reaches a threshold. MinHash estimates it: under a random hash
function, the smallest shingle hash of two sets agrees with probability equal to their
Jaccard similarity, so the fraction of agreeing entries in two signatures of many hash
functions estimates it. Locality-sensitive hashing avoids comparing every pair: the
signature is cut into bands, and only documents that agree on a whole band are compared.
Matched pairs form clusters greedily: documents are visited largest first (most distinct
shingles, then reading order); one that matches an already kept document is dropped as
"near_duplicate" of it, otherwise it is kept. Largest first keeps the fuller text when one
document contains another (a collection and a poem from it); greedy rather than connected
components, so A~B and B~C never drop a C that is unlike the A that stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from lmforge.core.logging import get_logger
from lmforge.data.config import NearDedupConfig
from lmforge.data.documents import Document
from lmforge.data.ngrams import mix64, text_ngram_hashes
from lmforge.data.steps import FilterStep, PipelineStep

log = get_logger(__name__)
EMPTY = np.uint32(0xFFFFFFFF)  # a signature entry no shingle produced
_BLOCK = 4096                  # shingles hashed at once: bounds memory at _BLOCK * num_hashes * 4 bytes
_MAX_BUCKET = 1000             # larger LSH buckets are compared against their first member only


class MinHasher:
    """``num_hashes`` hash functions h_i(x) = a_i * x + b_i (mod 2**32), a_i odd.

    Each is a permutation of 32-bit values; applied to shingle hashes that are already
    well mixed, their minima behave as independent min-wise hashes. 32-bit arithmetic
    halves the memory traffic of 64-bit and is the bulk of near-dedup's cost.
    """

    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0x4D494E48])
        self.a = (rng.integers(0, 2**32, size=cfg.num_hashes, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
        self.b = rng.integers(0, 2**32, size=cfg.num_hashes, dtype=np.uint64).astype(np.uint32)

    def signature(self, text: str) -> tuple[np.ndarray | None, int]:
        """(uint32 [num_hashes], distinct shingles); None for a text shorter than one shingle."""
        shingles = np.unique(text_ngram_hashes(text, self.cfg.shingle_size))
        if len(shingles) == 0:
            return None, 0
        x = (shingles >> np.uint64(32)).astype(np.uint32)  # the best-mixed half
        out = np.full(self.cfg.num_hashes, EMPTY, dtype=np.uint32)
        for start in range(0, len(x), _BLOCK):
            block = x[start:start + _BLOCK, None] * self.a[None, :] + self.b[None, :]
            np.minimum(out, block.min(axis=0), out=out)
        return out, int(len(shingles))


class MinHashSignatures(PipelineStep):
    """Annotate each document with ``meta["minhash"]`` (None when it is too short to shingle)
    and ``meta["shingles"]`` (how many distinct shingles it has)."""

    name = "minhash"

    def __init__(self, cfg: NearDedupConfig):
        super().__init__()
        self.hasher = MinHasher(cfg)

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in docs:
            doc.meta["minhash"], doc.meta["shingles"] = self.hasher.signature(doc.text)
            yield doc


@dataclass
class Cluster:
    """Near-duplicate documents (rows of the signature matrix); ``members[0]`` is kept, the
    others each matched it."""

    members: list[int]
    similarity: list[float]  # estimated Jaccard similarity of each member to the kept one (1.0 for itself)


def _band_pairs(signatures: np.ndarray, rows: np.ndarray, cfg: NearDedupConfig) -> np.ndarray:
    """Candidate pairs int64 [k, 2] (i < j): rows that agree on all entries of some band."""
    found = []
    r = cfg.rows_per_band
    for band in range(cfg.num_bands):
        part = signatures[rows, band * r:(band + 1) * r].astype(np.uint64)
        key = np.zeros(len(rows), dtype=np.uint64)
        for column in range(r):
            key = mix64(key * np.uint64(0x9E3779B97F4A7C15) + part[:, column])
        order = np.argsort(key, kind="stable")
        key_sorted = key[order]
        starts = np.flatnonzero(np.concatenate([[True], key_sorted[1:] != key_sorted[:-1]]))
        sizes = np.diff(np.concatenate([starts, [len(key_sorted)]]))
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = np.sort(rows[order[start:start + size]])
            if size > _MAX_BUCKET:
                log.warning("near-dedup: an LSH bucket holds %d documents; comparing them with its first "
                            "only (many near-empty documents? a threshold far below the bands' curve?)", size)
                pairs = np.stack([np.full(size - 1, members[0]), members[1:]], axis=1)
            else:
                i, j = np.triu_indices(size, 1)
                pairs = np.stack([members[i], members[j]], axis=1)
            found.append(pairs)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    n = np.int64(len(signatures))
    unique = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([unique // n, unique % n], axis=1)


def estimated_similarity(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of agreeing signature entries for each pair: the Jaccard estimate."""
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), 65536):
        block = pairs[start:start + 65536]
        out[start:start + len(block)] = (signatures[block[:, 0]] == signatures[block[:, 1]]).mean(axis=1)
    return out


def find_clusters(signatures: np.ndarray, valid: np.ndarray, thresholds: np.ndarray, sizes: np.ndarray,
                  cfg: NearDedupConfig) -> tuple[list[Cluster], dict]:
    """Clusters of near-duplicates among the ``valid`` rows of ``signatures`` (uint32 [n, num_hashes]).

    A pair matches when its estimated similarity reaches the larger of its two rows'
    ``thresholds``. Rows are visited by descending ``sizes``, then row order (reading
    order); each row that matches a kept row joins that row's cluster, the others are kept.
    """
    rows = np.flatnonzero(valid)
    pairs = _band_pairs(signatures, rows, cfg) if len(rows) > 1 else np.zeros((0, 2), np.int64)
    similarity = estimated_similarity(signatures, pairs)
    needed = np.maximum(thresholds[pairs[:, 0]], thresholds[pairs[:, 1]]) if len(pairs) else np.zeros(0)
    matched = similarity >= needed
    neighbours: dict[int, dict[int, float]] = {}
    for (i, j), sim in zip(pairs[matched].tolist(), similarity[matched].tolist()):
        neighbours.setdefault(i, {})[j] = sim
        neighbours.setdefault(j, {})[i] = sim
    order = sorted(neighbours, key=lambda row: (-int(sizes[row]), row))
    kept_of: dict[int, int] = {}   # removed row -> the kept row it duplicates
    members: dict[int, list[int]] = {}
    for row in order:
        kept = [(sim, -other) for other, sim in neighbours[row].items() if other in members]
        if kept:
            best = -max(kept)[1]   # the most similar kept document
            kept_of[row] = best
            members[best].append(row)
        else:
            members[row] = [row]
    clusters = []
    for kept, group in sorted(members.items()):
        if len(group) > 1:
            sims = [1.0] + [round(neighbours[kept][m], 4) for m in group[1:]]
            clusters.append(Cluster(members=group, similarity=sims))
    stats = {"documents": int(len(rows)), "candidate_pairs": int(len(pairs)), "matched_pairs": int(matched.sum())}
    return clusters, stats


class DropNearDuplicates(FilterStep):
    """Remove documents whose ``meta["near_duplicate_of"]`` is set ("near_duplicate")."""

    name = "near_dedup"

    def reason(self, doc: Document) -> str | None:
        return "near_duplicate" if doc.meta.get("near_duplicate_of") else None
