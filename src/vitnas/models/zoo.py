"""Registered variants: DeiT, DeiT with iRPE (named as the iRPE reference's models), AutoFormer-T/S/B."""

from __future__ import annotations

from typing import Any

from vitnas.models.registry import register_model
from vitnas.models.vit import VisionTransformer

DEIT = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
# The searched AutoFormer subnets (AutoFormer/experiments/subnet/AutoFormer-{T,S,B}.yaml).
AUTOFORMER = {
    "tiny": (192, [3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0, 3.5], [3] * 10 + [4, 3, 3]),
    "small": (
        384,
        [3.0, 3.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.5, 4.0],
        [6, 6, 5, 7, 5, 5, 5, 6, 6, 7, 7, 6, 7],
    ),
    "base": (
        576,
        [3.5, 3.5, 4.0, 3.5, 4.0, 3.5, 3.5, 3.0, 4.0, 4.0, 3.0, 4.0, 3.0, 3.5],
        [9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10],
    ),
}


def _deit(size: str, irpe: dict[str, Any] | None = None, **kw: Any) -> VisionTransformer:
    e, h = DEIT[size]
    args = dict(
        embed_dim=e,
        depth=12,
        num_heads=h,
        mlp_ratios=4.0,
        head_dim=64,
        rel_pos=False,
        global_pool="token",
        norm_eps=1e-6,
        irpe=irpe,
    )
    return VisionTransformer(**{**args, **kw})


def _autoformer(size: str, **kw: Any) -> VisionTransformer:
    e, mlp, heads = AUTOFORMER[size]
    args = dict(
        embed_dim=e,
        depth=len(mlp),
        num_heads=heads,
        mlp_ratios=mlp,
        head_dim=64,
        rel_pos=True,
        rel_pos_max=14,
        global_pool="avg",
        norm_eps=1e-5,
    )
    return VisionTransformer(**{**args, **kw})


@register_model
def deit_tiny_patch16_224(**kw: Any) -> VisionTransformer:
    return _deit("tiny", **kw)


@register_model
def deit_small_patch16_224(**kw: Any) -> VisionTransformer:
    return _deit("small", **kw)


@register_model
def deit_base_patch16_224(**kw: Any) -> VisionTransformer:
    return _deit("base", **kw)


# iRPE: contextual mode, shared head, one extra bucket for the class token; "_N" counts the buckets a
# 14x14 grid uses, as in the reference's names.
@register_model
def deit_tiny_patch16_224_ctx_product_50_shared_k(**kw: Any) -> VisionTransformer:
    return _deit("tiny", {"method": "product", "ratio": 1.9, "on": "k"}, **kw)


@register_model
def deit_small_patch16_224_ctx_euc_20_shared_k(**kw: Any) -> VisionTransformer:
    return _deit("small", {"method": "euc", "ratio": 20, "on": "k"}, **kw)


@register_model
def deit_small_patch16_224_ctx_quant_51_shared_k(**kw: Any) -> VisionTransformer:
    return _deit("small", {"method": "quant", "ratio": 33, "on": "k"}, **kw)


@register_model
def deit_small_patch16_224_ctx_cross_56_shared_k(**kw: Any) -> VisionTransformer:
    return _deit("small", {"method": "cross", "ratio": 20, "on": "k"}, **kw)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_k(**kw: Any) -> VisionTransformer:
    return _deit("small", {"method": "product", "ratio": 1.9, "on": "k"}, **kw)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_qk(**kw: Any) -> VisionTransformer:
    return _deit("small", {"method": "product", "ratio": 1.9, "on": "qk"}, **kw)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_qkv(**kw: Any) -> VisionTransformer:
    return _deit("small", {"method": "product", "ratio": 1.9, "on": "qkv"}, **kw)


@register_model
def deit_base_patch16_224_ctx_product_50_shared_k(**kw: Any) -> VisionTransformer:
    return _deit("base", {"method": "product", "ratio": 1.9, "on": "k"}, **kw)


@register_model
def deit_base_patch16_224_ctx_product_50_shared_qkv(**kw: Any) -> VisionTransformer:
    return _deit("base", {"method": "product", "ratio": 1.9, "on": "qkv"}, **kw)


@register_model
def autoformer_tiny(**kw: Any) -> VisionTransformer:
    return _autoformer("tiny", **kw)


@register_model
def autoformer_small(**kw: Any) -> VisionTransformer:
    return _autoformer("small", **kw)


@register_model
def autoformer_base(**kw: Any) -> VisionTransformer:
    return _autoformer("base", **kw)


# EfficientViT M0-M5 (EfficientViT/classification/model/build.py): embed dims, depths, heads, kernels.
EFFICIENTVIT = {
    "m0": ((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "m1": ((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "m2": ((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "m3": ((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "m4": ((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "m5": ((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}


def _efficientvit(variant: str, **kw: Any):
    from vitnas.models.efficientvit import EfficientViT

    e, d, h, k = EFFICIENTVIT[variant]
    return EfficientViT(**{**dict(embed_dim=e, depth=d, num_heads=h, kernels=k), **kw})


@register_model
def efficientvit_m0(**kw: Any):
    return _efficientvit("m0", **kw)


@register_model
def efficientvit_m1(**kw: Any):
    return _efficientvit("m1", **kw)


@register_model
def efficientvit_m2(**kw: Any):
    return _efficientvit("m2", **kw)


@register_model
def efficientvit_m3(**kw: Any):
    return _efficientvit("m3", **kw)


@register_model
def efficientvit_m4(**kw: Any):
    return _efficientvit("m4", **kw)


@register_model
def efficientvit_m5(**kw: Any):
    return _efficientvit("m5", **kw)


# TinyViT (TinyViT/models/tiny_vit.py): embed dims, heads, drop-path; depths 2,2,6,2; windows 7,7,14,7.
TINYVIT = {
    "5m": ((64, 128, 160, 320), (2, 4, 5, 10), 0.0),
    "11m": ((64, 128, 256, 448), (2, 4, 8, 14), 0.1),
    "21m": ((96, 192, 384, 576), (3, 6, 12, 18), 0.2),
}


def _tinyvit(variant: str, windows=(7, 7, 14, 7), img_size: int = 224, drop_path_rate: float | None = None, **kw: Any):
    from vitnas.models.tinyvit import TinyViT

    dims, heads, dpr = TINYVIT[variant]
    return TinyViT(
        embed_dims=dims,
        depths=(2, 2, 6, 2),
        num_heads=heads,
        window_sizes=windows,
        img_size=img_size,
        drop_path_rate=dpr if drop_path_rate is None else drop_path_rate,
        **kw,
    )


@register_model
def tiny_vit_5m_224(**kw: Any):
    return _tinyvit("5m", **kw)


@register_model
def tiny_vit_11m_224(**kw: Any):
    return _tinyvit("11m", **kw)


@register_model
def tiny_vit_21m_224(**kw: Any):
    return _tinyvit("21m", **kw)


@register_model
def tiny_vit_21m_384(**kw: Any):
    return _tinyvit("21m", windows=(12, 12, 24, 12), **{"img_size": 384, "drop_path_rate": 0.1, **kw})


@register_model
def tiny_vit_21m_512(**kw: Any):
    return _tinyvit("21m", windows=(16, 16, 32, 16), **{"img_size": 512, "drop_path_rate": 0.1, **kw})


# S3 / AutoFormerV2-T/S/B (AutoFormerV2/configs/S3-{T,S,B}.yaml; the reference calls them S3-T/S/B and
# "AutoFormerV2-T/S/B", checkpoints S3-{T,S,B}.pth): dims 96/192/384/768, heads 3/6/12/24, MLP ratio 4.
S3 = {
    "tiny": ((2, 2, 6, 2), (7, 7, 14, 7)),
    "small": ((2, 2, 18, 2), (14, 14, 14, 14)),
    "base": ((2, 2, 30, 2), (7, 7, 14, 7)),
}


def _s3(size: str, **kw: Any):
    from vitnas.models.s3 import S3Transformer

    depths, windows = S3[size]
    return S3Transformer(**{**dict(depths=depths, window_sizes=windows), **kw})


@register_model
def s3_tiny(**kw: Any):
    return _s3("tiny", **kw)


@register_model
def s3_small(**kw: Any):
    return _s3("small", **kw)


@register_model
def s3_base(**kw: Any):
    return _s3("base", **kw)


# Mini-DeiT (MiniViT/Mini-DeiT/mini_deit_models.py): DeiT-Ti/S/B widths, 12 layers in 6 weight-multiplexed
# pairs, talking-heads transforms, iRPE (product, ratio 1.9, on keys, skip 0), no class token.
MINI_DEIT = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _mini_deit(size: str, **kw: Any):
    from vitnas.models.minivit import MINI_DEIT_IRPE, MiniDeiT

    e, h = MINI_DEIT[size]
    return MiniDeiT(**{**dict(embed_dim=e, depth=12, num_heads=h, repeats=2, irpe=MINI_DEIT_IRPE), **kw})


@register_model
def mini_deit_tiny_patch16_224(**kw: Any):
    return _mini_deit("tiny", **kw)


@register_model
def mini_deit_small_patch16_224(**kw: Any):
    return _mini_deit("small", **kw)


@register_model
def mini_deit_base_patch16_224(**kw: Any):
    return _mini_deit("base", **kw)


@register_model
def mini_deit_base_patch16_384(**kw: Any):
    return _mini_deit("base", **{"img_size": 384, **kw})
