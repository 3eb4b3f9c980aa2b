"""Apply compile and activation checkpointing to a finished model, in a fixed order.

The model definition knows nothing of parallelism (torchtitan's rule). Order:
activation checkpointing (wraps blocks) → torch.compile (sees the wrapped blocks).
Data parallelism (DDP / FSDP2) will slot in between them when multi-process training lands.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    The block's ``forward`` is wrapped in place (not the module), so parameter names and
    therefore checkpoints are the same with and without activation checkpointing.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError("activation checkpointing needs a model with a `blocks` ModuleList")
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, _block: nn.Module = block, **kwargs: Any) -> Any:
            if not _block.training or not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


def apply_parallelism(model: nn.Module, train_cfg: Any, device: torch.device) -> nn.Module:
    if getattr(train_cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
    if getattr(train_cfg, "compile", False):
        model = torch.compile(model)  # type: ignore[assignment]
    return model
