"""Synthetic data: documents written by a teacher model, with provenance (``lmforge synth``), and the
experiments that decide whether to trust them (``lmforge synth-collapse``). See docs/data_limited.md."""
