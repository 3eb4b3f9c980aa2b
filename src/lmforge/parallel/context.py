"""Context parallelism: each training sequence split over a group of ranks for attention.

With ``train.context_parallel: P`` the processes form groups of P consecutive ranks (world =
data-parallel groups × P). Every rank of a group reads the same rows of the global batch (the
loader is told the data-parallel rank, ``RunSetup.data_parallel_rank``) and runs the model
on its part of each sequence only: embeddings, MLPs, the LM head and the loss see T / P tokens.
Attention needs every earlier key, so each layer all-gathers the keys and values of the
group (one collective for both), and its backward reduce-scatters their gradients back to the
ranks that computed them (:class:`GatherSequence`).

Load balancing: under a causal mask a token late in the sequence attends to more keys than an
early one, so contiguous parts would leave the first rank idle. The sequence is cut into 2P
chunks and rank r holds chunks r and 2P-1-r ("zigzag", the head-tail order of torch's own
context parallelism), so every rank has the same causal work (:func:`zigzag_index`). Tokens
keep their absolute indices: RoPE rotates by them and :func:`lmforge.nn.attention.attention_mask`
masks by them (causal, window, document), so the model computes what one process computes.

Loss and gradients: rank r's loss is the sum of its tokens' losses over the group's mean
token count, so the mean over the group is the mean over the whole sequence (exact also when
some targets are ignored). DDP / FSDP2 over all ranks average gradients over the world,
which is the gradient of that mean: each rank's own backward already holds the contributions
of every rank's queries to its keys and values (the reduce-scatter). So CP composes with
``train.data_parallel`` ddp or fsdp without a separate CP all-reduce.

``train.context_parallel_impl: torch`` uses torch's ``context_parallel`` instead (ring
attention patched into SDPA's CUDA flash / memory-efficient / cuDNN kernels): CUDA only, plain
causal attention only (no document mask, no window) and as many key/value heads as query heads.
It has not been run here (no GPU was available when it was written); the all-gather path is the
tested one and also runs on CUDA (NCCL).

``nn/`` never communicates: the model receives a :class:`ContextParallel` as
``sequence_shard`` in its forward call and asks it for its tokens and for the gathered keys.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from lmforge.core.errors import ConfigError
from lmforge.core.logging import get_logger
from lmforge.nn.attention import TokenLayout

log = get_logger(__name__)

IGNORE_INDEX = -100  # targets the loss skips (F.cross_entropy's default, as in Transformer.output)


def zigzag_index(seq_len: int, size: int, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Absolute indices [seq_len / size] of the tokens rank ``rank`` of ``size`` holds: chunks
    ``rank`` and ``2 * size - 1 - rank`` of ``2 * size`` equal chunks."""
    if seq_len % (2 * size):
        raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x {size} equal chunks "
                         "(train.seq_len must be divisible by 2 * train.context_parallel)")
    chunk = seq_len // (2 * size)
    head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    tail = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([head, tail])


class GatherSequence(torch.autograd.Function):
    """All-gather along the sequence dimension (-2) in rank order; backward: each rank gets the
    sum over ranks of the gradient of its own part (reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        parts = [part.contiguous() for part in grad.chunk(dist.get_world_size(ctx.group), dim=-2)]
        own = torch.empty_like(parts[0])
        dist.reduce_scatter(own, parts, group=ctx.group)
        return own, None


class ContextParallel:
    """This rank's share of every sequence, and the keys and values of the rest (all-gather).

    ``group``: the ranks holding the other parts of the same sequences (``size`` of them; this
    one is ``rank`` in it). Passed to the model as ``sequence_shard``.
    """

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    @contextlib.contextmanager
    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[dict[str, Any]]:
        """Keyword arguments for the model's forward in one micro-step (forward and backward inside)."""
        yield {"sequence_shard": self}

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The group's ``x`` [..., T / P, D] → [..., T, D] in rank order (``gathered_index``)."""
        return GatherSequence.apply(x, self.group)

    def localize(self, input_ids: torch.Tensor, targets: torch.Tensor | None, layout: TokenLayout | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, TokenLayout, torch.Tensor | None]:
        """This rank's tokens of whole sequences ``input_ids`` / ``targets`` [B, T]: (input ids,
        targets, their layout, the token count the summed loss is divided by).

        ``layout`` is the whole sequences' (documents, restarted positions; None without document
        masking); the local one keeps this rank's rows of it and describes the gathered keys.
        """
        b, t = input_ids.shape
        index = zigzag_index(t, self.size, self.rank, input_ids.device)
        gathered = torch.cat([zigzag_index(t, self.size, r, input_ids.device) for r in range(self.size)])
        documents = layout.documents if layout is not None else None
        positions = layout.rope_positions if layout is not None else None
        local = TokenLayout(
            index=index,
            documents=None if documents is None else documents[:, index],
            # RoPE by absolute position: two position ranges, so read per token (same tables)
            rope_positions=index.expand(b, -1) if positions is None else positions[:, index],
            gather=self.gather, gathered_index=gathered,
            gathered_documents=None if documents is None else documents[:, gathered],
        )
        token_count = None
        if targets is not None:
            # The group's mean count: the group's mean loss is then the whole sequences' mean.
            token_count = (targets != IGNORE_INDEX).sum() / self.size
            targets = targets[:, index]
        return input_ids[:, index], targets, local, token_count


class TorchPositions:
    """The ``sequence_shard`` of torch's context parallelism: inputs and targets arrive already
    split (by torch, zigzag); only the RoPE positions of the local tokens are needed."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions

    def localize(self, input_ids: torch.Tensor, targets: torch.Tensor | None, layout: TokenLayout | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, TokenLayout, None]:
        return input_ids, targets, TokenLayout(index=self.positions[0], rope_positions=self.positions), None


class TorchContextParallel:
    """torch's ``context_parallel`` (ring attention inside SDPA on CUDA). Untested here: no GPU."""

    def __init__(self, mesh: Any, size: int, rank: int):
        self.mesh, self.size, self.rank = mesh, size, rank

    @contextlib.contextmanager
    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[dict[str, Any]]:
        from torch.distributed.tensor.experimental import context_parallel

        b, t = inputs.shape
        zigzag_index(t, self.size, self.rank)  # the same divisibility check and message
        positions = torch.arange(t, device=inputs.device).expand(b, t).contiguous()
        buffers = [inputs, targets, positions]  # split in place along the sequence, head-tail order
        with context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
            yield {"sequence_shard": TorchPositions(positions)}


def check_process_layout(train_cfg: Any, world_size: int) -> int:
    """The number of data-parallel groups, after checking the processes fit the config."""
    size = getattr(train_cfg, "context_parallel", 1)
    if world_size % size:
        raise ConfigError(f"train.context_parallel ({size}) must divide the number of processes ({world_size})")
    groups = world_size // size
    if train_cfg.batch_size % groups:
        what = (f"the number of processes ({world_size})" if size == 1 else
                f"the number of data-parallel groups ({world_size} processes / train.context_parallel {size} "
                f"= {groups})")
        raise ConfigError(f"train.batch_size ({train_cfg.batch_size}) is the global batch and must be "
                          f"divisible by {what}")
    return groups


def build_context_parallel(train_cfg: Any, model_cfg: Any, device: torch.device
                           ) -> ContextParallel | TorchContextParallel | None:
    """The context-parallel group of this rank (collective: every rank calls it), or None when
    ``train.context_parallel`` is 1."""
    size = getattr(train_cfg, "context_parallel", 1)
    if size == 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world < size:
        raise ConfigError(f"train.context_parallel ({size}) needs {size} processes per data-parallel group; "
                          f"this run has {world} (start it with torchrun --nproc-per-node)")
    check_process_layout(train_cfg, world)
    rank = dist.get_rank()
    impl = getattr(train_cfg, "context_parallel_impl", "lmforge")
    if impl == "torch":
        _check_torch_impl(model_cfg, device)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("data", "context"))
        log.info("context parallelism: torch's ring attention over %d ranks", size)
        return TorchContextParallel(mesh["context"], size, rank % size)
    group, _ = dist.new_subgroups(group_size=size)
    log.info("context parallelism: each sequence split over %d ranks (zigzag), %d data-parallel group(s)",
             size, world // size)
    return ContextParallel(group, size, dist.get_rank(group))


def _check_torch_impl(model_cfg: Any, device: torch.device) -> None:
    problems = []
    if device.type != "cuda":
        problems.append(f"it runs on CUDA only (device is {device.type})")
    attention = model_cfg.attention
    if attention.document_mask or attention.sliding_window is not None:
        problems.append("it supports plain causal attention only (no model.attention.document_mask or "
                        "sliding_window)")
    if model_cfg.kv_heads != model_cfg.n_heads:
        problems.append(f"it needs as many key/value heads as query heads (n_kv_heads {model_cfg.kv_heads}, "
                        f"n_heads {model_cfg.n_heads})")
    if problems:
        raise ConfigError("train.context_parallel_impl: torch: " + "; ".join(problems)
                          + " — use context_parallel_impl: lmforge")
