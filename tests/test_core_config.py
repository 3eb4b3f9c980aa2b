"""Config loading: unknown keys, wrong types and bad overrides get messages naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from conftest import run_cli, tiny_run_dict, write_config
from lmforge.core.config import Config, apply_overrides
from lmforge.core.errors import ConfigError


@dataclass
class Inner(Config):
    width: int = 4
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer(Config):
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    maybe: int | None = None


def test_valid_nested_config_round_trips():
    cfg = Outer.from_dict({"name": "y", "inner": {"width": 8, "rate": 1}, "tags": ["t"], "maybe": 3})
    assert cfg.inner.width == 8 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert Outer.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"widht": 8}}, "inner.widht: unknown key"),
        ({"inner": {"width": "eight"}}, "inner.width: expected int, got str 'eight'"),
        ({"inner": {"width": True}}, "inner.width: expected int, got bool"),
        ({"inner": {"mode": "c"}}, "inner.mode: expected one of 'a', 'b'"),
        ({"tags": "t"}, "tags: expected list of str"),
        ({"inner": 3}, "inner: expected mapping"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Outer.from_dict(data)


def test_overrides_parse_values_as_yaml():
    data = apply_overrides({"inner": {"width": 4}}, ["inner.width=8", "tags=[a, b]", "maybe=null"])
    cfg = Outer.from_dict(data)
    assert cfg.inner.width == 8 and cfg.tags == ["a", "b"] and cfg.maybe is None
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["inner.width"])


def test_a_float_in_exponent_notation_is_a_float_in_yaml_and_overrides():
    # PyYAML (YAML 1.1) reads 3e-4 as the string "3e-4"; a float field takes the number
    assert Outer.from_dict(apply_overrides({}, ["inner.rate=3e-4"])).inner.rate == 3e-4
    assert Outer.from_dict({"inner": {"rate": "-1E6"}}).inner.rate == -1e6
    for text in ("3e", "e5", "abc"):
        with pytest.raises(ConfigError, match="inner.rate: expected float"):
            Outer.from_dict({"inner": {"rate": text}})


def test_cli_rejects_unknown_key_and_wrong_type(tmp_path, tiny_corpus):
    config = write_config(tmp_path / "c.yaml", tiny_run_dict(tmp_path, tiny_corpus))
    result = run_cli("train", str(config), "--set", "model.n_layerz=3")
    assert result.returncode == 2
    assert "model.n_layerz: unknown key for ModelConfig" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("train", str(config), "--set", "train.steps=abc")
    assert result.returncode == 2 and "train.steps: expected int, got str 'abc'" in result.stderr
    result = run_cli("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a rejected config


def test_run_config_checks_cross_field_constraints(tmp_path, tiny_corpus):
    from lmforge.train.config import RunConfig

    data = tiny_run_dict(tmp_path, tiny_corpus, train={"seq_len": 64})
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        RunConfig.from_dict(data)


def test_errors_inside_an_optional_section_name_the_inner_key():
    from lmforge.core.errors import ConfigError
    from lmforge.nn.config import ModelConfig

    with pytest.raises(ConfigError, match=r"model\.moe\.top_k: expected int"):
        ModelConfig.from_dict({"moe": {"n_experts": 4, "top_k": "two"}}, path="model")
    with pytest.raises(ConfigError, match=r"model\.moe\.topk: unknown key"):
        ModelConfig.from_dict({"moe": {"topk": 2}}, path="model")
