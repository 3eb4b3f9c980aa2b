"""The LM head and its loss alone: the plain loss (full logits, ``F.cross_entropy``) against the
fused row-chunked one (``lmforge.nn.cross_entropy``) at several chunk sizes, forward + backward,
and ``matmuls``: the head's three matmuls alone (logits, gradient of the hidden states, gradient
of the weight), the floor under both, so ``1 - matmuls / fused`` is the loss's own share.

    OMP_NUM_THREADS=1 python bench/head_loss.py --rows 2048 --vocab 4096 --d-model 128 --rounds 12

The variants run in alternating rounds (one call of each per round, so machine load hits them
alike); reported per precision: the median milliseconds per call over the rounds, by default of
the process's CPU time (``--clock wall`` for wall time), and each variant against the plain loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.nn.cross_entropy import linear_cross_entropy


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _backward(loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Step:
    def step(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
        loss(h, w, t).backward()
    return step


def _matmuls(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
    with torch.no_grad():
        logits = h @ w.t()
        logits @ w
        logits.t() @ h


def variants(chunks: list[int]) -> dict[str, Step]:
    found: dict[str, Step] = {"plain": _backward(lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t)),
                              "matmuls": _matmuls}
    for rows in chunks:
        found[f"fused_{rows}"] = _backward(lambda h, w, t, rows=rows: linear_cross_entropy(h, w, t, chunk_rows=rows))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048, help="tokens per step (batch x sequence)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--chunks", default="128,256,512,1024", help="comma-separated chunk sizes of the fused loss")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (CPU autocast)")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()

    torch.manual_seed(0)
    hidden = torch.randn(args.rows, args.d_model, requires_grad=True)
    weight = (0.02 * torch.randn(args.vocab, args.d_model)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,))
    clock = time.process_time if args.clock == "process" else time.perf_counter
    table = variants([int(c) for c in args.chunks.split(",")])
    results = {}
    for precision in args.precisions.split(","):
        autocast = precision == "bf16"
        times: dict[str, list[float]] = {name: [] for name in table}
        for round_index in range(args.rounds + 2):           # two untimed warm-up rounds
            names = list(table) if round_index % 2 == 0 else list(reversed(table))
            for name in names:
                start = clock()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    table[name](hidden, weight, targets)
                hidden.grad = weight.grad = None
                if round_index >= 2:
                    times[name].append(clock() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results[precision] = {name: {"ms": round(ms, 1), "vs_plain": round(medians["plain"] / ms, 2)}
                              for name, ms in medians.items()}
        print(f"{precision}: " + ", ".join(f"{name} {ms:.1f} ms ({medians['plain'] / ms:.2f}x)"
                                          for name, ms in medians.items()), flush=True)
    print(json.dumps({"rows": args.rows, "vocab": args.vocab, "d_model": args.d_model, "clock": args.clock,
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
