"""Optimizers (AdamW, Muon+AdamW) and LR schedules."""

from __future__ import annotations

import pytest
import torch

from lmforge.optim.config import OptimConfig
from lmforge.optim.optimizers import build_optimizer, set_learning_rate
from lmforge.optim.schedules import lr_multiplier


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Embedding(10, 8))
    model.add_module("hidden", torch.nn.Linear(8, 8))
    model.add_module("norm", torch.nn.LayerNorm(8))
    return model


def test_muon_takes_hidden_matrices_only():
    opt = build_optimizer(_model(), OptimConfig(name="muon"))
    adamw, muon = opt.optimizers
    assert isinstance(muon, torch.optim.Muon)
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert len(muon_params) == 1 and muon_params[0].shape == (8, 8)
    adamw_shapes = sorted(tuple(p.shape) for g in adamw.param_groups for p in g["params"])
    assert (10, 8) in adamw_shapes  # the embedding stays on AdamW


def _step(model: torch.nn.Module, opt) -> None:
    model.hidden(model.embed(torch.tensor([1, 2]))).square().sum().backward()
    opt.step()
    opt.zero_grad()


def test_optimizer_state_round_trip_and_lr_setting():
    import copy

    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    _step(model, opt)
    twin = copy.deepcopy(model)
    other = build_optimizer(twin, OptimConfig(name="muon"))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy, as a checkpoint file holds
    # The restored state (AdamW moments, Muon momentum) continues exactly: the next step of the
    # restored optimizer moves the twin model as the original moves the original.
    _step(model, opt)
    _step(twin, other)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    fresh_twin = copy.deepcopy(model)
    fresh = build_optimizer(fresh_twin, OptimConfig(name="muon"))
    _step(model, opt)
    _step(fresh_twin, fresh)  # without the state the step differs, so the check above can fail
    assert not torch.equal(model.hidden.weight, fresh_twin.hidden.weight)
    set_learning_rate(opt, 0.5)
    assert {g["lr"] for g in opt.optimizers[1].param_groups} == {0.01}


def test_cosine_warmup_and_floor():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_wsd_is_flat_then_decays_over_last_fraction():
    cfg = OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert values[5:80] == [1.0] * 75
    assert values[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(values[80:], values[81:]))


def test_bad_optim_config_rejected():
    from lmforge.core.errors import ConfigError

    with pytest.raises(ConfigError, match="lr"):
        OptimConfig.from_dict({"lr": -1.0})
