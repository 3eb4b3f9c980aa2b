"""DataConfig / SourceConfig: loading from dicts, rejecting bad keys, types and values."""

from __future__ import annotations

import pytest

from lmforge.core.config import read_yaml
from lmforge.core.errors import ConfigError
from lmforge.data.config import DataConfig, SourceConfig


def _cfg(**changes):
    base = {"sources": [{"name": "prose", "kind": "files", "path": "x"},
                        {"name": "code", "kind": "demo_code", "max_bytes": 1000, "weight": 2}]}
    return {**base, **changes}


def test_loads_nested_sources():
    cfg = DataConfig.from_dict(_cfg(vocab_size=512))
    assert isinstance(cfg.sources[1], SourceConfig)
    assert cfg.sources[1].max_bytes == 1000 and cfg.sources[1].weight == 2.0
    assert cfg.vocab_size == 512 and cfg.heldout_fraction == 0.05


def test_demo_config_file_loads():
    from pathlib import Path

    cfg = DataConfig.from_dict(read_yaml(Path(__file__).parents[1] / "configs" / "data_demo.yaml"))
    assert [s.kind for s in cfg.sources] == ["demo_literature", "demo_code"]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="vocab_sise: unknown key"):
        DataConfig.from_dict(_cfg(vocab_sise=512))
    bad = _cfg()
    bad["sources"][0]["weigth"] = 1
    with pytest.raises(ConfigError, match=r"sources\[0\]\.weigth: unknown key"):
        DataConfig.from_dict(bad)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="vocab_size: expected int, got str"):
        DataConfig.from_dict(_cfg(vocab_size="big"))
    bad = _cfg()
    bad["sources"][1]["kind"] = "csv"
    known = (r"\(known: demo_code, demo_digits, demo_literature, files, hf, image_folder, image_hf, image_parquet, "
             r"installed_packages, invented_facts, jsonl, kv_recall, parquet, prepared_heldout, synthetic\)")
    with pytest.raises(ConfigError, match=r"sources\[1\]\.kind: unknown source kind 'csv' " + known):
        DataConfig.from_dict(bad)


@pytest.mark.parametrize("changes, message", [
    ({"heldout_fraction": 0.0}, "heldout_fraction must be in"),
    ({"heldout_fraction": 1.5}, "heldout_fraction must be in"),
    ({"vocab_size": 100}, "vocab_size must be at least 257"),
    ({"num_workers": 0}, "num_workers"),
    ({"sources": []}, "at least one source"),
    ({"sources": [{"name": "a", "kind": "demo_code"}, {"name": "a", "kind": "demo_code"}]}, "unique"),
    ({"sources": [{"name": "a", "kind": "jsonl"}]}, "needs a path"),
    ({"sources": [{"name": "a/b", "kind": "demo_code"}]}, "directory name"),
])
def test_invalid_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_dict(_cfg(**changes))


def test_fingerprint_ignores_workers_weights_and_location():
    a = DataConfig.from_dict(_cfg())
    b = DataConfig.from_dict(_cfg(num_workers=7, out_dir="elsewhere"))
    b.sources[0].weight = 9.0
    assert a.fingerprint_dict() == b.fingerprint_dict()
    assert a.fingerprint_dict() != DataConfig.from_dict(_cfg(vocab_size=999)).fingerprint_dict()


def test_new_sections_have_defaults_and_old_configs_load():
    cfg = DataConfig.from_dict(_cfg())
    assert cfg.quality.enabled and cfg.quality.min_words == 50
    assert cfg.near_dedup.shingle_size == 5 and cfg.near_dedup.num_hashes == 128
    assert cfg.decontamination.ngram_size == 13 and cfg.decontamination.heldout_split
    assert cfg.executor == "local" and cfg.mixture_temperature is None
    from pathlib import Path

    raw = read_yaml(Path(__file__).parents[1] / "configs" / "quickstart.yaml")["data"]
    assert DataConfig.from_dict(raw).near_dedup.threshold == 0.7


def test_fingerprint_ignores_how_and_where_the_work_runs():
    a = DataConfig.from_dict(_cfg())
    b = DataConfig.from_dict(_cfg(executor="slurm", slurm={"partition": "cpu", "tasks": 64}, chunk_bytes=10,
                                  mixture_temperature=2.0))
    assert a.fingerprint_dict() == b.fingerprint_dict()
    c = DataConfig.from_dict(_cfg(near_dedup={"threshold": 0.8}))
    assert a.fingerprint_dict() != c.fingerprint_dict()


@pytest.mark.parametrize("changes, message", [
    ({"near_dedup": {"threshold": 0.0}}, "threshold must be in"),
    ({"near_dedup": {"num_bands": 0}}, "num_bands must be >= 1"),
    ({"decontamination": {"ngram_size": 0}}, "ngram_size"),
    ({"mixture_temperature": -1.0}, "mixture_temperature must be > 0"),
    ({"executor": "kubernetes"}, "executor: expected one of"),
    ({"sources": [{"name": "a", "kind": "demo_code", "near_dedup_threshold": 1.5}]}, "near_dedup_threshold"),
    ({"sources": [{"name": "a", "kind": "demo_code", "content": "poetry"}]}, r"content: expected one of"),
])
def test_invalid_new_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_dict(_cfg(**changes))
