"""Continual pretraining experiments: a parent, continuations with replay, a union baseline
(:mod:`lmforge.continual.experiment`); the mechanisms themselves live in the trainer's run
assembly (``init``, ``replay``: :mod:`lmforge.train.init_from`, :mod:`lmforge.data.replay`)."""
