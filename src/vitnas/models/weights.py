"""Load pretrained weights into a model: reference checkpoints (`.pth`, read with `weights_only=True`),
plain safetensors files, exported folders' `model.safetensors` and vitnas training checkpoints.

    model = vitnas.create_model("tiny_vit_5m_224", num_classes=10)
    load_weights(model, "tiny_vit_5m_22kto1k_distill.pth")   # classifier of another size: re-initialised

Reference checkpoints usually hold the state dict under 'model' (also accepted: 'state_dict',
'model_ema', 'state_dict_ema', or a bare state dict); a 'module.' prefix left by DistributedDataParallel
is removed. Keys must match the model exactly -- the zoo models use the reference's names. A classifier
(`head.*`) of another size is skipped, and weights trained at another image size are adapted: position
tables resampled, derived index / mask buffers kept.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["read_state_dict", "load_weights", "load_checkpoint_safely", "resize_position_table"]

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
BN_STATS = {"running_mean", "running_var", "num_batches_tracked"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, never running pickled code."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"  # an exported vitnas folder
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from vitnas._io import corrupt_file_error

        try:
            with safe_open(str(path), framework="pt") as f:
                if "vitnas" not in (f.metadata() or {}):
                    return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as err:
            raise corrupt_file_error(path, err) from None
        from vitnas.checkpoint import read_checkpoint  # a vitnas training checkpoint: its weights

        return read_checkpoint(path, only=("model",))[0]["model"]
    sd = _unwrap(load_checkpoint_safely(path), path)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_checkpoint_safely(path: str | Path) -> Any:
    """`torch.load` with `weights_only=True`: tensors, plain Python values and argparse.Namespace (the
    args DeiT-style training scripts save) are accepted; no pickled code runs."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError for non-zip files, ...
        raise ValueError(
            f"{path}: cannot be read with weights-only loading (only tensors, plain Python values and "
            f"argparse.Namespace are accepted; nothing pickled is run): {err}"
        ) from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        raise ValueError(
            f"{path}: expected a state dict, or one under {list(WRAPPER_KEYS)}; found keys {list(obj)[:8]}"
        )
    raise ValueError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")


def _some(keys: list[str], n: int = 6) -> str:
    extra = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{keys[:n]}{extra}"


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _resize_grid(t: torch.Tensor, side: int) -> torch.Tensor:
    """(..., s, s) maps -> (..., side, side), bicubic (as timm resamples position tables)."""
    lead = t.shape[:-2]
    x = t.reshape(1, -1, *t.shape[-2:]).float()
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    return x.reshape(*lead, side, side).to(t.dtype)


def resize_position_table(key: str, src: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`src` adapted to `shape` when `key` is a position table that depends on the image or window size;
    None for anything else. Handled: absolute `pos_embed` (1, [cls +] s*s, C), resampled; EfficientViT /
    TinyViT `attention_biases` (heads, s*s) and Swin / S3 `relative_position_bias_table` ((2w-1)^2, heads),
    cropped to a smaller window, resampled to a larger one."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "pos_embed" and src.ndim == 3 and len(shape) == 3 and src.shape[2] == shape[2]:
        for prefix in (0, 1):  # no class token (Mini-DeiT), or one (DeiT, AutoFormer)
            a, b = _square(src.shape[1] - prefix), _square(shape[1] - prefix)
            if a and b:
                grid = src[:, prefix:].reshape(1, a, a, -1).permute(0, 3, 1, 2)
                grid = _resize_grid(grid, b).permute(0, 2, 3, 1).reshape(1, b * b, -1)
                return torch.cat([src[:, :prefix], grid], dim=1)
    # Offset tables: a smaller window keeps the entries of the offsets it still has (the same token
    # distances); a larger one is resampled, as timm does when fine-tuning Swin at a larger window.
    if leaf == "attention_biases" and src.ndim == 2 and len(shape) == 2 and src.shape[0] == shape[0]:
        a, b = _square(src.shape[1]), _square(shape[1])  # offsets |dy|, |dx| in 0..s-1
        if a and b:
            grid = src.reshape(-1, a, a)
            grid = grid[:, :b, :b] if b < a else _resize_grid(grid, b)
            return grid.reshape(shape).contiguous()
    if leaf == "relative_position_bias_table" and src.ndim == 2 and len(shape) == 2 and src.shape[1] == shape[1]:
        a, b = _square(src.shape[0]), _square(shape[0])  # offsets dy, dx in -(w-1)..w-1
        if a and b:
            grid = src.t().reshape(-1, a, a)
            lo = (a - b) // 2
            grid = grid[:, lo : lo + b, lo : lo + b] if b < a else _resize_grid(grid, b)
            return grid.reshape(-1, b * b).t().contiguous()
    return None


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Copy `source`'s weights into `model` (strict keys); returns {'loaded': n, 'skipped': [keys],
    'resized': [keys]}.

    Weights trained at another image size load into a model built for yours: position tables are
    resampled (`resize_position_table`) and index / mask buffers, which the model derives from its own
    sizes, are kept. Classifier tensors (`head.*`) of another shape are skipped, leaving the model's
    fresh ones (another number of classes). Any other missing, unexpected or differently shaped tensor
    is an error naming the keys."""
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    sd = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    own = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    # buffers the model derives from its own sizes (index tables, shift masks), unlike BN statistics
    derived = {k.rsplit(".", 1)[-1] for k in own if k not in params} - BN_STATS
    skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape and k.startswith("head.")]
    skipped += [
        k for k, v in sd.items() if k.rsplit(".", 1)[-1] in derived and (k not in own or own[k].shape != v.shape)
    ]
    for k in skipped:
        del sd[k]
    missing = sorted(k for k in set(own) - set(sd) - set(skipped) if k in params or k.rsplit(".", 1)[-1] not in derived)
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{name}: keys do not match {type(model).__name__}: missing {_some(missing)}, unexpected "
            f"{_some(unexpected)} (weights of another model?)"
        )
    resized = []
    for k, v in list(sd.items()):
        if v.shape != own[k].shape:
            new = resize_position_table(k, v, own[k].shape)
            if new is not None:
                sd[k] = new
                resized.append(k)
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"{name}: {k} has shape {got}, the model expects {want} ({len(wrong)} tensors differ; weights of "
            f"another width or depth? build the model with the arguments the weights were trained with)"
        )
    model.load_state_dict(sd, strict=False)  # skipped tensors keep the model's own values
    if skipped:
        log.info("%s: kept the model's own %s (another number of classes or image size)", name, _some(skipped))
    if resized:
        log.info("%s: resampled %s to the model's image / window size", name, _some(resized))
    return {"loaded": len(sd), "skipped": skipped, "resized": resized}
