"""Static, deployable models with no search code, and the registry that names them.

Every model module is imported here: each registers its variants at its foot, so the registry is full
as soon as `vitnas.models` (or any module in it) is imported.
"""

from vitnas.models import clip, cream, darts, efficientvit, minivit, s3, tinyvit, vit  # noqa: F401  (register the variants)
from vitnas.models.config import ViTConfig
from vitnas.models.registry import create_model, list_models, register_model
from vitnas.models.vit import VisionTransformer
from vitnas.models.weights import load_weights, read_state_dict

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "list_models",
    "register_model",
    "load_weights",
    "read_state_dict",
]
