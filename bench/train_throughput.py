"""Training throughput and MFU of an lmforge config, against Hugging Face in the same process.

For the model section of CONFIG this builds (1) the lmforge model and (2) the same
architecture as `transformers` LlamaForCausalLM (dense) or MixtralForCausalLM (MoE), trains
each for the same number of steps with the same optimizer (AdamW, torch's fused kernel unless
``--adamw default``), batch and sequence length on random tokens, and prints tokens/s, MFU and the
lmforge / Hugging Face ratio.

    python bench/train_throughput.py --config configs/quickstart_moe.yaml
    python bench/train_throughput.py --config configs/quickstart_moe.yaml --set model.moe=null
    python bench/train_throughput.py --config configs/bench_gpu.yaml --device cuda --compile
    python bench/train_throughput.py --config configs/compare_dense.yaml --compile-variants   # eager and compiled, both

``--compile`` compiles both models (``--compile lmforge`` / ``hf``: one of them);
``--variant NAME:KEY=VALUE`` (repeatable; repeat a NAME for several overrides) adds an lmforge model
with those model overrides (e.g. ``--variant unpadded:moe.expert_rows_multiple=1``) to the same
alternating rounds and reports its per-round ratio to the base lmforge model: an A/B of a systems
change in one process, where separate invocations differ by up to ±10% here.

``--compile-variants`` trains each model twice in the same alternating rounds, eager and
``torch.compile``-d (a fresh copy from the same seed), and reports every ratio: lmforge compiled
against Hugging Face eager and against Hugging Face compiled, and each model's compile gain.

For an MoE config it also trains, in the same rounds, the lmforge dense model of equal active
parameters (each MoE feed-forward replaced by one SwiGLU as wide as the experts a token passes)
and reports the MoE / dense tokens/s ratio. Model options of lmforge that do not change the
architecture (``--set model.fused_cross_entropy=true``, ``model.moe.expert_compute``) apply to
the lmforge models only.

MFU uses lmforge's FLOPs-per-token formula for both models (same architecture, same work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable

import torch

from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.errors import ConfigError
from lmforge.core.cpu_memory import keep_freed_memory
from lmforge.core.device import autocast_context, resolve_device
from lmforge.nn.config import ModelConfig
from lmforge.nn.counting import count_parameters, flops_per_token
from lmforge.train.throughput import peak_flops


def hf_model(cfg: ModelConfig, attention: str = "sdpa") -> torch.nn.Module:
    """The same architecture in transformers (Llama for dense, Mixtral for MoE); ``attention``: its
    ``attn_implementation`` (``sdpa``, its default, or ``eager``: matmuls and a softmax)."""
    import transformers

    from lmforge.export.hf import unsupported_options

    refused = unsupported_options(cfg)
    if refused:
        raise SystemExit("no Hugging Face model of the same architecture: " + "; ".join(refused)
                         + " (pass --no-hf)")

    common = dict(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation=attention, head_dim=cfg.head_dim,
    )
    if cfg.moe is None:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=cfg.resolved_d_ff, **common))
    moe = cfg.moe
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=moe.d_expert or cfg.resolved_d_ff, num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_weight,
        output_router_logits=True, **common,
    ))


def dense_equal_active(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the MoE's active parameters: every MoE layer's feed-forward becomes one
    SwiGLU as wide as the experts a token passes (top_k routed + shared); the router's few
    parameters aside, the same parameters and FLOPs per token."""
    assert cfg.moe is not None
    width = (cfg.moe.top_k + cfg.moe.n_shared_experts) * cfg.d_expert
    if cfg.moe.every_n_layers != 1 and width != cfg.resolved_d_ff:
        return None  # type: ignore[return-value]  (mixed layers: no single dense width matches)
    return dataclasses.replace(cfg, moe=None, d_ff=width)


def variant_configs(specs: list[str], model_raw: dict, parser: argparse.ArgumentParser) -> dict[str, ModelConfig]:
    """``--variant NAME:KEY=VALUE`` options as model configs, one per NAME (its overrides together)."""
    overrides: dict[str, list[str]] = {}
    for spec in specs:
        name, colon, override = spec.partition(":")
        if not colon or not name or "=" not in override:
            parser.error(f"--variant {spec!r}: expected NAME:KEY=VALUE, e.g. unpadded:moe.expert_rows_multiple=1")
        if name in ("lmforge", "hf", "dense") or name.endswith("_compiled"):
            parser.error(f"--variant {spec!r}: the name {name!r} is taken (lmforge, hf, dense, *_compiled)")
        overrides.setdefault(name, []).append("model." + override)
    configs = {}
    for name, sets in overrides.items():
        try:
            configs[name] = ModelConfig.from_dict(apply_overrides({"model": dict(model_raw)}, sets)["model"],
                                                  path=f"variant {name}: model")
        except (ConfigError, ValueError) as error:
            parser.error(f"--variant {name}: {error}")
    return configs


def adamw_kind(args: argparse.Namespace, device: torch.device) -> str:
    """The AdamW every model gets: ``fused`` where torch has the kernel (CPU, CUDA) unless
    ``--adamw default``, else torch's default."""
    return "fused" if args.adamw == "fused" and device.type in ("cpu", "cuda") else "default"


def make_step(model: torch.nn.Module, is_hf: bool, args: argparse.Namespace, vocab: int,
              device: torch.device, compile_model: bool = False) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) on a fixed random batch."""
    model = model.to(device).train()
    if compile_model:
        model = torch.compile(model)
    # the same AdamW for every model: torch's fused kernel, as lmforge trains (optim.adamw_fused)
    fused = {"fused": True} if adamw_kind(args, device) == "fused" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with autocast_context(device, args.precision):
            if is_hf:
                out = model(input_ids=inputs, labels=batch[:, :-1].clone())
                loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
            else:
                out = model(inputs, targets)
                loss = out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    return step


def timed(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Tokens per second over ``args.steps`` steps."""
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size * args.seq_len / (clock() - start)


def alternate_rounds(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Every measurement once in each of ``rounds`` rounds, in an order reversed every other round,
    so a change in machine load during a benchmark hits all alike (bench/moe_layer.py and
    bench/optimizer_step.py use it too)."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for round_index in range(rounds):
        order = list(measures.items())
        for name, measure in (order if round_index % 2 == 0 else reversed(order)):
            values[name].append(measure())
    return values


def alternate(steps: dict[str, Callable[[], None]], args: argparse.Namespace,
              device: torch.device) -> dict[str, list[float]]:
    """Tokens/s per model in each of ``args.rounds`` alternating rounds."""
    return alternate_rounds({name: lambda step=step: timed(step, args, device) for name, step in steps.items()},
                            args.rounds)


def paired_ratio(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Median and range over rounds of the per-round ratio (both measured in the same round)."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (its model section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall time, or this process's CPU time (CPU, one thread: the steps' own work, "
                             "unaffected by waiting for a core on a shared machine; tokens/s are then per CPU-second)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", nargs="?", const="both", default="none", choices=["none", "lmforge", "hf", "both"],
                        help="torch.compile the models (bare --compile: both)")
    parser.add_argument("--compile-variants", action="store_true",
                        help="train every model eager and compiled in the same rounds; report all ratios")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="an lmforge model with this model override (KEY relative to the model section, "
                             "e.g. moe.expert_compute=batched), trained in the same rounds; repeat a NAME for "
                             "several overrides")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    parser.add_argument("--hf-attention", default="sdpa", choices=["sdpa", "eager"],
                        help="the Hugging Face model's attn_implementation")
    parser.add_argument("--no-dense", action="store_true",
                        help="MoE configs: skip the dense model of equal active parameters")
    parser.add_argument("--adamw", default="fused", choices=["fused", "default"],
                        help="every model's AdamW: torch's fused kernel (as lmforge trains, optim.adamw_fused) or "
                             "torch's default implementation (as this benchmark did before 2026-12-01 evening)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="CPU: leave glibc malloc at its defaults (lmforge train keeps freed memory, "
                             "train.keep_freed_memory; so does this benchmark unless told otherwise)")
    args = parser.parse_args()
    if args.compile_variants and args.compile != "none":
        parser.error("--compile-variants trains every model both eager and compiled; leave out --compile")

    raw = apply_overrides(read_yaml(args.config), args.overrides)
    model_raw = {**raw.get("model", {}), "vocab_size": args.vocab_size,
                 "max_seq_len": max(args.seq_len, raw.get("model", {}).get("max_seq_len", 0))}
    cfg = ModelConfig.from_dict(model_raw, path="model")
    variants = variant_configs(args.variant, model_raw, parser)
    device = resolve_device(args.device)
    # process-wide, so it applies to every model trained here alike
    kept = device.type == "cpu" and not args.malloc_defaults and keep_freed_memory()
    peak, peak_source = peak_flops(device)
    fpt = flops_per_token(cfg, args.seq_len)
    counts = count_parameters(cfg)

    def built(name: str) -> Callable[[], None]:
        torch.manual_seed(0)
        base, compiled = name.removesuffix("_compiled"), name.endswith("_compiled")
        # the dense model of equal active parameters and the variants are lmforge's: compiled whenever lmforge is
        compiled = compiled or args.compile in ("both", "lmforge" if base == "dense" or base in variants else base)
        if base == "hf":
            return make_step(hf_model(cfg, args.hf_attention), True, args, cfg.vocab_size, device, compiled)
        model_cfg = dense if base == "dense" else variants[base] if base in variants else cfg
        return make_step(model_cfg.build(), False, args, model_cfg.vocab_size, device, compiled)

    dense = dense_equal_active(cfg) if cfg.moe is not None and not args.no_dense else None
    names = ["lmforge"] + ([] if args.no_hf else ["hf"]) + ([] if dense is None else ["dense"]) + list(variants)
    if args.compile_variants:
        names += [f"{name}_compiled" for name in names]
    steps = {name: built(name) for name in names}
    per_round = alternate(steps, args, device)
    rates = {name: statistics.median(values) for name, values in per_round.items()}
    if args.clock == "process":
        peak = None  # tokens per CPU-second against a wall-clock peak: no MFU
    ours = rates["lmforge"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "precision": ("bf16 autocast" if args.precision == "bf16" or (device.type == "cuda" and args.precision == "auto")
                      else "fp32"),
        "compiled": args.compile, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "malloc_keeps_freed_memory": kept,
        "adamw": adamw_kind(args, device),
        "timed_steps": f"{args.rounds} rounds x {args.steps}, median", "clock": args.clock,
        "params_total": counts.total, "params_active": counts.active, "flops_per_token": fpt,
        "peak_flops_source": peak_source,
        "lmforge_tokens_per_s": round(ours, 1),
        "lmforge_mfu": round(ours * fpt / peak, 4) if peak else None,
    }
    if not args.no_hf:
        theirs = rates["hf"]
        result.update({
            "hf_model": ("MixtralForCausalLM" if cfg.moe else "LlamaForCausalLM") + f" ({args.hf_attention} attention)",
            "hf_tokens_per_s": round(theirs, 1),
            "hf_mfu": round(theirs * fpt / peak, 4) if peak else None,
            "ratio_lmforge_over_hf": round(ours / theirs, 3),
        })
    if dense is not None:
        result.update({
            "dense_equal_active": f"d_ff {dense.resolved_d_ff}, {count_parameters(dense).active} parameters",
            "dense_tokens_per_s": round(rates["dense"], 1),
            "ratio_moe_over_dense_equal_active": round(ours / rates["dense"], 3),
            "ratio_moe_over_dense_over_rounds": paired_ratio(per_round["lmforge"], per_round["dense"]),
        })
    if variants:
        result["variants"] = {
            name: {"overrides": [o for o in args.variant if o.partition(":")[0] == name],
                   "params_total": count_parameters(variants[name]).total,
                   "tokens_per_s": round(rates[name], 1),
                   "ratio_over_lmforge_over_rounds": paired_ratio(per_round[name], per_round["lmforge"]),
                   **({"ratio_over_dense_over_rounds": paired_ratio(per_round[name], per_round["dense"])}
                      if dense is not None else {})}
            for name in variants}
    if args.compile_variants:
        result["tokens_per_s"] = {name: round(rate, 1) for name, rate in rates.items()}
        pairs = [("lmforge_compiled", "lmforge"), ("hf_compiled", "hf"), ("lmforge_compiled", "hf"),
                 ("lmforge_compiled", "hf_compiled"), ("lmforge", "hf"), ("dense_compiled", "dense"),
                 ("lmforge_compiled", "dense_compiled")]
        result["ratios_over_rounds"] = {f"{a} / {b}": paired_ratio(per_round[a], per_round[b])
                                        for a, b in pairs if a in per_round and b in per_round}
    elif not args.no_hf:
        result["ratio_lmforge_over_hf_over_rounds"] = paired_ratio(per_round["lmforge"], per_round["hf"])
    result["tokens_per_s_per_round"] = {name: [round(value, 1) for value in values] for name, values in per_round.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
