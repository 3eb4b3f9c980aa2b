"""Device and precision choice: bf16 autocast on CUDA, fp32 on CPU unless bf16 is asked for.

``precision``: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` (autocast on either
device), or ``fast``: bf16 where the hardware multiplies bf16 natively (CUDA, or an x86 CPU with
AVX512-BF16 or AMX), fp32 elsewhere, so one config is fast on a server and still right on a laptop
whose CPU would emulate bf16 (slower than fp32).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from lmforge.core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: lmforge runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86 AVX512-BF16 or AMX), read from
    /proc/cpuinfo; False where that file does not exist (torch's own check also accepts CPUs
    that only emulate bf16, where it is slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether ``precision`` means bf16 autocast on ``device`` (module docstring)."""
    if precision == "bf16":
        return True
    if precision in ("auto", "fast") and device.type == "cuda":
        return True
    return precision == "fast" and device.type == "cpu" and cpu_has_native_bf16()


def autocast_context(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast when :func:`uses_bf16` says so; a no-op (fp32) otherwise."""
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
