"""Does a small RETRO model learn to *read* a neighbour, not only copy it? A synthetic lookup task.

The facts benchmarks ask a question whose answer sits somewhere in a retrieved document, in
another phrasing: the model must find it by content, not by position. This is that skill with
nothing else to learn. Random filler tokens; one neighbour slot of each chunk holds ``--pairs``
(key, value) pairs at random places (keys and values from their own vocabularies); in the next
chunk of the text one of those keys appears, followed by its value. Loss on the value tokens,
every 100 steps, with the neighbour holding the pair and with an unrelated neighbour (chance:
ln of the value vocabulary). ``--pairs 1`` is the easy form (any value in the neighbour is the
answer, as in a fact document about one person); more pairs need the key matched.

    python bench/retro_lookup.py [--pairs 1,4] [--steps 600] [--seeds 0,1] [--lr-multiplier encoder.=0.1]
        [--set retro.encoder_layers=0 ...]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from lmforge.core.config import apply_overrides
from lmforge.nn.retro import RetroModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.optim.optimizers import build_optimizer

FILLER, KEYS, VALUES = (1, 160), (160, 208), (208, 256)


def lookup_batch(generator: torch.Generator, batch: int, n: int, m: int, pairs: int, asked: bool = True):
    """(inputs, targets, neighbours [B, n/m, 2, 2m], value positions [B, n/m - 1]) of one batch."""
    chunks = n // m
    x = torch.randint(*FILLER, (batch, n + 1), generator=generator)
    slot = torch.randint(*FILLER, (batch, chunks, 2 * m), generator=generator)
    other = torch.randint(*FILLER, (batch, chunks, 2 * m), generator=generator)
    positions = torch.zeros(batch, chunks - 1, dtype=torch.long)
    for b in range(batch):
        for u in range(chunks - 1):
            keys = torch.randperm(KEYS[1] - KEYS[0], generator=generator)[:pairs] + KEYS[0]
            values = torch.randint(*VALUES, (pairs,), generator=generator)
            places = torch.randperm(m - 1, generator=generator)[:pairs] * 2  # pairs never overlap
            slot[b, u, places], slot[b, u, places + 1] = keys, values
            if asked:  # the text of chunk u+1 asks one key: "... key value ..."
                j = int(torch.randint(pairs, (1,), generator=generator))
                p = (u + 1) * m + int(torch.randint(m - 1, (1,), generator=generator))
                x[b, p], x[b, p + 1] = keys[j], values[j]
                positions[b, u] = p
    return x[:, :n], x[:, 1:n + 1], torch.stack([other, slot], 2), positions


def value_loss(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> float:
    rows = torch.arange(len(positions))[:, None].expand_as(positions)
    return F.cross_entropy(logits[rows, positions].flatten(0, 1), targets[rows, positions].flatten()).item()


def run(pairs: int, steps: int, overrides: list[str], seed: int = 0, lr: float = 3e-3,
        lr_multipliers: dict[str, float] | None = None, m: int = 16, n: int = 64, batch: int = 16) -> dict:
    torch.manual_seed(seed)
    values = {"vocab_size": VALUES[1], "d_model": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 1,
              "max_seq_len": n, "retro": {"chunk_len": m, "n_neighbours": 2, "encoder_layers": 1}}
    cfg = RetroModelConfig.from_dict(apply_overrides(values, overrides))
    model = cfg.build()
    # lmforge's own AdamW (its betas and weight decay), constant LR
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=lr, schedule="constant",
                                                   lr_multipliers=lr_multipliers or {}))
    generator, held_out = torch.Generator().manual_seed(1000 + seed), torch.Generator().manual_seed(2)
    test = lookup_batch(held_out, 64, n, m, pairs)
    unrelated = lookup_batch(held_out, 64, n, m, pairs, asked=False)[2]
    start, curve = time.perf_counter(), []
    label = " ".join([*overrides, *(f"lr[{k}]x{v}" for k, v in (lr_multipliers or {}).items())]) or "defaults"
    for step in range(steps + 1):
        inputs, targets, neighbours, _ = lookup_batch(generator, batch, n, m, pairs)
        loss = model(inputs, targets, neighbours=neighbours).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                read = value_loss(model(test[0], neighbours=test[2]).logits, test[1], test[3])
                blind = value_loss(model(test[0], neighbours=unrelated).logits, test[1], test[3])
            curve.append({"step": step, "value_loss": read, "unrelated_neighbour": blind})
            print(f"seed {seed} pairs={pairs} {label:<28} step {step:4d}  value tokens {read:.3f} nats"
                  f"   unrelated neighbour {blind:.3f}   (chance {math.log(VALUES[1] - VALUES[0]):.3f};"
                  f" {time.perf_counter() - start:.0f} s)", flush=True)
    return {"pairs": pairs, "seed": seed, "overrides": overrides, "lr_multipliers": lr_multipliers, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1,4", help="comma-separated (key, value) pairs per neighbour")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--lr-multiplier", action="append", default=[], metavar="PREFIX=X",
                        help="optim.lr_multipliers entry, e.g. encoder.=0.1 (the neighbour encoder)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (model initialisation and batches)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="model config override (e.g. retro.aligned_read=false)")
    args = parser.parse_args()
    if any(not 1 <= int(p) <= 15 for p in args.pairs.split(",")):  # pairs sit in 2-token cells of a 32-token neighbour
        parser.error(f"--pairs: each count must be in 1..15 (chunk_len 16), got {args.pairs}")
    multipliers = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr_multiplier)}
    for pairs in (int(p) for p in args.pairs.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            run(pairs, args.steps, args.overrides, seed, args.lr, multipliers)


if __name__ == "__main__":
    main()
