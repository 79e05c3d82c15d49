"""Search spaces and architecture configs (pure Python: no torch import)."""

from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["ArchConfig", "SearchSpace"]
