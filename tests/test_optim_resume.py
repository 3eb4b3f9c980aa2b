"""Resuming with changed optimizer settings: the resolved config wins over the checkpoint.

A real optimizer state round trip through the training checkpoint files: loading restores
the saved hyperparameters (that was the bug: a new ``optim.lr`` was logged but not used);
``reapply_config_hyperparameters`` puts the config's back and reports each change.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.nn.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.optim.optimizers import build_optimizer, reapply_config_hyperparameters, set_learning_rate
from lmforge.train.checkpoint import load_training_checkpoint, save_training_checkpoint

MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64, "max_seq_len": 16}


def _step(model: torch.nn.Module, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 64, (2, 8), generator=generator)
    targets = torch.randint(0, 64, (2, 8), generator=generator)
    set_learning_rate(optimizer, 1.0)
    model(inputs, targets).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _saved_run(tmp_path, cfg: OptimConfig):
    torch.manual_seed(0)
    model = ModelConfig.from_dict(MODEL).build()
    optimizer = build_optimizer(model, cfg)
    for seed in range(3):
        _step(model, optimizer, seed)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    return save_training_checkpoint(tmp_path / "checkpoints", 3, model, optimizer, {"step": 3}, "x: 1\n",
                                    tokenizer, keep=2)


def _resumed(checkpoint, cfg: OptimConfig):
    model = ModelConfig.from_dict(MODEL).build()
    optimizer = build_optimizer(model, cfg)
    load_training_checkpoint(checkpoint, model, optimizer)
    return model, optimizer


def _update(model, optimizer) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, optimizer, seed=99)
    return {k: model.state_dict()[k] - before[k] for k in before}


def test_changed_lr_is_applied_after_loading_the_optimizer_state(tmp_path):
    old, new = OptimConfig(lr=1e-3), OptimConfig(lr=1e-2)
    checkpoint = _saved_run(tmp_path, old)

    same_model, same_opt = _resumed(checkpoint, old)
    stale_model, stale_opt = _resumed(checkpoint, new)
    # Loading alone brings back the checkpoint's base_lr: the bug the config must override.
    assert {g["base_lr"] for g in stale_opt.param_groups} == {1e-3}
    assert reapply_config_hyperparameters(same_opt, old) == []
    fixed_model, fixed_opt = _resumed(checkpoint, new)
    changes = reapply_config_hyperparameters(fixed_opt, new)
    assert changes == [("optim.lr", 1e-3, 1e-2)]
    assert {g["base_lr"] for g in fixed_opt.param_groups} == {1e-2}

    reference = _update(same_model, same_opt)
    stale = _update(stale_model, stale_opt)
    fixed = _update(fixed_model, fixed_opt)
    for name in reference:
        assert torch.equal(stale[name], reference[name]), name  # unfixed: the new LR is ignored
        # AdamW's whole update (decoupled decay included) scales with the LR: ten times larger.
        # (atol: the deltas are differences of float32 weights, rounded at the weights' scale)
        assert torch.allclose(fixed[name], 10 * reference[name], rtol=1e-2, atol=1e-6), name
    ratio = torch.cat([fixed[n].flatten() for n in fixed]).norm() / torch.cat([reference[n].flatten() for n in reference]).norm()
    assert ratio == pytest.approx(10.0, rel=1e-3)


def test_every_config_hyperparameter_is_reapplied_and_reported(tmp_path):
    old = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95, weight_decay=0.1,
                      beta1=0.9, beta2=0.95, eps=1e-8)
    new = OptimConfig(name="muon", lr=2e-3, muon_lr=0.01, muon_momentum=0.9, weight_decay=0.0,
                      beta1=0.8, beta2=0.99, eps=1e-6)
    checkpoint = _saved_run(tmp_path, old)
    _, optimizer = _resumed(checkpoint, new)
    changes = reapply_config_hyperparameters(optimizer, new)
    assert sorted(changes) == sorted([
        ("optim.lr", 1e-3, 2e-3), ("optim.weight_decay", 0.1, 0.0), ("optim.beta1", 0.9, 0.8),
        ("optim.beta2", 0.95, 0.99), ("optim.eps", 1e-8, 1e-6), ("optim.muon_lr", 0.02, 0.01),
        ("optim.muon_momentum", 0.95, 0.9),
    ])
    adamw, muon = optimizer.optimizers
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in adamw.param_groups)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.0, 0.0]
    assert muon.param_groups[0]["momentum"] == 0.9 and muon.param_groups[0]["base_lr"] == 0.01
    # The moments themselves are kept: only settings change.
    assert all(len(state) > 0 for state in adamw.state.values())
    assert reapply_config_hyperparameters(optimizer, new) == []  # idempotent


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_adamw_fused_changed_on_resume_is_applied_and_reported(tmp_path, saved_fused, resumed_fused):
    """optim.adamw_fused: the loaded state brings the saved groups' choice; the config's wins, the
    change is reported, and the next update equals the saved implementation's to rounding."""
    old, new = OptimConfig(adamw_fused=saved_fused), OptimConfig(adamw_fused=resumed_fused)
    checkpoint = _saved_run(tmp_path, old)
    same_model, same_opt = _resumed(checkpoint, old)
    assert reapply_config_hyperparameters(same_opt, old) == []
    model, optimizer = _resumed(checkpoint, new)
    assert all(bool(g["fused"]) == saved_fused for g in optimizer.param_groups)  # what loading alone gives
    assert reapply_config_hyperparameters(optimizer, new) == [("optim.adamw_fused", saved_fused, resumed_fused)]
    assert all(bool(g["fused"]) == resumed_fused for g in optimizer.param_groups)
    reference, switched = _update(same_model, same_opt), _update(model, optimizer)
    for name in reference:
        torch.testing.assert_close(switched[name], reference[name], rtol=1e-4, atol=1e-7)
    assert reapply_config_hyperparameters(optimizer, new) == []  # idempotent


def test_an_optimizer_not_from_build_optimizer_is_refused():
    from lmforge.optim.optimizers import OptimizerGroup

    plain = OptimizerGroup([torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)])
    with pytest.raises(ValueError, match="build_optimizer"):
        reapply_config_hyperparameters(plain, OptimConfig())


def test_adding_or_removing_an_lr_multiplier_prefix_on_resume_keeps_every_moment(tmp_path):
    """The training checkpoint keys the optimizer state by parameter name, so regrouping the
    parameters (a prefix added to or removed from optim.lr_multipliers) restores every
    parameter's moments; each group's LR then comes from the config, and the change is reported."""
    plain, scaled = OptimConfig(lr=1e-3), OptimConfig(lr=1e-3, lr_multipliers={"blocks.": 0.1})
    for saved_cfg, new_cfg, expected in ((plain, scaled, ("optim.lr_multipliers (parameters regrouped: "
                                                          "adamw_decay -> adamw_decay:blocks.)", 1e-3, 1e-4)),
                                         (scaled, plain, ("optim.lr_multipliers (parameters regrouped: "
                                                          "adamw_decay:blocks. -> adamw_decay)", 1e-4, 1e-3))):
        folder = tmp_path / str(len(saved_cfg.lr_multipliers))
        folder.mkdir()
        checkpoint = _saved_run(folder, saved_cfg)
        reference_model, reference_opt = _resumed(checkpoint, saved_cfg)
        model, optimizer = _resumed(checkpoint, new_cfg)
        assert expected in reapply_config_hyperparameters(optimizer, new_cfg)
        moments = {name: reference_opt.optimizers[0].state[p] for name, p in reference_model.named_parameters()}
        for name, param in model.named_parameters():
            state = optimizer.optimizers[0].state[param]
            assert torch.equal(state["exp_avg"], moments[name]["exp_avg"]), name
            assert torch.equal(state["exp_avg_sq"], moments[name]["exp_avg_sq"]), name
            lr = next(g["base_lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))
            assert lr == pytest.approx(1e-4 if name.startswith("blocks.") and new_cfg.lr_multipliers else 1e-3), name


def test_splitting_a_muon_group_on_resume_keeps_its_momentum_and_steps(tmp_path):
    saved_cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02)
    new_cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, lr_multipliers={"blocks.0.attn.": 0.5})
    checkpoint = _saved_run(tmp_path, saved_cfg)
    reference_model, reference_opt = _resumed(checkpoint, saved_cfg)
    model, optimizer = _resumed(checkpoint, new_cfg)
    reapply_config_hyperparameters(optimizer, new_cfg)
    muon = optimizer.optimizers[1]
    assert sorted(g["role"] for g in muon.param_groups) == ["muon", "muon:blocks.0.attn."]
    reference = {name: reference_opt.optimizers[1].state[p] for name, p in reference_model.named_parameters()
                 if p in reference_opt.optimizers[1].state}
    for name, param in model.named_parameters():
        if name in reference:
            assert torch.equal(muon.state[param]["momentum_buffer"], reference[name]["momentum_buffer"]), name
    for group in muon.param_groups:
        expected = 0.01 if group["role"].endswith("attn.") else 0.02
        assert group["base_lr"] == pytest.approx(expected) and group["momentum"] == 0.95
    _update(model, optimizer)  # the regrouped optimizer steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_adamw_fused_switch_on_resume_keeps_the_step_count_where_its_implementation_wants_it(
        saved_fused, resumed_fused):
    """Fused keeps each step count on the parameter's device, torch's default on the CPU (a device
    step count would cost a sync per tensor and step); switching on resume moves them."""
    model = ModelConfig.from_dict(MODEL).build().cuda()
    optimizer = build_optimizer(model, OptimConfig(adamw_fused=saved_fused))
    _step_on(model, optimizer)
    state = optimizer.state_dict()
    resumed = build_optimizer(model, OptimConfig(adamw_fused=resumed_fused))
    resumed.load_state_dict(state)
    assert reapply_config_hyperparameters(resumed, OptimConfig(adamw_fused=resumed_fused)) == [
        ("optim.adamw_fused", saved_fused, resumed_fused)]
    adamw = resumed.optimizers[0]
    devices = {state["step"].device.type for state in adamw.state.values()}
    assert devices == ({"cuda"} if resumed_fused else {"cpu"})
    _step_on(model, resumed)  # and the implementation steps with them


def _step_on(model: torch.nn.Module, optimizer) -> None:
    inputs = torch.randint(0, 64, (2, 8), device="cuda")
    set_learning_rate(optimizer, 1.0)
    model(inputs, inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
