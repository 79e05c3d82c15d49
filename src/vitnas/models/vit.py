"""A plain Vision Transformer: the export target of the supernet, with no search code in it, and its
registered variants (DeiT, DeiT with iRPE named as the iRPE reference's models, AutoFormer-T/S/B).

Options cover AutoFormer's models: q/k/v width `num_heads * head_dim` independent of the embedding
width, per-layer heads and MLP ratios, AutoFormer's 2-D relative position on keys and values,
absolute position embedding, and global average pooling of the patch tokens (see `ViTConfig`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitnas.models.config import ARCH_DEFAULTS, ViTConfig, split_model_kwargs
from vitnas.models.registry import register_model
from vitnas.nn.layers import Attention, Block, Mlp, PatchEmbed, init_vit_weights
from vitnas.space.arch import ArchConfig

__all__ = ["VisionTransformer", "Attention", "Block", "Mlp", "PatchEmbed", "build_block", "init_vit_weights"]


def build_block(cfg: ViTConfig, dim: int, num_heads: int, hidden: int, drop_path: float = 0.0) -> Block:
    """One transformer block of a ViT with config `cfg` (the model's layers, and the latency table's)."""
    return Block(
        dim,
        num_heads,
        hidden,
        head_dim=cfg.head_dim,
        qkv_bias=cfg.qkv_bias,
        rel_pos_max=cfg.rel_pos_distance,
        irpe=cfg.irpe_config,
        norm_eps=cfg.norm_eps,
        drop=cfg.drop_rate,
        attn_drop=cfg.attn_drop_rate,
        drop_path=drop_path,
    )


class VisionTransformer(nn.Module):
    """ViT with per-layer heads and MLP ratios: `VisionTransformer(arch, config)`, or keywords -- an
    ArchConfig's embed_dim, depth, num_heads, mlp_ratios and `ViTConfig`'s fields. `config` holds them all
    as plain JSON, so `VisionTransformer(**model.config)` rebuilds the same architecture; `vit_config` is
    the `ViTConfig` (drop-path rates expanded per layer)."""

    def __init__(self, arch: ArchConfig | None = None, config: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            if arch is not None or config is not None:
                raise TypeError("pass VisionTransformer(arch, config) or keyword arguments, not both")
            arch, config = split_model_kwargs(kwargs)
        arch = ArchConfig(**ARCH_DEFAULTS) if arch is None else arch
        config = ViTConfig() if config is None else config
        if arch.patch_size not in (None, config.patch_size):
            raise ValueError(f"arch has patch_size={arch.patch_size}, the config {config.patch_size}")
        arch = ArchConfig(arch.embed_dim, arch.depth, arch.mlp_ratios, arch.num_heads)
        cfg = config.replace(drop_path_rate=tuple(config.drop_path_rates(arch.depth)))
        self.vit_config = cfg
        self.config: dict[str, Any] = cfg.to_dict(arch)
        self.arch = arch
        self.num_classes = cfg.num_classes
        self.embed_dim = arch.embed_dim
        self.global_pool = cfg.global_pool
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        self.drop_rate = cfg.drop_rate
        self._build(arch, cfg)

    def _build(self, arch: ArchConfig, cfg: ViTConfig) -> None:
        e = arch.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, e)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        num_patches = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, e)) if cfg.abs_pos else None
        self.blocks = nn.ModuleList(
            build_block(cfg, e, h, hidden, cfg.drop_path_rate[i])
            for i, (h, hidden) in enumerate(zip(arch.num_heads, arch.hidden_dims()))
        )
        self.norm = nn.LayerNorm(e, eps=cfg.norm_eps)
        self.head = nn.Linear(e, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    @classmethod
    def from_arch(cls, arch: ArchConfig, **kwargs: Any) -> VisionTransformer:
        """`arch` with `ViTConfig` keywords (its patch size, if any, is the config's)."""
        arch = ArchConfig(arch.embed_dim, arch.depth, arch.mlp_ratios, arch.num_heads)
        return cls(arch, ViTConfig(**kwargs))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalized tokens (B, 1 + patches, embed_dim)."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if grid != self.grid:
            raise ValueError(
                f"input of {tuple(x.shape[-2:])} pixels gives a {grid} patch grid; this model was built for {self.grid}"
            )
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.drop_rate and self.training:
            x = nn.functional.dropout(x, self.drop_rate, training=True)
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# -- registered variants ---------------------------------------------------------------------------
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
