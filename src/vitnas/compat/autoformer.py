"""Load checkpoints written by AutoFormer's reference training script (microsoft/Cream, AutoFormer/).

The script saves `{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'}` with
`torch.save`; `args` is an `argparse.Namespace`, the only non-tensor global in the pickle. We load it
with `weights_only=True` and exactly that class allowed, so no pickled code can run.

Only the setting of all published runs is supported: `--change_qkv` (q/k/v width = heads x 64), which
requires the supernet width to be 64 x its head count. The result uses `qkv_layout="autoformer"`, which
reproduces the reference's slicing of the fused q/k/v weight (rows interleaved) and bias (plain prefix).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitnas.models.weights import load_checkpoint_safely
from vitnas.space.space import SearchSpace
from vitnas.supernet.vit import ViTSupernet

__all__ = ["load_autoformer", "read_autoformer_checkpoint", "convert_autoformer_state_dict"]

log = logging.getLogger(__name__)

_BLOCK_KEYS = {
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "attn.rel_pos_embed_k.embeddings_table_v": "attn.rel_pos_k.table_v",
    "attn.rel_pos_embed_k.embeddings_table_h": "attn.rel_pos_k.table_h",
    "attn.rel_pos_embed_v.embeddings_table_v": "attn.rel_pos_v.table_v",
    "attn.rel_pos_embed_v.embeddings_table_h": "attn.rel_pos_v.table_h",
    "attn_layer_norm.weight": "norm1.weight",
    "attn_layer_norm.bias": "norm1.bias",
    "ffn_layer_norm.weight": "norm2.weight",
    "ffn_layer_norm.bias": "norm2.bias",
    "fc1.weight": "mlp.fc1.weight",
    "fc1.bias": "mlp.fc1.bias",
    "fc2.weight": "mlp.fc2.weight",
    "fc2.bias": "mlp.fc2.bias",
}
_TOP_KEYS = {
    "pos_embed": "pos_embed",
    "cls_token": "cls_token",
    "patch_embed_super.proj.weight": "patch_embed.proj.weight",
    "patch_embed_super.proj.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def read_autoformer_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded without running pickled code (only `argparse.Namespace` allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    ckpt = load_checkpoint_safely(path)
    if isinstance(ckpt, Mapping) and "model" in ckpt:
        return dict(ckpt)
    if isinstance(ckpt, Mapping) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": dict(ckpt)}  # a bare state dict
    raise ValueError(f"{path}: expected a dict with a 'model' state dict, got keys {list(ckpt)[:8]}")


def convert_autoformer_state_dict(state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> dict:
    """Rename reference keys to ours (dropping any DDP `module.` prefix); unknown keys are an error."""
    out = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in _TOP_KEYS:
            out[_TOP_KEYS[name]] = value
            continue
        m = _BLOCK_RE.match(name)
        if m and m.group(2) in _BLOCK_KEYS:
            out[f"blocks.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"] = value
            continue
        raise ValueError(f"{source}: unexpected key {key!r} for an AutoFormer supernet")
    return out


def _arg(args: Any, name: str, default: Any) -> Any:
    return getattr(args, name, default) if args is not None else default


def _namespace(ckpt: Mapping[str, Any]) -> argparse.Namespace | None:
    """The training script's `args`, or None when the checkpoint has none (or something else)."""
    args = ckpt.get("args")
    return args if isinstance(args, argparse.Namespace) else None


def _need(state: Mapping[str, torch.Tensor], path: Path, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path}: missing key {key!r} in the model state dict")
    return state[key]


def _read_shapes(state: Mapping[str, torch.Tensor], space: SearchSpace, path: Path) -> dict[str, Any]:
    """The supernet's dimensions, from its tensor shapes (the head dim from the relative-position
    tables, or the space's without them)."""
    embed = _need(state, path, "cls_token").shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads_x3, _ = _need(state, path, "blocks.0.attn.qkv.weight").shape
    fc1_rows = _need(state, path, "blocks.0.mlp.fc1.weight").shape[0]
    patch_weight = _need(state, path, "patch_embed.proj.weight")
    rel = "blocks.0.attn.rel_pos_k.table_v" in state
    head_dim = state["blocks.0.attn.rel_pos_k.table_v"].shape[1] if rel else space.head_dim
    if heads_x3 % (3 * head_dim):
        raise ValueError(f"{path}: qkv has {heads_x3} rows, not a multiple of 3 x head_dim {head_dim}")
    return {
        "embed": embed,
        "depth": depth,
        "max_num_heads": heads_x3 // (3 * head_dim),
        "max_mlp_ratio": fc1_rows / embed,
        "head_dim": head_dim,
        "patch": patch_weight.shape[-1],
        "in_chans": patch_weight.shape[1],
        "rel": rel,
        "abs_pos": "pos_embed" in state,
    }


def _check_capacity(shapes: Mapping[str, Any], space: SearchSpace, path: Path) -> None:
    """The space's capacity must be the checkpoint's."""
    found = {
        "max_embed_dim": shapes["embed"],
        "max_depth": shapes["depth"],
        "max_num_heads": shapes["max_num_heads"],
        "max_mlp_ratio": shapes["max_mlp_ratio"],
        "head_dim": shapes["head_dim"],
    }
    for name, value in found.items():
        want = getattr(space, name)
        if not math.isclose(float(want), float(value)):
            raise ValueError(
                f"{path}: the checkpoint's supernet has {name}={value:g}, the space {space.name!r} {want:g}"
            )


def _image_size(state: Mapping[str, torch.Tensor], args: Any, space: SearchSpace, patch: int, path: Path) -> int:
    """From the position embedding's grid when there is one, else the training `--input_size`."""
    if "pos_embed" not in state:
        return int(_arg(args, "input_size", space.img_size))
    patches = _need(state, path, "pos_embed").shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{path}: pos_embed holds {patches} patches, not a square grid")
    return side * patch


def _supernet_kwargs(state: Mapping[str, torch.Tensor], args: Any, space: SearchSpace, path: Path) -> dict[str, Any]:
    """`ViTSupernet` settings that reproduce the checkpoint's supernet (checked against `space`)."""
    shapes = _read_shapes(state, space, path)
    _check_capacity(shapes, space, path)
    img_size = _image_size(state, args, space, shapes["patch"], path)
    rel = shapes["rel"]
    rel_pos_max = (state["blocks.0.attn.rel_pos_k.table_v"].shape[0] - 2) // 2 if rel else space.rel_pos_max
    return dict(
        img_size=img_size,
        patch_size=shapes["patch"],
        num_classes=_need(state, path, "head.weight").shape[0],
        in_chans=shapes["in_chans"],
        qkv_bias=True,
        rel_pos=rel,
        rel_pos_max=rel_pos_max,
        abs_pos=shapes["abs_pos"],
        global_pool="avg" if _arg(args, "gp", True) else "token",
        norm_eps=1e-5,
        drop_rate=float(_arg(args, "drop", 0.0)),
        drop_path_rate=float(_arg(args, "drop_path", 0.1)),
        qkv_layout="autoformer",
    )


def load_autoformer(path: str | Path, space: SearchSpace | str) -> ViTSupernet:
    """A `ViTSupernet` holding an AutoFormer supernet checkpoint, giving the reference's logits.

    `space` (a SearchSpace or a preset name) supplies the search choices; its capacity must equal the
    checkpoint's. Image size, patch size, classes, relative-position range, absolute position and
    pooling are read from the checkpoint (tensor shapes and its `args`).
    """
    if isinstance(space, str):
        space = SearchSpace.preset(space)
    path = Path(path)
    ckpt = read_autoformer_checkpoint(path)
    args = _namespace(ckpt)
    state = convert_autoformer_state_dict(ckpt["model"], source=str(path))
    if _arg(args, "change_qkv", True) is False:
        raise ValueError(f"{path}: trained without --change_qkv; only change_qkv supernets (all published) load")
    kwargs = _supernet_kwargs(state, args, space, path)
    with torch.device("meta"):
        net = ViTSupernet(space, **kwargs)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the inferred supernet: {err}") from None
    log.info(
        "loaded AutoFormer supernet from %s (epoch %s): embed %d, depth %d, %dpx, %d classes",
        path,
        ckpt.get("epoch"),
        net.max_embed_dim,
        len(net.blocks),
        kwargs["img_size"],
        kwargs["num_classes"],
    )
    return net.eval()
