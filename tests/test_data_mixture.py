"""Mixtures: weights times temperature-scaled sizes, planned epochs and the 4-epoch warning."""

from __future__ import annotations

import logging

import pytest

from lmforge.data.config import DataConfig
from lmforge.data.loader import MixtureLoader
from lmforge.data.mixture import manifest_mixture, mixture_probabilities, planned_epochs, warn_repeats
from lmforge.data.prepare import prepare_data

TOKENS = {"big": 9_000, "small": 1_000}


def test_temperature_interpolates_between_natural_and_uniform():
    assert mixture_probabilities(TOKENS, temperature=1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    # p ∝ n^(1/2): 3 : 1
    assert mixture_probabilities(TOKENS, temperature=2.0) == pytest.approx({"big": 0.75, "small": 0.25})
    flat = mixture_probabilities(TOKENS, temperature=1e6)
    assert flat["big"] == pytest.approx(0.5, abs=1e-4)
    # Weights multiply: small weighted 3x at T=2 -> 3 : 3.
    assert mixture_probabilities(TOKENS, {"big": 1.0, "small": 3.0}, 2.0) == pytest.approx({"big": 0.5, "small": 0.5})
    # No temperature: the weights are the mix (the loader's behaviour when given weights).
    assert mixture_probabilities(TOKENS, {"big": 1.0, "small": 1.0}) == {"big": 0.5, "small": 0.5}
    assert mixture_probabilities(TOKENS) == pytest.approx({"big": 0.9, "small": 0.1})
    assert "small" not in mixture_probabilities(TOKENS, {"big": 1.0, "small": 0.0}, 1.0)
    with pytest.raises(ValueError, match="unknown sources"):
        mixture_probabilities(TOKENS, {"huge": 1.0}, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        mixture_probabilities(TOKENS, temperature=0.0)


def test_planned_epochs_and_warning():
    probs = mixture_probabilities(TOKENS, temperature=1e6)  # ~uniform
    epochs = planned_epochs(TOKENS, probs, total_tokens=10_000)
    assert epochs["small"] == pytest.approx(5.0, rel=1e-3) and epochs["big"] == pytest.approx(5 / 9, rel=1e-3)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("lmforge").addHandler(handler)
    try:
        assert warn_repeats(epochs) == ["small"]
    finally:
        logging.getLogger("lmforge").removeHandler(handler)
    assert any("'small' will be repeated 5.0 times" in r.getMessage() for r in seen)
    recorded = manifest_mixture(TOKENS, {"big": 1.0, "small": 1.0}, 1.0)
    assert recorded["probabilities"] == pytest.approx({"big": 0.9, "small": 0.1})
    assert recorded["tokens_before_any_source_passes_4_epochs"] == 40_000


def test_config_and_loader_use_the_temperature(tmp_path, tiny_corpus):
    cfg = DataConfig.from_dict({
        "out_dir": str(tmp_path / "data"), "vocab_size": 300, "heldout_fraction": 0.2, "num_workers": 1,
        "mixture_temperature": 2.0,
        "sources": [{"name": "prose", "kind": "files", "path": str(tiny_corpus / "prose")},
                    {"name": "code", "kind": "files", "path": str(tiny_corpus / "code"), "weight": 2.0}]})
    manifest = prepare_data(cfg)
    tokens = {name: manifest["sources"][name]["train"]["tokens"] for name in ("prose", "code")}
    expected = mixture_probabilities(tokens, {"prose": 1.0, "code": 2.0}, 2.0)
    assert manifest["mixture"]["probabilities"] == pytest.approx(expected)
    assert manifest["mixture"]["temperature"] == 2.0
    loader = MixtureLoader(cfg.out_dir, seq_len=16, batch_size=4, seed=0, weights={"prose": 1.0, "code": 2.0},
                           temperature=2.0)
    assert loader.weights() == pytest.approx(expected)
    # The temperature decides sampling, not the prepared bytes: no re-prepare is needed.
    assert DataConfig.from_dict({**cfg.to_dict(), "mixture_temperature": 5.0}).fingerprint_dict() \
        == cfg.fingerprint_dict()
