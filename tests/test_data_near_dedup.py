"""MinHash-LSH near-dedup: estimates track Jaccard, clusters keep the fullest text, prepare reports them."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from lmforge.data.config import DataConfig, NearDedupConfig
from lmforge.data.near_dedup import MinHasher, find_clusters
from lmforge.data.ngrams import ngram_hashes, normalized_words, stable_word_hashes, text_ngram_hashes
from lmforge.data.prepare import prepare_data

VOCAB = [f"w{i}" for i in range(3000)]


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(ws: list[str], fraction: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = list(ws)
    for i in rng.sample(range(len(out)), int(fraction * len(out))):
        out[i] = rng.choice(VOCAB)
    return out


def jaccard(a: str, b: str, n: int) -> float:
    x, y = set(text_ngram_hashes(a, n).tolist()), set(text_ngram_hashes(b, n).tolist())
    return len(x & y) / len(x | y)


def test_ngram_hashes_are_stable_and_ignore_case_and_punctuation():
    a = text_ngram_hashes("The cat, the HAT!  The bat.", 2)
    b = text_ngram_hashes("the cat the hat the bat", 2)
    assert np.array_equal(a, b) and len(a) == 5 and a.dtype == np.uint64
    assert normalized_words("Don't stop_now 42") == ["don", "t", "stop_now", "42"]
    assert len(ngram_hashes(stable_word_hashes(["a", "b"]), 3)) == 0
    # blake2b, not Python's salted hash(): the same in every process.
    assert int(stable_word_hashes(["river"])[0]) == 0x9F647F3CE8039A96


def test_signature_similarity_estimates_jaccard():
    cfg = NearDedupConfig(shingle_size=3, num_bands=64, rows_per_band=4)
    hasher = MinHasher(cfg)
    base = words(3000, 0)
    for fraction in (0.02, 0.1, 0.3):
        a, b = " ".join(base), " ".join(edit(base, fraction, 1))
        (sa, _), (sb, _) = hasher.signature(a), hasher.signature(b)
        assert abs(float((sa == sb).mean()) - jaccard(a, b, 3)) < 0.07
    assert hasher.signature("too short") == (None, 0)


def _signed(hasher: MinHasher, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    signed = [hasher.signature(t) for t in texts]
    empty = np.zeros(hasher.cfg.num_hashes, np.uint32)
    return np.stack([s if s is not None else empty for s, _ in signed]), np.array([n for _, n in signed])


def test_clusters_keep_the_largest():
    cfg = NearDedupConfig(shingle_size=3, num_bands=32, rows_per_band=4, threshold=0.5)
    base = words(2000, 0)
    texts = [" ".join(base[:1500]),                  # 0: part of 1
             " ".join(base),                         # 1: the fullest text
             " ".join(words(2000, 5)),               # 2: unrelated
             " ".join(edit(base[:1800], 0.02, 3)),   # 3: a light edit of most of 1
             "short"]                                # 4: no shingles
    signatures, sizes = _signed(MinHasher(cfg), texts)
    clusters, stats = find_clusters(signatures, sizes > 0, np.full(5, 0.5), sizes, cfg)
    assert [c.members for c in clusters] == [[1, 3, 0]]
    assert clusters[0].similarity[0] == 1.0 and min(clusters[0].similarity) > 0.5
    assert stats["documents"] == 4
    # A higher threshold for one row (its source's) keeps it out.
    strict = np.array([0.99, 0.5, 0.5, 0.5, 0.5])
    clusters, _ = find_clusters(signatures, sizes > 0, strict, sizes, cfg)
    assert [c.members for c in clusters] == [[1, 3]]


def test_clusters_do_not_chain():
    # A ~ B (share Q) and B ~ C (share R), A unlike C. A is largest and kept, B joins it;
    # C only resembles the dropped B, so it stays (connected components would drop it).
    cfg = NearDedupConfig(shingle_size=3, num_bands=64, rows_per_band=2)
    p, q, r, s = words(1000, 1), words(1000, 2), words(800, 3), words(900, 4)
    texts = [" ".join(p + q), " ".join(q + r), " ".join(r + s)]
    signatures, sizes = _signed(MinHasher(cfg), texts)
    clusters, stats = find_clusters(signatures, sizes > 0, np.full(3, 0.25), sizes, cfg)
    assert stats["matched_pairs"] == 2
    assert [c.members for c in clusters] == [[0, 1]]


def test_candidate_probability():
    cfg = NearDedupConfig()
    assert cfg.num_hashes == 128 and cfg.candidate_probability(0.7) > 0.999
    assert cfg.candidate_probability(0.2) < 0.05


def test_prepare_reports_a_planted_near_duplicate(tmp_path, tiny_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    original = (corpus / "prose" / "doc_005.txt").read_text().split("\n")
    original[3] = "An entirely different line of words about harbours."
    (corpus / "prose" / "doc_005_copy.txt").write_text("\n".join(original))
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
        "near_dedup": {"threshold": 0.6},
        "sources": [{"name": "prose", "kind": "files", "path": str(corpus / "prose")}]})
    manifest = prepare_data(cfg)
    assert manifest["pipeline"]["prose"]["removed_near_duplicates"] == 1
    assert manifest["pipeline"]["prose"]["removed_duplicates"] == 1  # doc_dup.txt, exact
    near = manifest["near_dedup"]
    assert near["clusters"] == 1 and near["removed"] == 1 and near["report"] == "dedup_report.json"
    report = json.loads((tmp_path / "data" / "dedup_report.json").read_text())
    (cluster,) = report["clusters"]
    assert {m["doc_id"] for m in cluster["members"]} == {"doc_005.txt", "doc_005_copy.txt"}
    assert cluster["members"][1]["similarity"] >= 0.6
    assert report["exact_duplicates"] == [{"source": "prose", "doc_id": "doc_dup.txt",
                                           "duplicate_of": "prose:doc_000.txt"}]
    steps = {s["name"]: s for s in manifest["steps"]}
    assert steps["near_dedup"]["removed"] == {"near_duplicate": 1}
    assert steps["exact_dedup"]["documents_in"] == steps["quality"]["documents_out"]


@pytest.mark.parametrize("bands, rows", [(16, 8), (128, 2)])
def test_weak_bands_are_flagged(bands, rows):
    cfg = NearDedupConfig(num_bands=bands, rows_per_band=rows, threshold=0.7)
    assert (cfg.candidate_probability(0.7) < 0.9) == (rows == 8)
