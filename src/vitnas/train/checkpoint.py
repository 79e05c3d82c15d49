"""Self-describing checkpoints: one safetensors file holding weights, optimizer and EMA tensors, with
the config, model description, step and RNG states as JSON metadata. Written atomically; loading
never unpickles anything."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitnas._io import atomic_save_safetensors

__all__ = ["save_checkpoint", "read_checkpoint", "read_metadata", "build_model", "describe_model", "load_model"]

log = logging.getLogger(__name__)
FORMAT = "vitnas-checkpoint-1"


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What `build_model` needs to rebuild `model` (weights aside)."""
    from vitnas.models.vit import VisionTransformer
    from vitnas.supernet.vit import ViTSupernet

    if isinstance(model, ViTSupernet):
        return {"kind": "supernet", "space": model.space.to_dict(), "kwargs": model.init_kwargs}
    if isinstance(model, VisionTransformer):
        return {"kind": "vit", "config": model.config}
    if getattr(model, "registry_spec", None):  # made by vitnas.create_model
        return {"kind": "registry", **model.registry_spec}
    raise TypeError(f"cannot describe a {type(model).__name__} for a checkpoint (build it with vitnas.create_model)")


def build_model(desc: dict[str, Any], *, meta_device: bool = False) -> nn.Module:
    from vitnas.models.vit import VisionTransformer
    from vitnas.space.space import SearchSpace
    from vitnas.supernet.vit import ViTSupernet

    if desc.get("kind") == "registry":  # built on the CPU: such models may hold non-persistent buffers
        from vitnas.models.registry import create_model

        return create_model(desc["name"], **desc["kwargs"])
    device = torch.device("meta") if meta_device else torch.device("cpu")
    with device:
        if desc.get("kind") == "supernet":
            return ViTSupernet(SearchSpace(**desc["space"]), **desc["kwargs"])
        if desc.get("kind") == "vit":
            return VisionTransformer(**desc["config"])
    raise ValueError(f"unknown model kind {desc.get('kind')!r} in checkpoint")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    meta = {**meta, "format": FORMAT, "model": describe_model(model)}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    for name, value in (ema or {}).items():
        tensors[f"ema.{name}"] = value.detach()
    for name, value in (rng or {}).items():
        tensors[f"rng.{name}"] = value
    atomic_save_safetensors({k: v.cpu() for k, v in tensors.items()}, path, metadata={"vitnas": json.dumps(meta)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (config, model description, step, ...) without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["vitnas"])
    except KeyError:
        raise ValueError(
            f"{path}: missing key 'vitnas' in the safetensors metadata (not a vitnas checkpoint)"
        ) from None
    except Exception as err:
        raise ValueError(f"{path}: not a readable vitnas checkpoint: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_checkpoint(
    path: str | Path, only: Collection[str] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({'model': ..., 'optim': ..., 'ema': ..., 'rng': ...} tensors, metadata); `only` names the groups
    whose tensors are read (the others stay empty), e.g. ('model',) to skip the optimizer state."""
    from safetensors import safe_open

    meta = read_metadata(path)  # existence, format and metadata checks
    try:
        with safe_open(str(path), framework="pt") as f:
            groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "ema": {}, "rng": {}}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                group, _, rest = key.partition(".")
                if only is not None and group not in only:
                    continue
                if group == "optim":
                    groups["optim"][key] = f.get_tensor(key)
                else:
                    groups.setdefault(group, {})[rest] = f.get_tensor(key)
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors checkpoint: {err}") from None
    return groups, meta


def optimizer_state(groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> dict[str, Any] | None:
    if "optimizer" not in meta:
        return None
    return _unflatten_optimizer(groups["optim"], meta["optimizer"])


def load_model(path: str | Path, *, use_ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (supernet or plain ViT), in eval mode."""
    groups, meta = read_checkpoint(path, only=("ema",) if use_ema else ("model",))
    model = build_model(meta["model"], meta_device=True)
    if use_ema and not groups["ema"]:
        raise ValueError(f"{path}: holds no EMA weights (trained with ema_decay 0)")
    weights = groups["ema"] if use_ema else groups["model"]
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the model described in it: {err}") from None
    return model.eval(), meta
