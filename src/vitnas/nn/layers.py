"""Transformer layers shared by the static models: patch embedding, MLP, attention and the pre-norm block
of the plain ViT (also timed by the latency table), its weight init, and image-size helpers.

Module names are the reference's (DeiT / AutoFormer / timm), so state-dict keys match theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from vitnas.nn.functional import IRPEInputs, RelPosInputs, attention, drop_path, mlp
from vitnas.nn.irpe import IRPEConfig, build_irpe
from vitnas.nn.relpos import RelativePosition2D, relpos_index

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "init_vit_weights", "patch_grid", "to_2tuple"]


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
    """(B, C, H, W) -> tokens (B, H/p * W/p, dim) by a strided conv (`proj`)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention of width `num_heads * head_dim` (independent of `dim`), with AutoFormer's 2-D
    relative position on keys and values (`rel_pos_max`) and / or iRPE (`rpe_q`, `rpe_k`, `rpe_v`)."""

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
    """fc1, GELU, dropout, fc2, dropout (keys `fc1`, `fc2`, as DeiT's, Swin's and MiniViT's Mlp)."""

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
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

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
