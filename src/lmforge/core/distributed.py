"""Process-group helpers on ``torch.distributed``: rank facts, init, and small collectives.

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), so one code path serves a single process, ``torchrun --nproc-per-node``
on one machine, and multi-node rendezvous. Every helper is a no-op without a process group.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from lmforge.core.errors import LmforgeError

T = TypeVar("T")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


_joined = False


def joined() -> bool:
    """Whether this process has been part of a multi-process group (see ``exit_process``)."""
    return _joined


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes; NCCL on CUDA, gloo on CPU.

    Returns True when running with more than one process. Safe to call twice.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    global _joined
    _joined = True
    return True


def shutdown() -> None:
    """Leave the process group together: a barrier first, so no rank tears down its
    connections while another still uses them."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that was part of a group without running C++ static destructors.

    With gloo, a communication thread still joinable at interpreter teardown can abort
    the process ("terminate called without an active exception") after all work is done,
    turning a finished run into a failure for torchrun. Output is flushed first.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: list[float], op: str = "mean", device: torch.device | None = None) -> list[float]:
    """Reduce a few scalars across ranks in one collective (``mean``, ``sum`` or ``max``)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device or torch.device("cpu"))
    reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    if op == "mean":
        tensor /= dist.get_world_size()
    return tensor.tolist()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s Python object on every rank (small things: paths, flags, dicts)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; the others wait, and raise rank 0's error if it fails.

    For work that writes shared files (data preparation, run directory, metrics): without
    this a failure on rank 0 would leave the other ranks waiting in the next collective until
    the process-group timeout, or with an opaque "connection closed" error. Any exception is
    forwarded: an LmforgeError as itself, anything else (an OSError from a full disk) as
    LmforgeError("rank 0 failed: <type>: <message>"). Rank 0 raises its original exception.
    """
    result: T | None = None
    failure: Exception | None = None
    error: tuple[type[LmforgeError], str] | None = None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:
            if not is_distributed():
                raise
            failure = exc
            error = _forwardable(exc)
    error = broadcast_object(error)  # type: ignore[assignment]
    if failure is not None:
        raise failure
    if error is not None:
        cls, message = error
        raise cls(message)
    return result


def _forwardable(exc: Exception) -> tuple[type[LmforgeError], str]:
    """What the other ranks raise for rank 0's ``exc``: an LmforgeError class that pickles and
    can be built from one message (else LmforgeError itself), and the message."""
    if not isinstance(exc, LmforgeError):
        return LmforgeError, f"rank 0 failed: {type(exc).__name__}: {exc}"
    cls = type(exc)
    try:
        pickle.loads(pickle.dumps(cls))
        cls(str(exc))
    except (pickle.PicklingError, AttributeError, TypeError, ValueError):  # a local or unusual class
        cls = LmforgeError
    return cls, str(exc)
