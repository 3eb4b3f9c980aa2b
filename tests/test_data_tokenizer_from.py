"""``data.tokenizer_from``: new data prepared with a parent's tokenizer (continual pretraining),
on real prepared directories: the same tokenizer and ids, errors naming the key, changes detected."""

from __future__ import annotations

import random
import shutil

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import sha256_file
from lmforge.data.config import DataConfig
from lmforge.data.documents import content_hash
from lmforge.data.prepare import fingerprint, prepare_data
from lmforge.data.shards import ShardSet, check_isolation, load_manifest, verify_shards
from lmforge.data.tokenizer import Tokenizer, require_same_tokenizer, same_tokenizer

# Words the parent's corpus (conftest.WORDS) never has, so the child's text is new to its tokenizer.
NEW_WORDS = ("quasar nebula photon orbit comet galaxy pulsar meteor zenith eclipse telescope "
             "gravity spectrum asteroid plasma neutron").split()


def data_config(out_dir, sources, **changes) -> DataConfig:
    return DataConfig.from_dict({"out_dir": str(out_dir), "vocab_size": 300, "heldout_fraction": 0.2,
                                 "num_workers": 1, "sources": sources, **changes})


@pytest.fixture(scope="module")
def new_corpus(tmp_path_factory):
    """A second domain of text, about other things than the parent's."""
    root = tmp_path_factory.mktemp("new_corpus")
    rng = random.Random(1)
    for i in range(20):
        lines = [" ".join(rng.choice(NEW_WORDS) for _ in range(rng.randint(5, 9))).capitalize() + "."
                 for _ in range(rng.randint(15, 25))]
        (root / f"doc_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


def child_config(out_dir, corpus, tokenizer_from, **changes) -> DataConfig:
    # vocab_size differs from the parent's 300: it is ignored (a warning says so).
    return data_config(out_dir, [{"name": "astro", "kind": "files", "path": str(corpus)}],
                       tokenizer_from=str(tokenizer_from), vocab_size=512, **changes)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("parent") / "data"
    prepare_data(data_config(out, [{"name": "prose", "kind": "files", "path": str(tiny_corpus / "prose")}]))
    return out


@pytest.fixture(scope="module")
def child(tmp_path_factory, parent, new_corpus):
    cfg = child_config(tmp_path_factory.mktemp("child") / "data", new_corpus, parent)
    return cfg, prepare_data(cfg)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, new_corpus):
    """A tokenizer.json that is not the parent's (trained on the new corpus)."""
    path = tmp_path_factory.mktemp("other_tokenizer") / "tokenizer.json"
    Tokenizer.train((p.read_text() for p in sorted(new_corpus.glob("*.txt"))), 280).save(path)
    return path


def test_child_has_the_parents_tokenizer(parent, child):
    cfg, manifest = child
    parent_tok, child_tok = Tokenizer.load(parent / "tokenizer.json"), Tokenizer.load(f"{cfg.out_dir}/tokenizer.json")
    assert child_tok.sha256 == parent_tok.sha256 == load_manifest(parent)["tokenizer"]["sha256"]
    # Byte for byte: runs and checkpoints compare the file's own digest.
    assert sha256_file(f"{cfg.out_dir}/tokenizer.json") == sha256_file(parent / "tokenizer.json")
    assert manifest["tokenizer"]["vocab_size"] == parent_tok.vocab_size == 300  # not the 512 asked for
    assert manifest["tokenizer"]["tokenizer_from"] == {"path": str(parent.resolve() / "tokenizer.json"),
                                                       "sha256": parent_tok.sha256}
    assert require_same_tokenizer(parent, cfg.out_dir, f"{cfg.out_dir}/tokenizer.json") == parent_tok.sha256
    assert same_tokenizer(parent, cfg.out_dir)
    # Held-out isolation is still checked and recorded by the tokenizer step.
    assert check_isolation(cfg.out_dir)["overlap"] == 0 and manifest["isolation"]["heldout_docs"] > 0
    assert verify_shards(cfg.out_dir) > 0


def test_child_shards_decode_back_to_its_documents(parent, child, new_corpus):
    cfg, manifest = child
    tok = Tokenizer.load(parent / "tokenizer.json")  # the parent's own file decodes the child's shards
    originals = {content_hash(p.read_text()): p.read_text() for p in new_corpus.glob("*.txt")}
    decoded = 0
    for split in ("train", "heldout"):
        tokens = ShardSet(cfg.out_dir, split, "astro")
        assert len(tokens) == manifest["sources"]["astro"][split]["tokens"] > 0
        ends = list(tokens.doc_offsets[1:]) + [len(tokens)]
        for start, end in zip(tokens.doc_offsets, ends):
            ids = tokens.get(int(start), int(end - start))
            assert ids[-1] == tok.eos_id and int(ids.max()) < tok.vocab_size
            text = tok.decode(ids)
            assert originals[content_hash(text)] == text
            decoded += 1
    assert decoded == manifest["totals"]["train"]["documents"] + manifest["totals"]["heldout"]["documents"] > 0


def test_missing_or_unusable_tokenizer_from_is_named(tmp_path, new_corpus, parent):
    missing = tmp_path / "no_such_data"
    with pytest.raises(DataError, match=f"data.tokenizer_from: {missing} does not exist"):
        prepare_data(child_config(tmp_path / "a", new_corpus, missing))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="data.tokenizer_from: .*empty_dir is a directory without tokenizer.json"):
        prepare_data(child_config(tmp_path / "b", new_corpus, empty))
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="data.tokenizer_from: .*garbage.json is not a usable byte-level tokenizer"):
        prepare_data(child_config(tmp_path / "c", new_corpus, garbage))
    # The failures happened before any work: nothing was prepared.
    assert not any((tmp_path / name / "tokenizer.json").exists() for name in "abc")
    with pytest.raises(DataError, match="data.tokenizer_from: .* is this preparation's own out_dir"):
        prepare_data(child_config(parent, new_corpus, parent))
    with pytest.raises(ConfigError, match="tokenizer_from: must be the path"):
        child_config(tmp_path / "d", new_corpus, "  ")


def test_changed_tokenizer_from_is_refused_unless_overwrite(child, new_corpus, other_tokenizer, tmp_path):
    cfg, manifest = child
    copy = tmp_path / "data"
    shutil.copytree(cfg.out_dir, copy)
    assert prepare_data(child_config(copy, new_corpus, cfg.tokenizer_from)) == manifest  # same: a no-op
    changed = child_config(copy, new_corpus, other_tokenizer)
    with pytest.raises(DataError, match="different config"):
        prepare_data(changed)
    assert load_manifest(copy) == manifest  # nothing was touched
    again = prepare_data(changed, overwrite=True)
    assert again["tokenizer"]["sha256"] == Tokenizer.load(other_tokenizer).sha256 != manifest["tokenizer"]["sha256"]
    assert again["tokenizer"]["vocab_size"] == 280
    assert not same_tokenizer(copy, cfg.tokenizer_from)
    with pytest.raises(DataError) as caught:
        require_same_tokenizer(cfg.tokenizer_from, copy)
    for part in (copy / "tokenizer.json", manifest["tokenizer"]["sha256"], again["tokenizer"]["sha256"]):
        assert str(part) in str(caught.value)


def test_parent_tokenizer_replaced_in_place_is_copied_again(child, new_corpus, other_tokenizer, tmp_path, records):
    cfg, manifest = child
    parent_file = tmp_path / "parent_tokenizer.json"
    shutil.copyfile(other_tokenizer, parent_file)
    copy = tmp_path / "data"
    first = prepare_data(child_config(copy, new_corpus, parent_file))
    assert first["tokenizer"]["sha256"] == Tokenizer.load(other_tokenizer).sha256
    assert first["sources"] != manifest["sources"]
    assert any(r.getMessage().startswith("data.vocab_size (512) is ignored: the tokenizer from data.tokenizer_from")
               and r.getMessage().endswith("has 280 tokens") for r in records)
    shutil.copyfile(f"{cfg.out_dir}/tokenizer.json", parent_file)  # same path, another tokenizer
    again = prepare_data(child_config(copy, new_corpus, parent_file))
    assert any("changed since" in r.getMessage() for r in records)
    assert again["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert again["sources"] == manifest["sources"]  # the shards were written again with it


def test_vocab_size_is_no_setting_when_the_tokenizer_comes_from_elsewhere(tmp_path, new_corpus, parent):
    def fp(**changes):
        return fingerprint(data_config(tmp_path, [{"name": "astro", "kind": "files", "path": str(new_corpus)}],
                                       **changes))

    assert fp(tokenizer_from=str(parent), vocab_size=512) == fp(tokenizer_from=str(parent), vocab_size=1024)
    assert fp(vocab_size=512) != fp(vocab_size=1024)
    assert fp(tokenizer_from=str(parent)) != fp(tokenizer_from=str(tmp_path / "elsewhere"))
    # Unset, it leaves the fingerprint of data prepared before the option as it was.
    assert "tokenizer_from" not in data_config(tmp_path, [{"name": "x", "kind": "demo_code"}]).fingerprint_dict()
