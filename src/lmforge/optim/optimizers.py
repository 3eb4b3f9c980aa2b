"""The optimizers ``optim.name`` picks from :data:`OPTIMIZERS`: AdamW, or Muon for 2-D hidden
matrices with AdamW for everything else."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.core.registry import Registry
from lmforge.optim.config import OptimConfig


class OptimizerGroup:
    """Several torch optimizers stepped together, with one state dict.

    Muon only applies to 2-D hidden weight matrices; embeddings, the LM head, norms and
    biases stay on AdamW. This wrapper lets the trainer treat the pair as one optimizer.
    The LR schedule is a pure function of the step (``schedules.lr_multiplier``), so no
    scheduler object carries state.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], roles: list[list[str]] | None = None):
        self.optimizers = optimizers
        # Per optimizer, the role of each param group (see ``group_hyperparameters``).
        self.roles = roles

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(states)} optimizers, this run has {len(self.optimizers)}"
            )
        for opt, state in zip(self.optimizers, states):
            if len(state["param_groups"]) != len(opt.param_groups):
                raise ValueError(
                    f"the saved {type(opt).__name__} state has {len(state['param_groups'])} param groups, this run's "
                    f"config makes {len(opt.param_groups)}: optim.lr_multipliers (or which parameters train) "
                    "changed since it was saved, and this state is matched by position (a training checkpoint, "
                    "matched by parameter name, regroups)"
                )
            opt.load_state_dict(state)


def _is_muon_matrix(name: str, param: nn.Parameter) -> bool:
    # Muon orthogonalises 2-D updates of hidden layers; it is not meant for the embedding
    # or output head (their rows are per-token vectors, not a linear map between hidden states).
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


# Param-group roles: which config fields set each group's hyperparameters.
DECAY, NO_DECAY, MUON = "adamw_decay", "adamw_no_decay", "muon"


def group_hyperparameters(cfg: OptimConfig, role: str) -> dict[str, Any]:
    """The hyperparameters the config gives a param group of ``role`` (``lr`` is set per
    step from ``base_lr`` by ``set_learning_rate``). A role ``"KIND:PREFIX"`` is the group of
    the parameters whose peak LR ``optim.lr_multipliers[PREFIX]`` scales."""
    kind, _, prefix = role.partition(":")
    scale = cfg.lr_multipliers[prefix] if prefix else 1.0
    if kind == MUON:
        return {"base_lr": cfg.muon_lr * scale, "weight_decay": cfg.weight_decay, "momentum": cfg.muon_momentum}
    return {
        "base_lr": cfg.lr * scale,
        # Norms and biases: weight decay would only shrink them.
        "weight_decay": cfg.weight_decay if kind == DECAY else 0.0,
        "betas": (cfg.beta1, cfg.beta2),
        "eps": cfg.eps,
    }


# What torch.compile (``_orig_mod.``) and DDP (``module.``) put in front of parameter names; a
# prefix in optim.lr_multipliers names the model's own parameters (FSDP2 keeps the names).
_WRAPPER_SEGMENTS = ("module", "_orig_mod")


def _plain_name(name: str) -> str:
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPER_SEGMENTS:
        parts.pop(0)
    return ".".join(parts)


def _lr_prefix(name: str, cfg: OptimConfig) -> str:
    """The longest prefix of ``optim.lr_multipliers`` that the parameter ``name`` starts with, or ''."""
    plain = _plain_name(name)
    return max((prefix for prefix in cfg.lr_multipliers if plain.startswith(prefix)), key=len, default="")


def _by_lr_prefix(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig, kind: str
                  ) -> list[tuple[str, list[nn.Parameter]]]:
    """``named``'s parameters as (role, parameters) groups: one per LR multiplier prefix they match."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in named:
        prefix = _lr_prefix(name, cfg)
        groups.setdefault(f"{kind}:{prefix}" if prefix else kind, []).append(param)
    return sorted(groups.items(), key=lambda item: item[0])


def _group(cfg: OptimConfig, role: str, params: list[nn.Parameter]) -> dict[str, Any]:
    """A param group of ``role``, its LR at its own peak until ``set_learning_rate`` sets it."""
    hyperparameters = group_hyperparameters(cfg, role)
    # the role also rides in the group, so that after a resume reapply_config_hyperparameters can
    # tell a regrouping (optim.lr_multipliers changed) from a changed optim.lr
    return {"params": params, **hyperparameters, "lr": hyperparameters["base_lr"], "role": role}


def _check_lr_prefixes(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> None:
    """A prefix that names no trainable parameter, or only parameters a longer prefix takes, would
    silently do nothing: refused."""
    plain = [_plain_name(name) for name, _ in named]
    taken = {_lr_prefix(name, cfg) for name, _ in named}
    for prefix in cfg.lr_multipliers:
        if not any(name.startswith(prefix) for name in plain):
            tops = ", ".join(sorted({name.split(".")[0] + "." for name in plain}))
            raise ConfigError(f"optim.lr_multipliers: {prefix!r} matches no trainable parameter (names start with "
                              f"{tops})")
        if prefix not in taken:
            raise ConfigError(f"optim.lr_multipliers: every parameter that {prefix!r} matches takes a longer prefix's "
                              "multiplier; remove it or the longer ones")


# optim.name -> a function (model, cfg) -> OptimizerGroup. A new optimizer is one function
# registered here; its param groups' roles say which config fields set their hyperparameters.
# The roles that count live on the object: loading a state dict replaces the groups' contents with
# the saved ones (a group's own "role" key then says what the checkpoint's group was; checkpoints
# written before it lack it).
OPTIMIZERS: Registry[Callable[[nn.Module, OptimConfig], OptimizerGroup]] = Registry("optimizer")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> OptimizerGroup:
    """The optimizer ``optim.name`` names, over ``model``'s trainable parameters."""
    return OPTIMIZERS.get(cfg.name, key="optim.name")(model, cfg)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _adamw(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over ``named``, matrices with weight decay and the rest without, each split further
    by ``optim.lr_multipliers``; returns it with the groups' roles."""
    groups = [*_by_lr_prefix([(n, p) for n, p in named if p.ndim >= 2], cfg, DECAY),
              *_by_lr_prefix([(n, p) for n, p in named if p.ndim < 2], cfg, NO_DECAY)]
    optimizer = torch.optim.AdamW([_group(cfg, role, params) for role, params in groups], lr=cfg.lr,
                                  fused=fused_adamw(cfg, [param for _, param in named]))
    return optimizer, [role for role, _ in groups]


# Devices whose fused AdamW kernel torch 2.13 has and lmforge trains on.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw(cfg: OptimConfig, params: list[nn.Parameter]) -> bool | None:
    """``optim.adamw_fused``: torch's fused AdamW (one kernel per tensor for the whole update; on
    CPU 4-6x faster than the default per-tensor loop of a dozen ops: bench/optimizer_step.py) when
    every parameter is a floating tensor on a device that has it; else None, torch's default."""
    if cfg.adamw_fused and params and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point()
                                          for p in params):
        return True
    return None


@OPTIMIZERS.register("adamw")
def build_adamw(model: nn.Module, cfg: OptimConfig) -> OptimizerGroup:
    named = _trainable(model)
    _check_lr_prefixes(named, cfg)
    adamw, roles = _adamw(named, cfg)
    return OptimizerGroup([adamw], [roles])


@OPTIMIZERS.register("muon")
def build_muon(model: nn.Module, cfg: OptimConfig) -> OptimizerGroup:
    """Muon for the 2-D hidden matrices, AdamW for everything else."""
    named = _trainable(model)
    _check_lr_prefixes(named, cfg)
    matrices = _by_lr_prefix([(name, param) for name, param in named if _is_muon_matrix(name, param)], cfg, MUON)
    adamw, roles = _adamw([(name, param) for name, param in named if not _is_muon_matrix(name, param)], cfg)
    optimizers: list[torch.optim.Optimizer] = [adamw]
    all_roles = [roles]
    if matrices:
        optimizers.append(torch.optim.Muon([_group(cfg, role, params) for role, params in matrices], lr=cfg.muon_lr))
        all_roles.append([role for role, _ in matrices])
    return OptimizerGroup(optimizers, all_roles)


# Group key -> the config field that sets it, per role (for messages and metrics).
_CONFIG_FIELD = {
    (MUON, "base_lr"): "optim.muon_lr",
    (MUON, "momentum"): "optim.muon_momentum",
    (MUON, "weight_decay"): "optim.weight_decay",
}


def _config_field(role: str, key: str) -> str:
    kind, _, prefix = role.partition(":")
    if prefix and key == "base_lr":
        return f"optim.lr_multipliers[{prefix!r}] x {_config_field(kind, key)}"
    return _CONFIG_FIELD.get((kind, key), "optim.lr" if key == "base_lr" else f"optim.{key}")


def reapply_config_hyperparameters(optimizer: OptimizerGroup, cfg: OptimConfig) -> list[tuple[str, Any, Any]]:
    """After ``load_state_dict``, give every param group the hyperparameters of ``cfg``.

    Loading an optimizer state restores the saved groups' hyperparameters along with the
    moments, so a resumed run would silently keep the old learning rate, weight decay,
    betas, eps and momentum whatever the config now says. The resolved config is what
    the run records and logs, so it wins: each group is set from it here. Returns the
    changes as ``(config field, old value, new value)``, one per field and distinct old
    value, for the caller to log and record; empty when nothing changed.
    """
    roles = getattr(optimizer, "roles", None)
    if roles is None or len(roles) != len(optimizer.optimizers):
        raise ValueError("reapply_config_hyperparameters needs an optimizer made by build_optimizer")
    changes: list[tuple[str, Any, Any]] = []
    for opt, opt_roles in zip(optimizer.optimizers, roles):
        if len(opt.param_groups) != len(opt_roles):
            raise ValueError(f"{type(opt).__name__} has {len(opt.param_groups)} param groups, "
                             f"build_optimizer made {len(opt_roles)}")
        for group, role in zip(opt.param_groups, opt_roles):
            saved_role = group.get("role")  # what the checkpoint's group was (absent before roles rode along)
            regrouped = saved_role is not None and saved_role != role
            for key, new in group_hyperparameters(cfg, role).items():
                old = group.get(key)
                if key == "betas":
                    old_pair = tuple(float(b) for b in old) if old is not None else (None, None)
                    for index, name in enumerate(("optim.beta1", "optim.beta2")):
                        if old_pair[index] != new[index]:
                            changes.append((name, old_pair[index], new[index]))
                    group[key] = tuple(new)
                    continue
                if old != new:
                    field = (f"optim.lr_multipliers (parameters regrouped: {saved_role} -> {role})"
                             if regrouped and key == "base_lr" else _config_field(role, key))
                    changes.append((field, old, new))
                    if key == "base_lr" and old and "lr" in group:
                        # Keep the current schedule position until set_learning_rate runs.
                        group["lr"] = group["lr"] * new / old
                group[key] = new
            group["role"] = role
        if isinstance(opt, torch.optim.AdamW):
            changes += _reapply_fused(opt, cfg)
    unique: list[tuple[str, Any, Any]] = []
    for change in changes:
        if change not in unique:
            unique.append(change)
    return unique


def _reapply_fused(opt: torch.optim.AdamW, cfg: OptimConfig) -> list[tuple[str, Any, Any]]:
    """``optim.adamw_fused`` over a loaded state (which brings the saved groups' own choice): the
    config's choice, with each parameter's step count moved where that implementation keeps it, as
    torch's own loading does: on the parameter's device in fp32 when fused, else on the CPU (a
    device step count would cost a device sync per tensor and step)."""
    fused = fused_adamw(cfg, [param for group in opt.param_groups for param in group["params"]])
    # torch's scalar dtype for the step count: fp64 under a fp64 default dtype, else fp32
    host_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    changes = []
    for group in opt.param_groups:
        if bool(group.get("fused")) != bool(fused):
            changes.append(("optim.adamw_fused", bool(group.get("fused")), bool(fused)))
        group["fused"] = fused
        if fused:
            group["foreach"] = None  # torch refuses fused and foreach together
        on_device = fused or group.get("capturable")
        for param in group["params"]:
            state = opt.state.get(param, {})
            if "step" in state:
                state["step"] = (state["step"].to(device=param.device, dtype=torch.float32) if on_device
                                 else state["step"].to(device="cpu", dtype=host_dtype))
    return changes


def set_learning_rate(optimizer: OptimizerGroup, multiplier: float) -> None:
    """Set every group's LR to its own peak (``base_lr``) times ``multiplier``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
