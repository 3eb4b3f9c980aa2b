"""Batch-1 decoding speed against the memory-bandwidth bound.

At batch 1 each decoded token reads every weight it uses once, plus the KV cache so far, and does ~2
FLOPs per weight: decoding is bound by memory bandwidth, not by FLOPs. The bound here is the
device's measured copy bandwidth (bytes read + written by a large ``copy_``, best of a few)
divided by the bytes one token reads (the weights it uses in the decode dtype, for an MoE only
its top-k experts, and the mean KV cache over the generation). The script reports greedy decode tokens/s after a prefill, the bound and their
ratio, for the model section of CONFIG with random weights (speed does not depend on them).

    python bench/decode.py --config configs/bench_gpu_dense.yaml --device cuda --dtype bf16
    python bench/decode.py --config configs/quickstart.yaml --device cpu --dtype fp32 --new-tokens 64
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
from lmforge.nn.counting import count_parameters
from lmforge.nn.generation import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 5) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` of ``megabytes`` MiB (read + write counted)."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (page-in, allocation)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def timed_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (its model section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed generations; the median is reported")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the config's (or 50304)")
    parser.add_argument("--bandwidth-mib", type=int, default=None,
                        help="size of the copy that measures bandwidth (default 1024 on CUDA, 256 on CPU)")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.rounds < 1:
        parser.error("--new-tokens must be >= 2 (the rate is the time of tokens 2..N) and --rounds >= 1")

    raw = apply_overrides(read_yaml(args.config), args.overrides)
    model_raw = dict(raw.get("model", {}))
    model_raw["vocab_size"] = args.vocab_size or model_raw.get("vocab_size") or raw.get("data", {}).get("vocab_size", 50304)
    model_raw["max_seq_len"] = max(model_raw.get("max_seq_len", 0), args.prompt_tokens + args.new_tokens)
    cfg = ModelConfig.from_dict(model_raw, path="model")
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = cfg.build().to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), device=device)

    with torch.no_grad():
        timed_generate(model, prompt, 8, device)  # warm-up: kernels, allocator, caches
        whole = [timed_generate(model, prompt, args.new_tokens, device) for _ in range(args.rounds)]
        first = [timed_generate(model, prompt, 1, device) for _ in range(args.rounds)]  # prefill + one token
    seconds_per_token = (statistics.median(whole) - statistics.median(first)) / (args.new_tokens - 1)
    if seconds_per_token <= 0:
        raise SystemExit(f"decode: generating {args.new_tokens} tokens took no longer than 1 (timing noise); "
                         "raise --new-tokens or --rounds")

    # The weights one token reads: the body's active parameters (an MoE token reads its top-k
    # experts only) and the LM head's matrix; of the input embedding, one row (left out).
    counts = count_parameters(cfg)
    read_parameters = counts.active - counts.embedding - counts.lm_head + cfg.padded_vocab_size * cfg.d_model
    weight_bytes = read_parameters * torch.finfo(dtype).bits // 8
    # Per token, each layer reads its keys and values so far: the mean length over the generation.
    mean_context = args.prompt_tokens + args.new_tokens / 2
    kv_bytes = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * mean_context * torch.finfo(dtype).bits // 8
    bandwidth = copy_bandwidth(device, args.bandwidth_mib or (1024 if device.type == "cuda" else 256))
    bound = bandwidth / (weight_bytes + kv_bytes)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "dtype": args.dtype, "parameters": counts.total, "parameters_read_per_token": read_parameters,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "decode_tokens_per_s": round(1.0 / seconds_per_token, 1),
        "bytes_per_token": int(weight_bytes + kv_bytes), "weight_bytes": int(weight_bytes), "mean_kv_bytes": int(kv_bytes),
        "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "fraction_of_bound": round(1.0 / seconds_per_token / bound, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
