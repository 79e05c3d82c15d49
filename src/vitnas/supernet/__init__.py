"""Weight-sharing supernets."""

from vitnas.supernet.vit import ViTSupernet

__all__ = ["ViTSupernet"]
