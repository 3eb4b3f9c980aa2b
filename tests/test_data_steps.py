"""The pipeline as a configured list of steps: validation, a filter added as one module, steps left out."""

from __future__ import annotations

import sys
import textwrap

import pytest

from lmforge.core.errors import ConfigError
from lmforge.data import filters, stages
from lmforge.data.config import DEFAULT_STEPS, DataConfig
from lmforge.data.prepare import prepare_data


def _cfg(out, corpus, **changes) -> dict:
    return {"out_dir": str(out), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
            "sources": [{"name": "prose", "kind": "files", "path": str(corpus / "prose")},
                        {"name": "code", "kind": "files", "path": str(corpus / "code")}],
            **changes}


def _steps(*names: str) -> list[str]:
    return list(names)


@pytest.mark.parametrize("steps, message", [
    (_steps("read", "qualty", "tokenizer", "shards"), "unknown step 'qualty' \\(known: .*quality"),
    (_steps("read", "quality", "quality", "minhash", "dedup", "eval_index", "decontaminate", "tokenizer", "shards"),
     "'quality' is listed more than once"),
    (_steps("read", "quality", "dedup", "minhash", "eval_index", "decontaminate", "tokenizer", "shards"),
     "'dedup' needs 'minhash' before it, but it comes after"),
    (_steps("read", "quality", "dedup", "eval_index", "decontaminate", "tokenizer", "shards"),
     "'dedup' needs 'minhash', which is not listed"),
    (_steps("read", "minhash", "dedup", "eval_index", "decontaminate", "tokenizer", "shards", "quality"),
     "'quality' removes documents, so it must come before 'tokenizer'"),
    (_steps("quality", "read", "minhash", "dedup", "eval_index", "decontaminate", "tokenizer", "shards"),
     "'read' must come first"),
    (_steps("read", "quality", "minhash", "dedup", "eval_index", "decontaminate", "tokenizer"),
     "'shards' is missing"),
    (_steps("read", "quality", "minhash", "dedup", "tokenizer", "shards"),
     "decontamination.enabled is true but 'decontaminate' is not listed"),
    (_steps("read", "quality", "eval_index", "decontaminate", "tokenizer", "shards"),
     "near_dedup.enabled is true but 'dedup' is not listed"),
])
def test_impossible_step_lists_are_named(tmp_path, tiny_corpus, steps, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_dict(_cfg(tmp_path, tiny_corpus, steps=steps), path="data")


def test_default_steps_leave_the_fingerprint_as_it_was(tmp_path, tiny_corpus):
    default = DataConfig.from_dict(_cfg(tmp_path, tiny_corpus))
    assert default.steps == list(DEFAULT_STEPS) and "steps" not in default.fingerprint_dict()
    custom = DataConfig.from_dict(_cfg(tmp_path, tiny_corpus, steps=[s for s in DEFAULT_STEPS if s != "quality"]))
    assert custom.fingerprint_dict()["steps"] == custom.steps  # a different pipeline is different data


FILTER_MODULE = '''
from lmforge.data.stages import ChunkFilter, register_step
from lmforge.data.steps import FilterStep


class OpensWithCastle(FilterStep):
    name = "no_castles"

    def reason(self, doc):
        return "opens_with_castle" if doc.text.lower().startswith(("castle", "crown")) else None


@register_step
class NoCastles(ChunkFilter):
    name = "no_castles"

    def make_filter(self, ctx, source):
        return OpensWithCastle()
'''


@pytest.fixture
def filter_module(tmp_path, monkeypatch):
    """A filter module dropped into lmforge.data.filters (its folder extended with a temporary one)."""
    folder = tmp_path / "more_filters"
    folder.mkdir()
    (folder / "no_castles.py").write_text(textwrap.dedent(FILTER_MODULE))
    monkeypatch.setattr(filters, "__path__", [*filters.__path__, str(folder)])
    monkeypatch.setattr(stages, "_loaded", False)  # discover again
    yield "no_castles"
    stages.STEPS._items.pop("no_castles", None)
    sys.modules.pop("lmforge.data.filters.no_castles", None)


def test_a_filter_is_one_module_and_a_config_line(tmp_path, tiny_corpus, filter_module):
    steps = list(DEFAULT_STEPS)
    steps.insert(steps.index("quality") + 1, filter_module)
    manifest = prepare_data(DataConfig.from_dict(_cfg(tmp_path / "data", tiny_corpus, steps=steps)))
    def opens_with_castle(path):
        return path.read_text().lower().startswith(("castle", "crown"))

    castles = [p for p in (tiny_corpus / "prose").glob("*.txt") if opens_with_castle(p)]
    assert 0 < len(castles) < 41
    prose = manifest["pipeline"]["prose"]
    # doc_dup.txt repeats doc_000.txt: if that opens with a castle the filter took both, else dedup took one.
    duplicate_gone = opens_with_castle(tiny_corpus / "prose" / "doc_000.txt")
    assert prose["removed_no_castles"] == {"opens_with_castle": len(castles)}
    assert prose["removed_duplicates"] == (0 if duplicate_gone else 1)
    assert prose["train_docs"] + prose["heldout_docs"] == 41 - len(castles) - prose["removed_duplicates"]
    assert manifest["totals"]["removed_no_castles"] >= len(castles)
    names = [s["name"] for s in manifest["steps"]]
    assert names == ["normalize", "quality", "no_castles", "exact_dedup", "near_dedup", "decontaminate"]
    step = manifest["steps"][2]
    assert step["removed"]["opens_with_castle"] == step["documents_in"] - step["documents_out"] > 0
    assert manifest["work"]["units"]["no_castles"] == manifest["work"]["units"]["quality"]


def test_steps_left_out_are_not_run(tmp_path, tiny_corpus):
    steps = ["read", "quality", "tokenizer", "shards"]
    cfg = DataConfig.from_dict(_cfg(tmp_path / "data", tiny_corpus, steps=steps, near_dedup={"enabled": False},
                                    decontamination={"enabled": False}))
    manifest = prepare_data(cfg)
    assert set(manifest["work"]["units"]) == set(steps)
    assert "removed_duplicates" not in manifest["pipeline"]["prose"] and "near_dedup" not in manifest
    assert manifest["contamination"]["enabled"] is False
    # Without dedup the duplicate file stays (on the same side of the split as its twin).
    prose = manifest["pipeline"]["prose"]
    assert prose["train_docs"] + prose["heldout_docs"] == 41
    assert not (tmp_path / "data" / "work" / "dedup.done").exists()
    assert prepare_data(cfg) == manifest  # a rerun finds it prepared
