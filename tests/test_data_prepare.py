"""prepare_data end to end on a tiny corpus: shards, manifest, reruns, corruption, isolation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig
from lmforge.data.documents import content_hash
from lmforge.data.prepare import prepare_data
from lmforge.data.shards import ShardSet, check_isolation, load_manifest, verify_shards
from lmforge.data.tokenizer import Tokenizer


def make_config(out_dir, corpus, **changes) -> DataConfig:
    return DataConfig.from_dict({
        "out_dir": str(out_dir), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
        # Small shards, so sources span several shard files.
        "shard_tokens": 6000,
        "sources": [{"name": "prose", "kind": "files", "path": str(corpus / "prose")},
                    {"name": "code", "kind": "files", "path": str(corpus / "code")}],
        **changes,
    })


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = make_config(out, tiny_corpus, num_workers=2)  # also exercises the process pool
    return cfg, prepare_data(cfg)


def test_manifest_counts_and_duplicates(prepared):
    cfg, manifest = prepared
    assert manifest == load_manifest(cfg.out_dir)
    assert manifest["pipeline"]["prose"]["removed_duplicates"] == 1   # doc_dup.txt
    assert manifest["pipeline"]["code"]["removed_duplicates"] == 0
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 300
    for name in ("prose", "code"):
        splits = manifest["sources"][name]
        assert splits["train"]["documents"] + splits["heldout"]["documents"] == 40
        assert splits["heldout"]["documents"] > 0
    assert len(manifest["sources"]["prose"]["train"]["shards"]) > 1
    assert all(s["tokens"] <= cfg.shard_tokens for sp in manifest["sources"].values()
               for info in sp.values() for s in info["shards"])
    assert manifest["isolation"]["overlap"] == 0
    n_shards = sum(len(i["shards"]) for sp in manifest["sources"].values() for i in sp.values())
    assert verify_shards(cfg.out_dir) == n_shards


def test_shards_decode_back_to_documents(prepared, tiny_corpus):
    cfg, manifest = prepared
    tok = Tokenizer.load(f"{cfg.out_dir}/tokenizer.json")
    originals = {content_hash(p.read_text()): p.read_text() for p in (tiny_corpus / "prose").glob("*.txt")}
    for split in ("train", "heldout"):
        tokens = ShardSet(cfg.out_dir, split, "prose")
        assert len(tokens) == manifest["sources"]["prose"][split]["tokens"]
        ends = list(tokens.doc_offsets[1:]) + [len(tokens)]
        for start, end in zip(tokens.doc_offsets, ends):
            ids = tokens.get(int(start), int(end - start))  # may span two shard files
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            text = tok.decode(ids)
            assert originals[content_hash(text)] == text


def test_bytes_match_token_byte_lengths(prepared):
    cfg, manifest = prepared
    lengths = Tokenizer.load(f"{cfg.out_dir}/tokenizer.json").token_byte_lengths()
    tokens = ShardSet(cfg.out_dir, "heldout", "code")
    assert int(lengths[tokens.get(0, len(tokens))].sum()) == manifest["sources"]["code"]["heldout"]["bytes"]


def test_doc_hashes_isolated_and_planted_overlap_detected(prepared, tmp_path):
    cfg, _ = prepared
    report = check_isolation(cfg.out_dir)
    assert report["overlap"] == 0 and report["heldout_docs"] > 0
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out_dir, copy)
    planted = (copy / "doc_hashes" / "train.txt").read_text().split()[3]
    with open(copy / "doc_hashes" / "heldout.txt", "a") as handle:
        handle.write(planted + "\n")
    assert check_isolation(copy) == {"heldout_docs": report["heldout_docs"] + 1, "overlap": 1,
                                     "overlapping_hashes": [planted]}


def test_same_config_is_a_noop_and_rerun_skips_finished_shards(prepared, tiny_corpus, tmp_path, records):
    cfg, manifest = prepared
    copy = tmp_path / "data"
    shutil.copytree(cfg.out_dir, copy)
    same = make_config(copy, tiny_corpus)
    assert prepare_data(same) == manifest  # returned as found, nothing rewritten
    assert any("nothing to do" in r.getMessage() for r in records)
    # Interrupted run: manifest missing, one shard lost; the rest are skipped, not rewritten.
    (copy / "manifest.json").unlink()
    lost = copy / manifest["sources"]["code"]["train"]["shards"][0]["path"]
    lost.unlink()
    kept = copy / manifest["sources"]["prose"]["train"]["shards"][0]["path"]
    mtime = kept.stat().st_mtime_ns
    again = prepare_data(same)
    n_shards = sum(len(i["shards"]) for sp in manifest["sources"].values() for i in sp.values())
    messages = [r.getMessage() for r in records]
    assert f"shards: skipped {n_shards - 1} finished unit(s) of {n_shards}" in messages
    assert "tokenizer: skipped 1 finished unit(s) of 1" in messages
    assert kept.stat().st_mtime_ns == mtime and lost.is_file()
    assert again["sources"] == manifest["sources"]


def test_different_config_refused_unless_overwrite(prepared, tiny_corpus, tmp_path):
    cfg, manifest = prepared
    copy = tmp_path / "data"
    shutil.copytree(cfg.out_dir, copy)
    other = make_config(copy, tiny_corpus, heldout_fraction=0.3)
    with pytest.raises(DataError, match="different config"):
        prepare_data(other)
    assert load_manifest(copy) == manifest  # nothing was touched
    assert prepare_data(other, overwrite=True)["config"]["heldout_fraction"] == 0.3


def test_corrupt_shard_detected(prepared, tmp_path):
    cfg, manifest = prepared
    copy = tmp_path / "data"
    shutil.copytree(cfg.out_dir, copy)
    shard = manifest["sources"]["prose"]["heldout"]["shards"][0]["path"]
    data = bytearray((copy / shard).read_bytes())
    data[10] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard}.*corrupt"):
        verify_shards(copy)


def test_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest.json not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="corrupt manifest"):
        load_manifest(tmp_path)


def test_shard_set_get_spans_boundaries(prepared):
    cfg, _ = prepared
    tokens = ShardSet(cfg.out_dir, "train", "prose")
    assert len(tokens.shards) > 1
    whole = np.concatenate([np.asarray(s) for s in tokens.shards])
    boundary = int(tokens.starts[1])
    np.testing.assert_array_equal(tokens.get(boundary - 5, 10), whole[boundary - 5:boundary + 5])
    with pytest.raises(IndexError):
        tokens.get(len(tokens) - 1, 2)


def test_manifest_is_json_with_config(prepared):
    cfg, _ = prepared
    raw = json.loads((Path(cfg.out_dir) / "manifest.json").read_text())
    assert raw["config"]["sources"][0]["name"] == "prose" and raw["totals"]["removed_duplicates"] == 1


def _as_format_2(folder: Path, **changed) -> None:
    """Rewrite the directory's marker as the previous format wrote it: no settings added since."""
    marker = json.loads((folder / "prepare_config.json").read_text())
    config = marker["config"]
    del config["quality"]["max_non_text_char_fraction"]
    config.pop("steps", None)
    config.update(changed)
    (folder / "prepare_config.json").write_text(json.dumps({"fingerprint": "0" * 64, "format": 2, "config": config}))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64, "format": 2}))


def test_older_format_from_the_same_config_is_prepared_again(prepared, tiny_corpus, tmp_path, records):
    cfg, manifest = prepared
    copy = tmp_path / "data"
    shutil.copytree(cfg.out_dir, copy)
    _as_format_2(copy)
    again = prepare_data(make_config(copy, tiny_corpus))  # settings added since (even nested) are not changes
    assert any("older lmforge data format from the same config" in r.getMessage() for r in records)
    assert again["format"] == manifest["format"] and again["sources"] == manifest["sources"]


def test_older_format_from_another_config_is_refused(prepared, tiny_corpus, tmp_path):
    cfg, _ = prepared
    copy = tmp_path / "data"
    shutil.copytree(cfg.out_dir, copy)
    _as_format_2(copy, vocab_size=512)
    with pytest.raises(DataError, match="different config"):
        prepare_data(make_config(copy, tiny_corpus))
