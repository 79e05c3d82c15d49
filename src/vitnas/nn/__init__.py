"""Layers and functional building blocks shared by static models and supernets."""

from vitnas.nn.functional import RelPosInputs, attention, drop_path, mlp
from vitnas.nn.relpos import RelativePosition2D, relpos_index, relpos_logits, relpos_values
from vitnas.nn.slicing import slice_linear, slice_qkv, slice_vector

__all__ = [
    "RelPosInputs",
    "RelativePosition2D",
    "attention",
    "drop_path",
    "mlp",
    "relpos_index",
    "relpos_logits",
    "relpos_values",
    "slice_linear",
    "slice_qkv",
    "slice_vector",
]
