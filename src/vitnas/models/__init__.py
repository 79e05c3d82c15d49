"""Static, deployable models with no search code, and the registry that names them."""

from vitnas.models.registry import create_model, list_models, register_model
from vitnas.models.vit import VisionTransformer
from vitnas.models.weights import load_weights, read_state_dict

__all__ = ["VisionTransformer", "create_model", "list_models", "register_model", "load_weights", "read_state_dict"]
