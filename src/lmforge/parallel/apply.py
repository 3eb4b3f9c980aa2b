"""Apply activation checkpointing, data parallelism and compile to a finished model.

The model definition knows nothing of parallelism. Order: activation checkpointing
(wraps blocks) → data parallelism (DDP, or FSDP2 ``fully_shard`` per block then the root)
→ ``torch.compile`` (sees the wrapped model). Everything here is torch.distributed's own
machinery; lmforge only decides what to wrap.

Context parallelism (``train.context_parallel``, :mod:`lmforge.parallel.context`) wraps no
module: the trainer hands each training forward its share of the sequence, and DDP / FSDP2 over
all ranks (data-parallel groups × context-parallel ranks) average the gradients as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.core import distributed


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    The block's ``forward`` is wrapped in place (not the module), so parameter names and
    therefore checkpoints are the same with and without activation checkpointing.
    """
    blocks = _blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, _block: nn.Module = block, **kwargs: Any) -> Any:
            if not _block.training or not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError("this model has no `blocks` ModuleList to wrap")
    return blocks


def apply_data_parallel(model: nn.Module, mode: str, device: torch.device, has_unused_parameters: bool) -> nn.Module:
    """Wrap for multi-process training; a no-op without a process group.

    ``ddp``: every rank holds the whole model, gradients are all-reduced.
    ``fsdp``: FSDP2 shards parameters, gradients and optimizer state across ranks; each
    block is its own unit so only one block's full weights are gathered at a time.
    MoE layers may leave an expert without tokens on one rank in a step; DDP is told so
    (``find_unused_parameters``) instead of waiting for that expert's gradient.
    """
    if not distributed.is_distributed():
        return model
    if mode == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=has_unused_parameters
        )
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"train.data_parallel must be 'ddp' or 'fsdp', got {mode!r}")


def apply_parallelism(model: nn.Module, train_cfg: Any, device: torch.device,
                      has_unused_parameters: bool = False) -> nn.Module:
    if getattr(train_cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
    model = apply_data_parallel(model, getattr(train_cfg, "data_parallel", "ddp"), device, has_unused_parameters)
    if getattr(train_cfg, "compile", False):
        model = torch.compile(model)  # type: ignore[assignment]
    return model
