"""Where an MoE layer's time goes on CPU, against the dense feed-forward of equal active width.

Times forward + backward, on the same tokens, of
1. ``dense``: the SwiGLU as wide as the experts a token passes (``top_k * d_expert``), as in the
   dense model of equal active parameters of bench/train_throughput.py;
2. ``experts``: the experts alone, each on an equal run of ``tokens * top_k / n_experts`` rows
   (no router, no gather or combine; their outputs concatenated), the same FLOPs as ``dense``
   in smaller matmuls;
3. ``moe``: the whole MoE layer (router, top-k, sort, gather, experts, weighting, combine, and
   the auxiliary losses back-propagated with their configured weights),
4. ``moe_routed``: the same layer after routing (``MoE.compute`` on a slot layout that
   ``MoE.route`` made once from the same tokens: gather, experts, weighting, combine, and the
   routing weights' gradient),
alternating the four in every round so that load on the machine hits them alike. ``experts /
dense`` is what the smaller matmuls cost; ``moe - experts`` (``routing_dispatch_combine_ms``) what
routing, dispatch and combine cost, together with what the real layer's runs add over the equal
ones: their padding to ``moe.expert_rows_multiple`` rows and the router's uneven load; split into
``moe - moe_routed`` (``routing_ms``: router, top-k, sort, padding, auxiliary losses) and
``moe_routed - experts`` (``dispatch_combine_ms``; ``experts`` is always the per-expert loop, so
where the layer's kernel is ``batched`` this also holds the difference between the two kernels,
and can be negative). MoE layers with shared experts are refused
(neither comparison would include them). ``--kernel K`` (repeatable) adds ``moe_K``: the same
layer, same weights, with ``moe.expert_compute: K``, in the same rounds (``moe / moe_K``).

    OMP_NUM_THREADS=1 python bench/moe_layer.py --config configs/compare_moe.yaml --precision fp32
    OMP_NUM_THREADS=1 python bench/moe_layer.py --config configs/compare_moe.yaml --precision bf16
    OMP_NUM_THREADS=1 python bench/moe_layer.py --config configs/compare_moe.yaml --precision bf16 --kernel loop
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable

import torch

from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.cpu_memory import keep_freed_memory
from lmforge.nn.config import ModelConfig
from lmforge.nn.mlp import SwiGLU
from lmforge.nn.moe import MoE
from train_throughput import alternate_rounds  # bench/, this script's folder


def forward_backward(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                     bf16: bool, extra_loss: Callable[[], torch.Tensor] | None = None) -> Callable[[], None]:
    """Forward, then backward from ``grad`` at the output (and from 1 at ``extra_loss()``, read after
    the forward)."""
    def step() -> None:
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(inputs)
        if extra_loss is None:
            out.backward(grad.to(out.dtype))
        else:
            extra = extra_loss()
            torch.autograd.backward([out, extra], [grad.to(out.dtype), torch.ones_like(extra)])
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML with a model.moe section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per call (batch x sequence)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--calls", type=int, default=5, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--kernel", action="append", default=[], choices=["loop", "batched", "grouped_mm"],
                        help="also time the layer with this moe.expert_compute (repeatable)")
    args = parser.parse_args()
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    cfg = ModelConfig.from_dict(raw.get("model", {}), path="model")
    if cfg.moe is None:
        parser.error(f"{args.config}: no model.moe section")
    if cfg.moe.n_shared_experts:
        parser.error(f"{args.config}: model.moe.n_shared_experts={cfg.moe.n_shared_experts}: shared experts are not "
                     "in the dense or experts-alone comparison; set it to 0")
    if args.tokens * cfg.moe.top_k < cfg.moe.n_experts:
        parser.error(f"--tokens {args.tokens}: fewer slots than experts ({cfg.moe.n_experts})")
    keep_freed_memory()
    bf16 = args.precision == "bf16"
    torch.manual_seed(0)
    moe = MoE(cfg)
    others = {kernel: copy.deepcopy(moe) for kernel in args.kernel}  # same weights, another kernel
    for kernel, other in others.items():
        other.expert_compute = kernel
    dense = SwiGLU(cfg.d_model, cfg.moe.top_k * cfg.d_expert)
    slots = args.tokens * cfg.moe.top_k
    run = slots // cfg.moe.n_experts

    def experts_alone(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(torch.bfloat16) if bf16 else rows
        return torch.cat([expert(part) for expert, part in zip(moe.experts, rows.split(run))])

    x, grad = torch.randn(args.tokens, cfg.d_model), torch.randn(args.tokens, cfg.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        layout = moe.route(x)  # once, under the same precision: the same kernel, dtype and padding
    layout = layout._replace(slot_weights=layout.slot_weights.detach().requires_grad_())

    def routed(tokens: torch.Tensor) -> torch.Tensor:
        return moe.compute(tokens, layout)

    rows, rows_grad = torch.randn(run * cfg.moe.n_experts, cfg.d_model), torch.randn(run * cfg.moe.n_experts, cfg.d_model)
    def auxiliary_loss(layer: MoE) -> Callable[[], torch.Tensor]:
        """The layer's auxiliary losses of its last forward, with their configured weights."""
        return lambda: cfg.moe.load_balance_weight * layer.last_load_balance_loss + cfg.moe.z_loss_weight * layer.last_z_loss

    steps = {"dense": forward_backward(dense, x, grad, bf16),
             "experts": forward_backward(experts_alone, rows, rows_grad, bf16),
             "moe": forward_backward(moe, x, grad, bf16, auxiliary_loss(moe)),
             "moe_routed": forward_backward(routed, x, grad, bf16)}
    for kernel, other in others.items():
        steps[f"moe_{kernel}"] = forward_backward(other, x, grad, bf16, auxiliary_loss(other))
    for step in steps.values():
        for _ in range(5):
            step()

    def milliseconds(step: Callable[[], None]) -> float:
        start = time.process_time()
        for _ in range(args.calls):
            step()
        return (time.process_time() - start) / args.calls * 1e3

    times = alternate_rounds({name: lambda step=step: milliseconds(step) for name, step in steps.items()}, args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    per_round = {f"{a} / {b}": round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)
                 for a, b in (("experts", "dense"), ("moe", "dense"), ("moe", "experts"), ("moe_routed", "experts"),
                              *(("moe", f"moe_{kernel}") for kernel in args.kernel))}
    print(json.dumps({
        "device": f"cpu x{torch.get_num_threads()} threads", "precision": args.precision, "tokens": args.tokens,
        "layer": (f"d_model {cfg.d_model}; dense d_ff {cfg.moe.top_k * cfg.d_expert}; "
                  f"{cfg.moe.n_experts} experts of {cfg.d_expert}, top-{cfg.moe.top_k}"),
        "moe_kernel": layout.kernel, "run_lengths": layout.run_lengths.tolist(), "slots_per_expert": layout.counts.tolist(),
        "clock": "process CPU time, forward + backward, median over rounds",
        "ms_per_call": {name: round(value, 2) for name, value in median.items()},
        "routing_dispatch_combine_ms": round(median["moe"] - median["experts"], 2),
        "routing_ms": round(median["moe"] - median["moe_routed"], 2),
        "dispatch_combine_ms": round(median["moe_routed"] - median["experts"], 2),
        "ratios_per_round": per_round,
    }, indent=2))


if __name__ == "__main__":
    main()
