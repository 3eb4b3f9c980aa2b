"""Optimizers (AdamW, Muon+AdamW) and LR schedules."""

from __future__ import annotations

import pytest
import torch

from lmforge.optim.config import OptimConfig
from lmforge.optim.optimizers import build_optimizer, reapply_config_hyperparameters, set_learning_rate
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


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_adamw_is_fused_unless_turned_off_and_steps_like_the_default(name):
    """optim.adamw_fused: torch's fused AdamW kernel (the default, on CPU here), the same update as
    torch's default implementation to rounding; off, torch's default."""
    import copy

    torch.manual_seed(0)
    model = _model()
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    fused = build_optimizer(model, OptimConfig(name=name, lr=0.01, muon_lr=0.01))
    plain = build_optimizer(reference, OptimConfig(name=name, lr=0.01, muon_lr=0.01, adamw_fused=False))
    assert all(group["fused"] is True for group in fused.optimizers[0].param_groups)
    assert all(not group["fused"] for group in plain.optimizers[0].param_groups)
    for _ in range(3):
        _step(model, fused)
        _step(reference, plain)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.embed.weight, initial.embed.weight)  # the steps moved the weights


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


def test_lr_multipliers_scale_the_peak_lr_of_the_parameters_they_name():
    from lmforge.core.errors import ConfigError

    model = _model()
    cfg = OptimConfig(name="adamw", lr=0.01, lr_multipliers={"hidden.": 0.1, "hidden.weight": 0.5})
    opt = build_optimizer(model, cfg)
    lr_of = {id(p): g["base_lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.hidden.weight)] == pytest.approx(0.005)  # the longest prefix wins
    assert lr_of[id(model.hidden.bias)] == pytest.approx(0.001)
    assert lr_of[id(model.embed.weight)] == lr_of[id(model.norm.weight)] == 0.01
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(model.hidden.bias)] == 0.0 and decay_of[id(model.hidden.weight)] == cfg.weight_decay
    set_learning_rate(opt, 0.5)
    assert {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}[id(model.hidden.bias)] == \
        pytest.approx(0.0005)
    # the scaled parameters really move less: one step from the same state, same gradients
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    plain = build_optimizer(a, OptimConfig(name="adamw", lr=0.01, weight_decay=0.0))
    scaled = build_optimizer(b, OptimConfig(name="adamw", lr=0.01, weight_decay=0.0, lr_multipliers={"hidden.": 0.1}))
    before = a.hidden.weight.detach().clone()
    _step(a, plain)
    _step(b, scaled)
    assert torch.allclose(b.hidden.weight - before, (a.hidden.weight - before) * 0.1, atol=1e-7)
    assert torch.equal(a.embed.weight, b.embed.weight)
    # Muon's matrices take the multiplier too
    muon = build_optimizer(_model(), OptimConfig(name="muon", muon_lr=0.02, lr_multipliers={"hidden.": 0.25}))
    assert [g["base_lr"] for g in muon.optimizers[1].param_groups] == [pytest.approx(0.005)]
    # a prefix that names nothing would do nothing: refused with the names there are
    with pytest.raises(ConfigError, match="'encoder.' matches no trainable parameter .*embed., hidden., norm."):
        build_optimizer(_model(), OptimConfig(lr_multipliers={"encoder.": 0.1}))
    with pytest.raises(ConfigError, match="every parameter that 'hidden' matches takes a longer prefix"):
        build_optimizer(_model(), OptimConfig(lr_multipliers={"hidden": 0.5, "hidden.": 0.1}))
    with pytest.raises(ConfigError, match="finite"):
        OptimConfig.from_dict({"lr_multipliers": {"hidden.": float("inf")}})
    with pytest.raises(ConfigError, match="lr_multipliers: 'hidden.': the multiplier must be finite and >= 0"):
        OptimConfig.from_dict({"lr_multipliers": {"hidden.": -1.0}})


def test_lr_multipliers_ignore_wrapper_segments_in_parameter_names():
    from lmforge.core.errors import ConfigError

    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", _model())  # as DistributedDataParallel names them
    opt = build_optimizer(wrapped, OptimConfig(lr=0.01, lr_multipliers={"hidden.": 0.1}))
    lr_of = {id(p): g["base_lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(wrapped.module.hidden.weight)] == pytest.approx(0.001)
    # the error names the model's own names, not the wrapper's
    with pytest.raises(ConfigError, match=r"names start with embed\., hidden\., norm\.\)"):
        build_optimizer(wrapped, OptimConfig(lr_multipliers={"module.": 0.1}))


def test_a_positional_optimizer_state_with_other_groups_is_refused_clearly():
    # (the training checkpoint keys the state by parameter name and regroups: tests/test_optim_resume.py)
    saved = build_optimizer(_model(), OptimConfig(lr_multipliers={"hidden.": 0.1})).state_dict()
    other = build_optimizer(_model(), OptimConfig())
    with pytest.raises(ValueError, match="param groups.*optim.lr_multipliers"):
        other.load_state_dict(saved)
    cfg = OptimConfig(lr_multipliers={"hidden.": 0.5})
    same_prefixes = build_optimizer(_model(), cfg)
    same_prefixes.load_state_dict(saved)  # another value of the same prefix: the config's value wins on resume
    changes = reapply_config_hyperparameters(same_prefixes, cfg)
    assert ("optim.lr_multipliers['hidden.'] x optim.lr", pytest.approx(3e-4), pytest.approx(1.5e-3)) in changes
