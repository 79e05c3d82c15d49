"""A plain Vision Transformer: the export target of the supernet, with no search code in it.

Options cover AutoFormer's models: q/k/v width `num_heads * head_dim` independent of the embedding
width, per-layer heads and MLP ratios, AutoFormer's 2-D relative position on keys and values,
absolute position embedding, and global average pooling of the patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitnas.nn.functional import IRPEInputs, RelPosInputs, attention, drop_path, mlp
from vitnas.nn.irpe import IRPEConfig, build_irpe
from vitnas.nn.relpos import RelativePosition2D, relpos_index
from vitnas.space.arch import ArchConfig

__all__ = ["VisionTransformer", "Attention", "Block", "Mlp", "PatchEmbed", "init_vit_weights"]

GLOBAL_POOLS = ("avg", "token")


def init_vit_weights(module: nn.Module) -> None:
    """trunc_normal(0.02) for linear weights, zero biases, unit LayerNorms (as AutoFormer / DeiT)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {x!r}")
    return t  # type: ignore[return-value]


def patch_grid(img_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    h, w = to_2tuple(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {(h, w)} is not divisible by patch_size={patch_size}")
    return h // patch_size, w // patch_size


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int = 64,
        qkv_bias: bool = True,
        rel_pos_max: int | None = None,
        irpe: IRPEConfig | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.rel_pos_k = RelativePosition2D(head_dim, rel_pos_max) if rel_pos_max else None
        self.rel_pos_v = RelativePosition2D(head_dim, rel_pos_max) if rel_pos_max else None
        self.irpe = irpe
        if irpe is not None:  # named rpe_q / rpe_k / rpe_v, as in the reference's state dicts
            for name, module in build_irpe(irpe, head_dim, num_heads).items():
                self.add_module(name, module)
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        rp = None
        if self.rel_pos_k is not None:
            if grid is None:
                raise ValueError("relative position attention needs the patch grid")
            index = relpos_index(grid, self.rel_pos_k.max_distance, x.shape[1] - grid[0] * grid[1], x.device)
            rp = RelPosInputs(index, self.rel_pos_k.tables(), self.rel_pos_v.tables())
        ir = None
        if self.irpe is not None:
            ir = IRPEInputs(
                getattr(self, "rpe_q", None), getattr(self, "rpe_k", None), getattr(self, "rpe_v", None), grid
            )
        return attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            scale=self.scale,
            relpos=rp,
            irpe=ir,
            attn_drop=self.attn_drop,
            proj_drop=self.proj_drop,
            training=self.training,
        )


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        return mlp(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, drop=self.drop, training=self.training
        )


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        *,
        head_dim: int = 64,
        qkv_bias: bool = True,
        rel_pos_max: int | None = None,
        irpe: IRPEConfig | None = None,
        norm_eps: float = 1e-5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim,
            num_heads,
            head_dim=head_dim,
            qkv_bias=qkv_bias,
            rel_pos_max=rel_pos_max,
            irpe=irpe,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden, drop)
        self.drop_path = drop_path

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), grid), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT with per-layer heads and MLP ratios. `config` holds every constructor argument, so
    `VisionTransformer(**model.config)` rebuilds the same architecture."""

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int | Sequence[int] = 3,
        mlp_ratios: float | Sequence[float] = 4.0,
        head_dim: int = 64,
        qkv_bias: bool = True,
        rel_pos: bool = True,
        rel_pos_max: int = 14,
        abs_pos: bool = True,
        global_pool: str = "avg",
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float | Sequence[float] = 0.0,
        irpe: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        arch = ArchConfig(embed_dim, depth, mlp_ratios, num_heads)  # validates and expands per-layer values
        irpe_cfg = IRPEConfig(**irpe) if irpe else None  # iRPE tables (vitnas.nn.irpe.IRPEConfig fields)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r}; expected one of {GLOBAL_POOLS}")
        if isinstance(drop_path_rate, (int, float)):
            dpr = [float(drop_path_rate) * i / max(depth - 1, 1) for i in range(depth)]
        else:
            dpr = [float(p) for p in drop_path_rate]
            if len(dpr) != depth:
                raise ValueError(f"drop_path_rate has {len(dpr)} entries, expected depth={depth}")
        self.config: dict[str, Any] = dict(
            img_size=list(to_2tuple(img_size)),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=list(arch.num_heads),
            mlp_ratios=list(arch.mlp_ratios),
            head_dim=head_dim,
            qkv_bias=qkv_bias,
            rel_pos=rel_pos,
            rel_pos_max=rel_pos_max,
            abs_pos=abs_pos,
            global_pool=global_pool,
            norm_eps=norm_eps,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=dpr,
            irpe=dict(irpe) if irpe else None,
        )
        self.arch = arch
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.patch_size = patch_size
        self.grid = patch_grid(img_size, patch_size)
        self.drop_rate = drop_rate
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if abs_pos else None
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                h,
                hidden,
                head_dim=head_dim,
                qkv_bias=qkv_bias,
                rel_pos_max=rel_pos_max if rel_pos else None,
                irpe=irpe_cfg,
                norm_eps=norm_eps,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
            )
            for i, (h, hidden) in enumerate(zip(arch.num_heads, arch.hidden_dims()))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    @classmethod
    def from_arch(cls, arch: ArchConfig, **kwargs: Any) -> VisionTransformer:
        return cls(
            embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, mlp_ratios=arch.mlp_ratios, **kwargs
        )

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
