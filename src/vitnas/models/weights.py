"""Load pretrained weights into a model: reference checkpoints (`.pth`, read with `weights_only=True`),
plain safetensors files, exported folders' `model.safetensors` and vitnas training checkpoints.

    model = vitnas.create_model("tiny_vit_5m_224", num_classes=10)
    load_weights(model, "tiny_vit_5m_22kto1k_distill.pth")   # classifier of another size: re-initialised

Reference checkpoints usually hold the state dict under 'model' (also accepted: 'state_dict',
'model_ema', 'state_dict_ema', or a bare state dict); a 'module.' prefix left by DistributedDataParallel
is removed. Keys must match the model exactly -- the zoo models use the reference's names -- except the
classifier (`head.*`), whose tensors are skipped when their shapes differ (another number of classes).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights", "load_checkpoint_safely"]

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, never running pickled code."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"  # an exported vitnas folder
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            if "vitnas" in meta and json.loads(meta["vitnas"]).get("format", "").startswith("vitnas-checkpoint"):
                return {n[len("model.") :]: f.get_tensor(n) for n in names if n.startswith("model.")}
            return {n: f.get_tensor(n) for n in names}
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


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Copy `source`'s weights into `model` (strict keys); returns {'loaded': n, 'skipped': [keys]}.

    Classifier tensors (`head.*`) of another shape are skipped, leaving the model's fresh ones; any other
    missing, unexpected or differently shaped tensor is an error naming the keys."""
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    sd = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    own = model.state_dict()
    skipped = [k for k, v in sd.items() if k.startswith("head.") and k in own and own[k].shape != v.shape]
    for k in skipped:
        del sd[k]
    missing = sorted(set(own) - set(sd) - set(skipped))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{name}: keys do not match {type(model).__name__}: missing {_some(missing)}, unexpected "
            f"{_some(unexpected)} (weights of another model?)"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"{name}: {k} has shape {got}, the model expects {want} ({len(wrong)} tensors differ; weights for "
            f"another image size or width? build the model with the arguments the weights were trained with)"
        )
    model.load_state_dict(sd, strict=False)  # the skipped classifier keeps its initialisation
    if skipped:
        log.info("%s: classifier %s not loaded (another number of classes); it starts fresh", name, skipped)
    return {"loaded": len(sd), "skipped": skipped}
