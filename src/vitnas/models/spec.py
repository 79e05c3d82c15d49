"""One way to describe and rebuild any vitnas model: `spec_of(model) -> dict`, `build(spec) -> nn.Module`.

A spec is plain JSON: `{"kind": ...}` plus what that kind's constructor needs, weights aside.

    {"kind": "vit", "config": {...}}                       a VisionTransformer (an exported subnet)
    {"kind": "supernet", "space": {...}, "kwargs": {...}}  a ViTSupernet on a SearchSpace
    {"kind": "registry", "name": ..., "kwargs": {...}}     anything `create_model(name, **kwargs)` made
    {"kind": "mbconv_supernet", "space": {...}, "kwargs": {...}}  an MBConvSupernet (Cream) on an MBConvSpace
    {"kind": "cream", "config": {...}}                     a CreamNet (an extracted MBConv subnet)
    {"kind": "s3_supernet", "space": {...}, "kwargs": {...}}  an S3Supernet (S3 / AutoFormerV2) on an S3Space
    {"kind": "s3", "config": {...}}                        an S3Transformer (an extracted S3 subnet, S3-T/S/B)
    {"kind": "darts_supernet", "space": {...}, "kwargs": {...}}   a DartsSupernet (DARTS search / weight pool)
    {"kind": "cdarts_supernet", "space": {...}, "kwargs": {...}}  CDARTS's search + evaluation networks
    {"kind": "darts", "config": {...}}                     a DartsNet (a genotype's network)
    {"kind": "clip", "config": {...}}                      a CLIP (TinyCLIP / open_clip; pruned ones too)

Checkpoints store it under metadata key "model", exported folders under "spec" in config.json; both
read the same way (`build`), and folders exported before the spec existed are read by `export_spec`.
A new model family adds one entry to `KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitnas.checkpoint import read_checkpoint
from vitnas.models.clip import CLIP, CLIPConfig
from vitnas.models.cream import CreamNet
from vitnas.models.darts import DartsNet
from vitnas.models.registry import create_model
from vitnas.models.s3 import S3Transformer
from vitnas.models.vit import VisionTransformer
from vitnas.space.darts import DartsSpace
from vitnas.space.mbconv import MBConvSpace
from vitnas.space.s3 import S3Space
from vitnas.space.space import SearchSpace
from vitnas.supernet.darts import CDARTSSupernet, DartsSupernet
from vitnas.supernet.mbconv import MBConvSupernet
from vitnas.supernet.s3 import S3Supernet
from vitnas.supernet.vit import ViTSupernet

__all__ = ["KINDS", "SUPERNET_KINDS", "Kind", "build", "export_spec", "is_supernet", "load_model", "spec_of"]


@dataclass(frozen=True)
class Kind:
    """How one model family is described and rebuilt. Its models must build on the meta device (no
    non-persistent buffers computed at construction), so loading skips initialisation."""

    cls: type[nn.Module]
    describe: Callable[[Any], dict[str, Any]]
    construct: Callable[[dict[str, Any]], nn.Module]


KINDS: dict[str, Kind] = {
    "supernet": Kind(
        ViTSupernet,
        lambda m: {"space": m.space.to_dict(), "kwargs": m.init_kwargs},
        lambda s: ViTSupernet(SearchSpace(**s["space"]), **s["kwargs"]),
    ),
    "vit": Kind(VisionTransformer, lambda m: {"config": m.config}, lambda s: VisionTransformer(**s["config"])),
    "mbconv_supernet": Kind(
        MBConvSupernet,
        lambda m: {"space": m.space.to_dict(), "kwargs": m.init_kwargs},
        lambda s: MBConvSupernet(MBConvSpace(**s["space"]), **s["kwargs"]),
    ),
    "cream": Kind(CreamNet, lambda m: {"config": m.config}, lambda s: CreamNet(**s["config"])),
    "s3_supernet": Kind(
        S3Supernet,
        lambda m: {"space": m.space.to_dict(), "kwargs": m.init_kwargs},
        lambda s: S3Supernet(S3Space(**s["space"]), **s["kwargs"]),
    ),
    "s3": Kind(S3Transformer, lambda m: {"config": m.config}, lambda s: _s3_transformer(s["config"])),
    "darts_supernet": Kind(
        DartsSupernet,
        lambda m: {"space": m.space.to_dict(), "kwargs": m.init_kwargs},
        lambda s: DartsSupernet(DartsSpace(**s["space"]), **s["kwargs"]),
    ),
    "cdarts_supernet": Kind(
        CDARTSSupernet,
        lambda m: {"space": m.space.to_dict(), "kwargs": m.init_kwargs},
        lambda s: CDARTSSupernet(DartsSpace(**s["space"]), **s["kwargs"]),
    ),
    "darts": Kind(DartsNet, lambda m: {"config": m.config}, lambda s: DartsNet(**s["config"])),
    "clip": Kind(CLIP, lambda m: {"config": m.config.to_dict()}, lambda s: CLIP(CLIPConfig.from_dict(s["config"]))),
}

# the kinds that hold weight-sharing supernets (search them, or extract a subnet before export / teaching)
SUPERNET_KINDS = frozenset({"supernet", "mbconv_supernet", "s3_supernet", "darts_supernet", "cdarts_supernet"})


def is_supernet(kind: str) -> bool:
    """Whether a spec's `kind` is a supernet's."""
    return kind in SUPERNET_KINDS


def _s3_transformer(config: dict[str, Any]) -> S3Transformer:
    """Built on the CPU even when asked for the meta device (as "registry" models are): its window gathers
    are non-persistent buffers computed at construction, which loading a state dict would not fill."""
    with torch.device("cpu"):
        return S3Transformer(**config)


def spec_of(model: nn.Module) -> dict[str, Any]:
    """What `build` needs to rebuild `model` (weights aside)."""
    for name, kind in KINDS.items():
        if type(model) is kind.cls:
            return {"kind": name, **kind.describe(model)}
    registry = getattr(model, "registry_spec", None)
    if registry:  # made by vitnas.create_model
        return {"kind": "registry", "name": registry["name"], "kwargs": dict(registry["kwargs"])}
    raise TypeError(
        f"cannot describe a {type(model).__name__}: build it with vitnas.create_model, or add its kind to "
        f"vitnas.models.spec.KINDS"
    )


def build(spec: dict[str, Any], *, meta_device: bool = False, source: str = "model spec") -> nn.Module:
    """The model `spec` describes, with fresh (or, on the meta device, unallocated) weights."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"{source}: expected a mapping with key 'kind', got {spec!r:.200}")
    name = spec["kind"]
    if name == "registry":  # built on the CPU: such models may hold non-persistent buffers
        if "name" not in spec:
            raise ValueError(f"{source}: a 'registry' spec needs key 'name' (a registered model)")
        return create_model(spec["name"], **spec.get("kwargs", {}))
    if name not in KINDS:
        raise ValueError(f"{source}: unknown model kind {name!r}; expected one of {['registry', *KINDS]}")
    kind = KINDS[name]
    with torch.device("meta" if meta_device else "cpu"):
        try:
            return kind.construct(spec)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: not a valid {name!r} spec: {err}") from None


def export_spec(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """The spec of an exported folder's config.json, in today's layout ("spec") or in the layout
    written before it ("model": "VisionTransformer" with "config", or "model": "registry" with "name")."""
    if isinstance(config.get("spec"), dict):
        return config["spec"]
    if config.get("model") == "VisionTransformer" and "config" in config:
        return {"kind": "vit", "config": config["config"]}
    if config.get("model") == "registry" and "name" in config:
        return {"kind": "registry", "name": config["name"], "kwargs": config.get("kwargs", {})}
    raise ValueError(
        f"{source}: expected key 'spec' (a model spec), or the older 'model' = 'VisionTransformer' with "
        f"'config' / 'model' = 'registry' with 'name'"
    )


def load_model(path: str | Path, *, use_ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """(the model a training checkpoint holds, in eval mode; the checkpoint's metadata)."""
    groups, meta = read_checkpoint(path, only=("ema",) if use_ema else ("model",))
    model = build(meta["model"], meta_device=True, source=f"{path}: metadata 'model'")
    if use_ema and not groups["ema"]:
        raise ValueError(f"{path}: holds no EMA weights (trained with ema_decay 0)")
    weights = groups["ema"] if use_ema else groups["model"]
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the model described in it: {err}") from None
    return model.eval(), meta
