"""Build AdamW, or Muon for 2-D hidden matrices with AdamW for everything else."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.optim.config import OptimConfig


class OptimizerGroup:
    """Several torch optimizers stepped together, with one state dict.

    Muon only applies to 2-D hidden weight matrices; embeddings, the LM head, norms and
    biases stay on AdamW. This wrapper lets the trainer treat the pair as one optimizer.
    The LR schedule is a pure function of the step (``schedules.lr_multiplier``), so no
    scheduler object carries state.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

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
            opt.load_state_dict(state)


def _is_muon_matrix(name: str, param: nn.Parameter) -> bool:
    # Muon orthogonalises 2-D updates of hidden layers; it is not meant for the embedding
    # or output head (their rows are per-token vectors, not a linear map between hidden states).
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> OptimizerGroup:
    decay, no_decay, muon = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if cfg.name == "muon" and _is_muon_matrix(name, param):
            muon.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)  # norms and biases: weight decay would only shrink them
    adamw_groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(
            adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )
    ]
    if muon:
        optimizers.append(
            torch.optim.Muon(
                [{"params": muon, "base_lr": cfg.muon_lr}],
                lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
            )
        )
    return OptimizerGroup(optimizers)


def set_learning_rate(optimizer: OptimizerGroup, multiplier: float) -> None:
    """Set every group's LR to its own peak (``base_lr``) times ``multiplier``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
