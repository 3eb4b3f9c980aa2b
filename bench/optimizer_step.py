"""The AdamW step over a config's model parameters: torch's implementations against each other.

Times ``optimizer.step()`` (random gradients, the parameters of CONFIG's model) for torch's default
AdamW (on CPU a loop over the tensors, a dozen ops each), ``foreach=True`` (each op over all
tensors at once) and ``fused=True`` (one kernel per tensor for the whole update; lmforge's
``optim.adamw_fused``, on by default), alternating the three in every round.

    OMP_NUM_THREADS=1 python bench/optimizer_step.py --config configs/compare_moe.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.device import resolve_device
from lmforge.nn.config import ModelConfig
from train_throughput import alternate_rounds  # bench/, this script's folder

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (its model section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    cfg = ModelConfig.from_dict({**raw.get("model", {}), "vocab_size": args.vocab_size}, path="model")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = cfg.build().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4, **kwargs) for name, kwargs in IMPLEMENTATIONS.items()}
    for optimizer in optimizers.values():
        optimizer.step()  # state allocated before timing

    def milliseconds(optimizer: torch.optim.Optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps * 1e3

    times = alternate_rounds({name: lambda opt=opt: milliseconds(opt) for name, opt in optimizers.items()},
                             args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in params), "tensors": len(params),
        "ms_per_step": {name: round(value, 3) for name, value in median.items()},
        "default_over_fused_per_round": round(statistics.median(
            d / f for d, f in zip(times["default"], times["fused"])), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
