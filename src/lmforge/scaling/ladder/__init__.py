"""Scaling ladders: train a set of small runs ("rungs"), gather them, fit them, predict a held-out one.

- ``config``: the ladder config — **size → model** (``SizeRule``, the shared
  ``scaling.shape.ShapeRule`` plus the list of sizes) kept apart from **model → batch,
  duration, learning rate** (grid or IsoFLOP budgets, batch, LR and schedule rules).
- ``plan``: the config expanded into rungs and every rung's resolved run config.
- ``runner``: train rungs locally in worker processes (finished ones skipped, the rest resumed).
- ``launch``: torchrun lines and Slurm scripts for a cluster (``--print-commands``).
- ``gather``: ``ladder.csv`` and ``curves.csv`` from the run directories.
- ``predict``: the held-out prediction, written before the held-out rungs train, then scored.
- ``plots``: the ladder's ``scaling fit`` and its figures.
- ``driver``: :func:`run_ladder`, the whole ``lmforge scaling ladder`` verb.

See docs/scaling.md.
"""

from lmforge.scaling.ladder.driver import load, run_ladder

__all__ = ["load", "run_ladder"]
