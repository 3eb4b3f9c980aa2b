"""lmforge: a compact, complete language-model pretraining system."""

__version__ = "0.1.0"
