"""Device and precision choice: bf16 autocast on CUDA, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when precision is auto/bf16; a no-op (fp32) otherwise."""
    use_bf16 = device.type == "cuda" and precision in ("auto", "bf16")
    if use_bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
