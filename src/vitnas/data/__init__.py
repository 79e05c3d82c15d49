"""Data: image folders, the embedded digits, held-out validation, batched augmentation."""

from vitnas.data.augment import RECIPES, AugmentConfig, BatchAugment, eval_transform, recipe
from vitnas.data.datasets import (
    ImageData,
    Split,
    StreamSplit,
    epoch_batches,
    holdout_split,
    load_data,
    load_data_of,
    load_digits,
)
from vitnas.data.folder import DataError, scan_image_folder

__all__ = [
    "RECIPES",
    "AugmentConfig",
    "BatchAugment",
    "DataError",
    "ImageData",
    "Split",
    "StreamSplit",
    "epoch_batches",
    "eval_transform",
    "holdout_split",
    "load_data",
    "load_data_of",
    "load_digits",
    "recipe",
    "scan_image_folder",
]
