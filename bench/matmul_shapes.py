"""What a matmul of a row count not seen before costs on this machine, against one seen before.

On CPU, PyTorch's bf16 (and some fp32) matmuls go through oneDNN, which builds a kernel for each
new problem shape and caches it by shape. An MoE's experts get a different number of rows every
step, so without care every expert matmul pays that build (``moe.expert_rows_multiple`` pads the
rows to repeat shapes; docs/benchmarks.md). This times ``[rows, d_in] @ [d_in, d_out]`` with the
same row count every call, and with a row count new to the cache each call (one fewer row than the
call before: never more work than the fixed shape), alternating the two per round.

    OMP_NUM_THREADS=1 python bench/matmul_shapes.py
    OMP_NUM_THREADS=1 python bench/matmul_shapes.py --rows 1024 --d-in 128 --d-out 192 --calls 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def time_calls(x: torch.Tensor, w: torch.Tensor, rows: list[int]) -> float:
    """Median seconds of ``x[:r] @ w`` over the row counts ``rows``."""
    times = []
    for r in rows:
        part = x[:r]
        start = time.perf_counter()
        part @ w
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--d-out", type=int, default=192)
    parser.add_argument("--calls", type=int, default=60, help="calls per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.calls > args.rows // 2:
        parser.error("--calls must be at most --rows / 2 (each new-shape call takes a row count not used before)")
    result: dict[str, object] = {"device": f"cpu x{torch.get_num_threads()} threads", "rows": args.rows,
                                 "shape": f"[rows, {args.d_in}] @ [{args.d_in}, {args.d_out}]"}
    # rows-1, rows-2, ...: never the fixed count, never repeated, never more work than it
    fresh_counts = iter(range(args.rows - 1, 0, -1))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.rows, args.d_in).to(dtype)
        w = torch.randn(args.d_in, args.d_out).to(dtype)
        time_calls(x, w, [args.rows] * 5)  # the fixed shape's kernel built and cached
        same, new = [], []
        for _ in range(args.rounds):
            same.append(time_calls(x, w, [args.rows] * args.calls))
            new.append(time_calls(x, w, [next(fresh_counts) for _ in range(args.calls // args.rounds)]))
        name = str(dtype).removeprefix("torch.")
        result[name] = {"same_shape_us": round(statistics.median(same) * 1e6, 1),
                        "new_shape_us": round(statistics.median(new) * 1e6, 1),
                        "new_over_same": round(statistics.median(new) / statistics.median(same), 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
