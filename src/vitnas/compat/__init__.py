"""Loaders for checkpoints written by the reference implementations."""

from vitnas.compat.autoformer import load_autoformer

__all__ = ["load_autoformer"]
