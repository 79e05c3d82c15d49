"""Static, deployable models with no search code."""

from vitnas.models.vit import VisionTransformer

__all__ = ["VisionTransformer"]
