"""Peak FLOP/s per device, for model FLOPs utilisation (MFU).

MFU = achieved model FLOPs per second / peak FLOP/s of the device, where model FLOPs per
token come from ``lmforge.nn.counting.flops_per_token`` (6N + attention term).

GPU peaks are vendors' dense (no sparsity) bf16 tensor-core figures. A CPU has no
published "peak" that means anything comparable, so on CPU lmforge *measures* one: the
fp32 FLOP/s of a large square matmul with torch on all threads this process uses. CPU MFU
is therefore "share of this machine's achievable matmul throughput", stated as such.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

# Dense bf16 peak FLOP/s (no 2:4 sparsity), by substring of torch.cuda.get_device_name().
GPU_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


@lru_cache(maxsize=None)
def measured_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` and a sentence saying where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16_FLOPS.items():
            if key in name:
                return value, f"{name}: vendor dense bf16 peak {value / 1e12:.0f} TFLOP/s"
        return 0.0, f"{name}: peak unknown (add it to GPU_PEAK_BF16_FLOPS); MFU not reported"
    flops = measured_cpu_matmul_flops()
    threads = torch.get_num_threads()
    return flops, (
        f"CPU ({threads} threads): measured fp32 matmul peak {flops / 1e9:.1f} GFLOP/s "
        "(1024x1024 torch.mm, best of 5)"
    )
