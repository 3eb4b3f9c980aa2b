"""lmforge.scaling: scaling laws as a tool — fit them to small runs, plan big ones.

- ``table``: read (parameters, tokens, loss[, compute, unique_tokens, run]) CSV files.
- ``fit``: Approach 3 L(N, D) = E + A/N^α + B/D^β (Huber, L-BFGS-B), the data-constrained
  variant, and :func:`fit.fit_scaling` running Approaches 1–3 with bootstrap intervals.
  ``fit_isoflop`` (Approaches 1 and 2) and ``fit_bootstrap`` hold the rest. No torch.
- ``plan``: compute-optimal and inference-aware N and D for a budget; a model shape.
- ``shape``: the size → shape rule (d_model from n_layers at a fixed aspect ratio) shared
  by the planner and the ladder.
- ``plots``: IsoFLOP profiles, the fitted loss surface, residuals.
- ``synthetic``: data drawn from a known law, for tests and demos.
- ``workflows``: ``scaling fit`` and ``scaling plan`` as calls with typed arguments (the
  command line is ``lmforge.cli.scaling``).
- ``ladder``: train a ladder of small runs, gather and fit them, predict a held-out rung.

See docs/scaling.md.
"""
