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
    with pytest.raises(ConfigError, match=r"sources\[1\]\.kind: expected one of"):
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
