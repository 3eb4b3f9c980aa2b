"""Does a small RETRO model learn to copy from a neighbour that repeats its text? With and without the aligned read.

Random tokens (nothing to learn but copying); every chunk has two neighbours: unrelated
tokens, and, in ``--rate`` of the chunks, the true chunk and its continuation (else more
unrelated tokens). Prints the loss on tokens that could be copied (neighbour = the text) and
on the same tokens with unrelated neighbours only, every 50 steps, for CCA alone
(``retro.aligned_read: false``) and CCA with the aligned read (lmforge.nn.retro.AlignedRead).

    python bench/retro_copy.py [--rate 0.25] [--steps 300]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from lmforge.nn.retro import RetroModelConfig


def run(aligned_read: bool, rate: float, steps: int, vocab: int = 256, m: int = 16, n: int = 64, batch: int = 16) -> None:
    torch.manual_seed(0)
    cfg = RetroModelConfig.from_dict({"vocab_size": vocab, "d_model": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 1,
                                      "max_seq_len": n, "retro": {"chunk_len": m, "n_neighbours": 2,
                                                                  "encoder_layers": 1, "aligned_read": aligned_read}})
    model = cfg.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(steps + 1):
        x = torch.randint(1, vocab, (batch, n + m + 1))
        inputs, targets = x[:, :n], x[:, 1:n + 1]
        true = torch.stack([x[:, u * m:(u + 2) * m] for u in range(n // m)], 1)
        other = torch.randint(1, vocab, true.shape)
        use = torch.rand(batch, n // m, 1) < rate
        slot = torch.where(use, true, torch.randint(1, vocab, true.shape))
        loss = model(inputs, targets, neighbours=torch.stack([other, slot], 2)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            with torch.no_grad():
                def later(neighbours: torch.Tensor) -> float:
                    logits = model(inputs, neighbours=neighbours).logits
                    return F.cross_entropy(logits[:, m:].flatten(0, 1), targets[:, m:].flatten()).item()
                copy = later(torch.stack([other, true], 2))
                unrelated = later(torch.stack([other, torch.randint(1, vocab, true.shape)], 2))
            print(f"aligned_read={str(aligned_read):<5} step {step:4d}  copyable tokens {copy:.3f} nats   "
                  f"unrelated neighbours {unrelated:.3f} nats   (chance {math.log(vocab - 1):.3f}; "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.25, help="share of chunks whose neighbour is the text")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    for aligned_read in (False, True):
        run(aligned_read, args.rate, args.steps)


if __name__ == "__main__":
    main()
