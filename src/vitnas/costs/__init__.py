"""Cost models: analytic parameter and MAC counts (measured latency comes later)."""

from vitnas.costs.vit import ViTCostModel

__all__ = ["ViTCostModel"]
